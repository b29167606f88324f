"""The layering rules of DESIGN.md, read from the source with `ast` (nothing here imports the project).

- prefetch/ imports neither ray.serve nor serving (cli.py, the composition root, may; so may the two deprecated
  shims prefetch/rollout.py and prefetch/watch.py, which re-export serving.control for one release);
- prefetch.store, prefetch.sources and prefetch.transfer import no ray;
- a source does not import the store (the origin layer does not depend on the disk layer);
- no import cycle among the project's modules;
- private Ray / MLflow names only in the two compat modules.

Every import statement counts, wherever it stands (module level, inside a function, under TYPE_CHECKING): a
lazy import still ties the two modules together, it only hides it from a reader. Each rule is a function of
a source root, so the last test can show on a small synthetic tree that every rule fires.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("prefetch", "serving")

SERVE_ALLOWED = {"prefetch.cli", "prefetch.rollout", "prefetch.watch"}
RAY_FREE = ("prefetch.store", "prefetch.sources", "prefetch.transfer")
COMPAT = {"prefetch.cluster.compat", "serving.control.compat"}
PRIVATE_RAY = ("ray._private", "ray._raylet", "ray.core.generated", "ray.experimental.internal_kv")
PRIVATE_NAMES = ("_get_global_client",)


@dataclasses.dataclass(frozen=True)
class Use:
    """One dotted name a module imports (or reaches through an imported alias), where it stands."""
    module: str      # the importing module, e.g. prefetch.cli
    name: str        # e.g. ray.serve, prefetch.store.Store, mlflow.utils.requirements_utils._init_map
    line: int
    imported: bool   # True: an import statement; False: an attribute reached through an imported name
    from_base: bool = False   # the X of `from X import a` (the module graph counts X.a, or X where a is no module)

    def __str__(self) -> str:
        return f"{self.module}:{self.line} {self.name}"


def project_modules(root: Path) -> dict[str, Path]:
    """Every module of the project packages under root: dotted name -> file (a package is its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
    """`from ..x import y` in `module` -> the absolute name of `..x`."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def uses(root: Path) -> list[Use]:
    """Every import in every project module, plus the attribute chains reached through imported names
    (`requirements_utils._init_packages_to_modules_map()` after `from mlflow.utils import requirements_utils`)."""
    out = []
    for module, path in project_modules(root).items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        aliases: dict[str, str] = {}   # local name -> the dotted name it was imported as
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    out.append(Use(module, a.name, node.lineno, True))
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        top = a.name.split(".")[0]
                        aliases[top] = top
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, is_package, node.level, node.module) if node.level else node.module
                star = any(a.name == "*" for a in node.names)
                out.append(Use(module, base, node.lineno, True, from_base=not star))
                for a in node.names:
                    if a.name != "*":
                        out.append(Use(module, f"{base}.{a.name}", node.lineno, True))
                        aliases[a.asname or a.name] = f"{base}.{a.name}"
        inner_attrs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and id(node) not in inner_attrs:   # the whole chain, once
                chain, inner = [], node
                while isinstance(inner, ast.Attribute):
                    chain.append(inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id in aliases:
                    out.append(Use(module, ".".join([aliases[inner.id], *reversed(chain)]), node.lineno, False))
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _within(module: str, packages) -> bool:
    return any(_under(module, p) for p in packages)


def _report(offenders) -> str:
    """One line per offending statement (module:line), naming the longest dotted name it uses."""
    longest: dict[tuple[str, int], str] = {}
    for o in offenders:
        if len(o.name) > len(longest.get((o.module, o.line), "")):
            longest[(o.module, o.line)] = o.name
    return "".join(f"\n  {m}:{line} {name}" for (m, line), name in sorted(longest.items()))


# -- the rules: each returns its offenders, empty when the rule holds ------------------------------------------
def serve_in_prefetch(root: Path) -> list[Use]:
    """prefetch modules (cli.py and the two shims aside) that import ray.serve or serving."""
    return [u for u in uses(root) if u.imported and _within(u.module, ["prefetch"])
            and u.module not in SERVE_ALLOWED and (_under(u.name, "ray.serve") or _under(u.name, "serving"))]


def ray_in_ray_free_layers(root: Path) -> list[Use]:
    """prefetch.store / prefetch.sources / prefetch.transfer modules that import ray."""
    return [u for u in uses(root) if u.imported and _within(u.module, RAY_FREE) and _under(u.name, "ray")]


def store_in_sources(root: Path) -> list[Use]:
    """Modules under prefetch/sources/ that import the store."""
    return [u for u in uses(root) if u.imported and _within(u.module, ["prefetch.sources"])
            and _under(u.name, "prefetch.store")]


def private_names(root: Path) -> list[Use]:
    """Private Ray / MLflow names used outside the compat modules."""
    def private(name: str) -> bool:
        parts = name.split(".")
        if any(_under(name, p) for p in PRIVATE_RAY) or any(p in PRIVATE_NAMES for p in parts):
            return True
        return parts[0] == "mlflow" and any(p.startswith("_") and not (p.startswith("__") and p.endswith("__"))
                                            for p in parts[1:])
    return [u for u in uses(root) if u.module not in COMPAT and private(u.name)]


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports. `from pkg import name` counts as pkg.name where that is a
    module, else as pkg (the name comes from pkg's __init__)."""
    modules = project_modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for u in uses(root):
        if not u.imported or u.from_base:
            continue
        parts = u.name.split(".")
        for n in range(len(parts), 0, -1):     # the longest prefix that is a project module
            target = ".".join(parts[:n])
            if target in modules:
                if target != u.module:
                    graph[u.module].add(target)
                break
    return graph


def import_cycles(root: Path) -> list[list[str]]:
    """Every strongly connected group of modules (Tarjan), each as one cycle through it: a -> b -> ... -> a."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:          # recursive: the project has far fewer modules than the recursion limit
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(sorted(g)[0], g, graph) for g in groups]


def _cycle_through(start: str, group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected group (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a strongly connected group but on no cycle")


# -- the tests on the project --------------------------------------------------------------------------------
def test_prefetch_imports_neither_serve_nor_serving():
    found = serve_in_prefetch(REPO)
    assert not found, "prefetch/ imports ray.serve or serving (only cli.py may, lazily):" + _report(found)


def test_store_sources_transfer_import_no_ray():
    found = ray_in_ray_free_layers(REPO)
    assert not found, "the store, the sources and transfer must import no ray:" + _report(found)


def test_sources_do_not_import_the_store():
    found = store_in_sources(REPO)
    assert not found, "a source imports the store (FileEntry, safe paths belong in sources/base.py):" + _report(found)


def test_no_import_cycles():
    cycles = import_cycles(REPO)
    assert not cycles, "import cycles among the project's modules:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_private_ray_and_mlflow_names_only_in_compat_modules():
    found = private_names(REPO)
    assert not found, (f"private Ray/MLflow names outside {', '.join(sorted(COMPAT))}:" + _report(found))


# -- every rule can fail ------------------------------------------------------------------------------------
def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in PACKAGES:
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


def test_each_rule_fires_on_a_tree_that_breaks_it(tmp_path):
    bad = _tree(tmp_path / "bad", {
        "prefetch/store/__init__.py": "",
        "prefetch/store/store.py": "def f():\n    import ray\n",                        # ray in the store, lazily
        "prefetch/sources/__init__.py": "",
        "prefetch/sources/s3.py": "from ..store import Store\n",                           # a source -> the store
        "prefetch/transfer.py": "from ray.util import list_named_actors\n",
        "prefetch/agent.py": "def g():\n    from ray import serve\n",                      # ray.serve, in a function
        "prefetch/api.py": "from serving.loader import load_model\nfrom . import metrics\n",
        "prefetch/metrics.py": "def h():\n    from .api import warm\n",                     # api <-> metrics
        "prefetch/cli.py": "import serving\nfrom ray import serve\n",                      # allowed: the root
        "prefetch/cluster/__init__.py": "",
        "prefetch/cluster/compat.py": "import ray._private.state\n",                       # allowed: compat
        "prefetch/cluster/agent.py": "import ray\nx = ray._private.state.actors()\n",      # reached by attribute
        "prefetch/cluster/node.py": "from ray.experimental import internal_kv\n",
        "serving/loader.py": ("from mlflow.utils import requirements_utils\n"
                              "requirements_utils._init_packages_to_modules_map()\n"
                              "import mlflow\nv = mlflow.__version__\n"),                  # a dunder is public
        "serving/control/__init__.py": "",
        "serving/control/rollout.py": "from ray.serve.context import _get_global_client\n",
    })
    assert {u.module for u in serve_in_prefetch(bad)} == {"prefetch.agent", "prefetch.api"}
    assert {u.module for u in ray_in_ray_free_layers(bad)} == {"prefetch.store.store", "prefetch.transfer"}
    assert {u.module for u in store_in_sources(bad)} == {"prefetch.sources.s3"}
    assert import_cycles(bad) == [["prefetch.api", "prefetch.metrics", "prefetch.api"]]
    found = {(u.module, u.name) for u in private_names(bad)}
    assert found == {
        ("prefetch.cluster.agent", "ray._private.state.actors"),
        ("prefetch.cluster.node", "ray.experimental.internal_kv"),
        ("serving.loader", "mlflow.utils.requirements_utils._init_packages_to_modules_map"),
        ("serving.control.rollout", "ray.serve.context._get_global_client"),
    }, found

    good = _tree(tmp_path / "good", {
        "prefetch/sources/__init__.py": "", "prefetch/sources/base.py": "import hashlib\n",
        "prefetch/sources/s3.py": "from .base import FileEntry\n",
        "prefetch/store/__init__.py": "from .store import Store\n", "prefetch/store/store.py": "from ..sources import base\n",
        "prefetch/cli.py": "def f():\n    from serving import loader\n",
        "serving/loader.py": "import mlflow.pyfunc\nm = mlflow.pyfunc.load_model('x', suppress_warnings=True)\n"
                             "from prefetch.store import Store\n",
    })
    for rule in (serve_in_prefetch, ray_in_ray_free_layers, store_in_sources, import_cycles, private_names):
        assert rule(good) == [], rule.__name__
