"""Issue E: zero-downtime model updates (`prefetch rollout`, `prefetch watch`) on a real Ray cluster + real Serve.

One 2-node Ray cluster (ray.cluster_utils) for the module, each node with its own cache dir (node label), started
in the embedded registry's environment (sqlite + local artifacts: every process on this machine reads the same
files). Serve's HTTP proxy runs on the head only, on a free port; one app (2 replicas of serving.RegistryModel)
is switched back and forth. Requests go over HTTP from a thread while each rollout runs.

Every test puts the app on the version it starts from itself (ensure_app / a deploy of its own), so each one runs
alone (`pytest tests/test_rollout.py::test_x`) as well as in any order: hot swap v1 -> v2, failed rollouts (v2
untouched), a rollout that times out (rolled back), a rolling redeploy v1 -> v2 from a config file and a failed one
(the file put back byte for byte), the watch following an alias through an outage of a real HTTP tracking server,
`latest` and a stage.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests import harness
from tests.helpers import PREFETCH, REPO, RequestLoop, run_cli

NAME = "prefetch-rollout-rf"
LABEL = "prefetch-cache-dir"
APP, ROUTE, DEPLOYMENT = "rollout", "/rollout", "Model"
LOOPBACK = "127.0.0.1"
pytestmark = pytest.mark.timeout(900)


# -- the cluster (module) ------------------------------------------------------------------------------------------
class Rig:
    def __init__(self, cluster, env: dict, seed: dict, url: str, dirs: dict, embedded):
        self.cluster, self.env, self.seed, self.url, self.dirs, self.embedded = cluster, env, seed, url, dirs, embedded

    @property
    def address(self) -> str:
        return self.cluster.address


@pytest.fixture(scope="module")
def rig(embedded, tmp_path_factory):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from prefetch.cluster import clear_desired, connect

    env = embedded.env()
    seed = harness.register_seed_versions(env, name=NAME, n_versions=2)   # champion -> v2, stable -> v1
    if ray.is_initialized():
        ray.shutdown()
    root = tmp_path_factory.mktemp("rollout-nodes")
    dirs = {}
    # Teardown steps run in reverse, every one of them even if an earlier one failed; a failure is raised (an
    # error of this fixture), not swallowed.
    with contextlib.ExitStack() as teardown:
        cluster = Cluster(initialize_head=False)
        teardown.callback(cluster.shutdown)
        # Nodes start in the registry's environment (raylets, agents and replicas inherit it, as on a real node).
        # Each node's dashboard agent on a port of its own: Ray's default (52365) is shared by every Ray head on
        # this machine, and a second one dies at start-up.
        with harness.mlflow_env(env):
            for name, cpus in (("head", 2), ("worker", 1)):
                args = dict(num_cpus=cpus, object_store_memory=100 << 20, labels={LABEL: str(root / name)},
                            dashboard_agent_listen_port=harness.free_port())
                if name == "head":
                    args["include_dashboard"] = False
                node = cluster.add_node(**args)
                dirs[node.node_id] = root / name
        connect(cluster.address)
        teardown.callback(ray.shutdown)
        teardown.callback(clear_desired, cluster.address)
        port = harness.free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": LOOPBACK, "port": port})
        teardown.callback(serve.shutdown)
        yield Rig(cluster, env, seed, f"http://{LOOPBACK}:{port}{ROUTE}", dirs, embedded)


@pytest.fixture
def on_rig(rig, use_env):
    use_env(rig.env)
    return rig


def app_config(uri: str | None = None, *, args_uri: str | None = None) -> dict:
    deployment = {"name": DEPLOYMENT, "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}}
    if uri is not None:
        deployment["user_config"] = {"model_uri": uri}
    doc = {"name": APP, "route_prefix": ROUTE, "import_path": "serving.examples:model_app",
           "deployments": [deployment]}
    if args_uri is not None:
        doc["args"] = {"model_uri": args_uri}
    return doc


# Another declaratively deployed app: a rollout re-applies every declarative app's config (Serve deletes the ones
# missing from the set), so this one must come through every rollout untouched.
BYSTANDER = {"name": "bystander", "route_prefix": "/bystander", "import_path": "serving.examples:model_app",
             "args": {"model_uri": f"models:/{NAME}/1"},
             "deployments": [{"name": DEPLOYMENT, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}]}


def deploy(app: dict) -> None:
    """What `serve deploy` does with a config file (declarative): this app, and the bystander."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema(applications=[app, BYSTANDER]))


def replica_status_of(app: str) -> list[dict]:
    from serving import replica_status

    return replica_status(app)


def bystander() -> list[tuple]:
    return [(r["replica"], r["version"]) for r in replica_status_of(BYSTANDER["name"])]


def details() -> dict:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()["applications"][APP]


def live_user_config() -> dict:
    return details()["deployments"][DEPLOYMENT]["deployment_config"]["user_config"]


def replicas() -> list[dict]:
    from serving import replica_status

    return replica_status(APP)


def on_version(version: str, n: int = 2, name: str = NAME):
    rows = replicas()
    ok = (len(rows) == n and all((r.get("name"), r.get("version")) == (name, version) for r in rows)
          and details()["status"] == "RUNNING")
    return rows if ok else False


def wait_for(predicate, timeout: float = 180.0, what: str = "condition", every: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def ensure_deployed(doc: dict, name: str, version: str) -> list[dict]:
    """`doc` deployed (declaratively), its 2 replicas on `name` `version`. Here only `args` changes Serve's code
    version: when they differ from the running app's, Serve replaces the replicas, so wait until none of the old
    ones is left (they may serve the same version)."""
    from serving.control.apps import serve_details

    app = (serve_details().get("applications") or {}).get(APP) or {}
    same = ((app.get("deployed_app_config") or {}).get("args") or {}) == (doc.get("args") or {})
    old = set() if same or not app else {r["replica"] for r in replicas()}
    deploy(doc)
    # A first deploy on a fresh cluster starts Ray workers for every replica: slow on a loaded 2-core machine.
    return wait_for(lambda: not ({r["replica"] for r in replicas()} & old) and on_version(version, name=name),
                    timeout=300, what=f"2 replicas on {name} v{version}")


def ensure_app(uri: str) -> list[dict]:
    """The app running on `uri` (user_config), 2 replicas on its version."""
    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    return ensure_deployed(app_config(uri), name, version)


def ensure_file_app(doc: dict, version: str) -> list[dict]:
    """The app deployed from a config file's entry (the model URI in `args`), 2 replicas on `version`."""
    return ensure_deployed(doc, NAME, version)


def body(rig) -> dict:
    return {"inputs": rig.seed["X_test"][:3].tolist()}


def rollout_cli(rig, *args: str, timeout: float = 400) -> tuple[subprocess.CompletedProcess, dict]:
    proc = run_cli("rollout", APP, "--address", rig.address, "--json", *args, timeout=timeout)
    doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc, doc


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.strip().splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]


# -- 1. hot swap ---------------------------------------------------------------------------------------------------
def test_rollout_user_config_hot_swaps_under_load_with_zero_failures(on_rig):
    rig = on_rig
    before = ensure_app(f"models:/{NAME}/1")
    ids = {r["replica"] for r in before}
    others = wait_for(bystander, what="the bystander app's replica")
    with RequestLoop(rig.url, body(rig), max_requests=2000, pause=0.02) as loop:
        time.sleep(1.0)
        switch_asked = time.monotonic()
        proc, report = rollout_cli(rig, "--model-uri", f"models:/{NAME}@champion")
        done = time.monotonic()
        time.sleep(1.5)
    assert proc.returncode == 0, proc.stderr
    assert report["ok"] and report["switched"] and report["mode"] == "user_config"
    # The alias was pinned: the app is switched to a version number, not to the alias.
    assert report["target"]["pinned"] == f"models:/{NAME}/2" and report["target"]["version"] == "2"
    assert live_user_config()["model_uri"] == f"models:/{NAME}/2"
    # Warmed on every node before the switch, so no replica downloaded anything.
    warm = report["warm"]
    assert warm["ok"] and warm["nodes"] == 2 and {r["node_id"] for r in warm["rows"]} == set(rig.dirs)
    rows = replicas()
    assert {r["replica"] for r in rows} == ids, "a hot swap keeps the replicas"
    assert all(r["version"] == "2" and r["from_cache"] and r["origin_bytes"] == 0 and r["error"] is None
               for r in rows), rows
    for r in rows:
        assert (rig.dirs[r["node_id"]] / "objects" / r["key"]).is_dir()
    assert loop.failures() == [], loop.failures()[:5]
    assert loop.versions(before=switch_asked) == {"1"}, "requests before the rollout were answered by v1"
    assert loop.versions(after=done) == {"2"}, loop.versions(after=done)
    print(f"\nhot swap v1 -> v2: {len(loop.results)} requests, 0 failed; stages {report['seconds']}; "
          f"replicas on nodes {sorted({r['node_id'][:8] for r in rows})}")

    assert bystander() == others == [(others[0][0], "1")]

    # The version each replica serves, from the CLI.
    status = json.loads(run_cli("status", "--app", APP, "--address", rig.address, "--json", check=True).stdout)
    assert status["ok"] and status["versions"] == {f"{NAME} v2": 2}
    assert {r["replica"] for r in status["replicas"]} == ids
    table = run_cli("status", "--app", APP, "--address", rig.address, env={"COLUMNS": "250"}, check=True).stderr
    assert f"app {APP}: RUNNING; 2 replicas: {NAME} v2 x2" in table, table
    print(table)

    # Rolling out what already runs changes nothing.
    from serving.control.rollout import rollout

    again = rollout(APP, f"models:/{NAME}/2", address=rig.address)
    assert again["ok"] and not again["changed"] and again["note"] == "already serving it"


# -- 2. failures before the switch leave the app untouched ----------------------------------------------------------
def _register_broken_version(rig, tmp_path: Path) -> str:
    """A version whose artifacts are not an MLflow model (no MLmodel): it warms fine, but cannot load."""
    from mlflow import MlflowClient

    junk = rig.embedded.artifacts_dir / f"rollout-broken-{tmp_path.name}"
    junk.mkdir(parents=True)
    (junk / "weights.bin").write_bytes(b"\0" * 1024)
    client = MlflowClient(tracking_uri=rig.embedded.tracking_uri, registry_uri=rig.embedded.tracking_uri)
    mv = client.create_model_version(NAME, source=junk.as_uri())
    return f"models:/{NAME}/{mv.version}"


def test_failed_rollouts_leave_the_running_version_untouched(on_rig, tmp_path):
    from prefetch.errors import BadURI, NotFound
    from serving.control.rollout import RolloutError, rollout

    rig = on_rig
    before = ensure_app(f"models:/{NAME}/2")
    config_before = live_user_config()
    broken = _register_broken_version(rig, tmp_path)
    config_file = tmp_path / "serve_config.yaml"
    config_file.write_text(_config_text(f"models:/{NAME}/2"))
    file_before = config_file.read_bytes()

    cases = [
        # (args, exit code, words the one error line must hold)
        (("--model-uri", f"models:/{NAME}/99"), 3, ["99", "not found"]),
        (("--model-uri", f"models:/{NAME}/1", "--format", "onnx", "--tolerance", "1e-12"), 5,
         ["warm failed on node", "tolerance"]),
        # Without the load check, the broken version reaches the replicas: each keeps serving v2 and reports the
        # failed swap, and the rollout puts the previous user_config back.
        (("--model-uri", broken, "--no-validate"), 5, ["could not load the new version", "rolled back"]),
    ]
    with RequestLoop(rig.url, body(rig), max_requests=2000, pause=0.02) as loop:
        for args, code, words in cases:
            proc, doc = rollout_cli(rig, *args)
            lines = error_lines(proc)
            assert proc.returncode == code, (args, proc.returncode, proc.stderr)
            assert "Traceback" not in proc.stderr and len(lines) == 1, (args, proc.stderr)
            assert all(w in lines[0] for w in words), (args, lines[0])
            assert doc["ok"] is False and doc["exit_code"] == code
            print(f"\nrollout {' '.join(args)} -> exit {code}: {lines[0]}")
            if "--no-validate" in args:
                assert doc["switched"] and doc["rolled_back"] and doc["rollback_settled"], doc
            else:
                assert not doc.get("switched"), doc
            assert live_user_config() == config_before
        # The same checks in-process (the CLI is a shell over this function).
        with pytest.raises(RolloutError, match="validation: the model does not load.*MLmodel") as failed:
            rollout(APP, broken, address=rig.address)
        assert failed.value.exit_code == 5 and failed.value.stage == "validate"
        with pytest.raises(NotFound, match="99"):
            rollout(APP, f"models:/{NAME}/99", mode="redeploy", config_path=config_file, address=rig.address)
        with pytest.raises(NotFound, match="no Serve application named 'nope'"):
            rollout("nope", f"models:/{NAME}/1", address=rig.address)
        with pytest.raises(BadURI, match="names no version"):
            rollout(APP, f"models:/{NAME}", address=rig.address)
        with pytest.raises(BadURI, match="--config"):
            rollout(APP, f"models:/{NAME}/1", mode="redeploy", address=rig.address)
        with pytest.raises(BadURI, match="no application named 'other'"):
            rollout("other", f"models:/{NAME}/1", mode="redeploy", config_path=config_file, address=rig.address)
        # An app started with serve.run keeps no config to update or roll back to: refused, and left alone.
        from ray import serve

        from serving.examples import Model

        serve.run(Model.options(num_replicas=1, user_config={"model_uri": f"models:/{NAME}/1"},
                                ray_actor_options={"num_cpus": 0.1}).bind(), name="imperative", route_prefix="/imp")
        try:
            with pytest.raises(BadURI, match="serve.run"):
                rollout("imperative", f"models:/{NAME}/2", address=rig.address)
            assert [r["version"] for r in replica_status_of("imperative")] == ["1"]
        finally:
            serve.delete("imperative")
        time.sleep(0.5)
    assert loop.failures() == [], loop.failures()[:5]
    assert loop.versions() == {"2"}
    rows = wait_for(lambda: all(r["error"] is None for r in replicas()) and replicas(), what="no swap error left")
    assert {(r["replica"], r["version"]) for r in rows} == {(r["replica"], "2") for r in before}
    assert live_user_config() == config_before
    assert config_file.read_bytes() == file_before
    assert details()["status"] == "RUNNING"


# -- 2b. a replica that cannot report the new version within --timeout: rolled back -----------------------------
GATED = "prefetch-rollout-gated"
_GATED_MODEL_CODE = '''\
"""A pyfunc model whose load waits until its gate file exists (written by tests/test_rollout.py)."""
import os
import time

import mlflow
from mlflow.pyfunc import PythonModel


class GatedModel(PythonModel):
    def load_context(self, context):
        gate = context.model_config["gate"]
        while not os.path.exists(gate):
            time.sleep(0.2)

    def predict(self, context, model_input, params=None):
        return [0.0] * len(model_input)


mlflow.models.set_model(GatedModel())
'''


def _register_gated_version(rig, gate: Path) -> str:
    """A real model whose load blocks until `gate` exists: it warms fine (files only), but a replica asked to
    swap to it cannot report it until the test opens the gate."""
    import mlflow

    code = gate.with_name("gated_model.py")
    code.write_text(_GATED_MODEL_CODE)
    with harness.mlflow_env(rig.env), mlflow.start_run(run_name="gated"):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), model_config={"gate": str(gate)},
                                       registered_model_name=GATED, pip_requirements=["mlflow"])
    return f"models:/{GATED}/{info.registered_model_version}"


def test_rollout_that_times_out_puts_the_previous_config_back(on_rig, tmp_path):
    rig = on_rig
    before = ensure_app(f"models:/{NAME}/2")
    config_before = live_user_config()
    gate = tmp_path / "gate"
    gated = _register_gated_version(rig, gate)
    try:
        with RequestLoop(rig.url, body(rig), max_requests=3000, pause=0.02) as loop:
            proc, doc = rollout_cli(rig, "--model-uri", gated, "--no-validate", "--timeout", "8")
            rolled_back = time.monotonic()
            time.sleep(1.0)
        lines = error_lines(proc)
        assert proc.returncode == 1 and doc["exit_code"] == 1, (proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
        assert "after 8s, 0 of 2 replicas" in lines[0] and "rolled back to the previous config" in lines[0], lines
        assert doc["ok"] is False and doc["switched"] and doc["rolled_back"], doc
        print(f"\nrollout to a replica-blocking version with --timeout 8 -> exit 1: {lines[0]}")
        assert live_user_config() == config_before
        # The app answered with the version it had, before, during and after the rollout.
        assert loop.failures() == [], loop.failures()[:5]
        assert loop.versions() == {"2"} and loop.versions(after=rolled_back) == {"2"}, loop.versions()
        assert {(r["replica"], r["version"]) for r in replicas()} == {(r["replica"], "2") for r in before}
    finally:
        gate.write_text("open")   # the loads the replicas still run end; the rolled-back config is applied after
    rows = wait_for(lambda: on_version("2") and all(r["error"] is None for r in replicas()) and replicas(),
                    what="every replica on v2, settled, once the blocked load ended")
    assert {r["replica"] for r in rows} == {r["replica"] for r in before}
    assert live_user_config() == config_before


# -- 3. rolling redeploy from a config file -------------------------------------------------------------------------
def _config_text(uri: str) -> str:
    return f"""\
# Serve config for the rollout test (a comment the rollout must keep)
applications:
  - name: {APP}
    route_prefix: {ROUTE}
    import_path: serving.examples:model_app
    args:
      model_uri: {uri}   # written by prefetch rollout
    deployments:
      - name: {DEPLOYMENT}
        num_replicas: 2
        ray_actor_options:
          num_cpus: 0.1
"""


def test_rollout_redeploy_rolls_new_replicas_under_load_with_zero_failures(on_rig, tmp_path):
    import yaml

    rig = on_rig
    config_file = tmp_path / "serve_config.yaml"
    config_file.write_text(_config_text(f"models:/{NAME}/1"))
    # `serve deploy serve_config.yaml`: the app now takes its URI from args (a new code version: new replicas).
    before = ensure_file_app(yaml.safe_load(config_file.read_text())["applications"][0], "1")
    ids = {r["replica"] for r in before}
    others = wait_for(bystander, what="the bystander app's replica")
    with RequestLoop(rig.url, body(rig), max_requests=2000, pause=0.02) as loop:
        time.sleep(1.0)
        proc, report = rollout_cli(rig, "--model-uri", f"models:/{NAME}@champion", "--mode", "redeploy",
                                   "--config", str(config_file))
        done = time.monotonic()
        time.sleep(1.5)
    assert proc.returncode == 0, proc.stderr
    assert report["ok"] and report["switched"] and report["target"]["pinned"] == f"models:/{NAME}/2"
    text = config_file.read_text()
    assert f"model_uri: models:/{NAME}/2   # written by prefetch rollout" in text, text
    assert text.startswith("# Serve config for the rollout test") and "note" not in report
    assert yaml.safe_load(text) == yaml.safe_load(_config_text(f"models:/{NAME}/2"))
    rows = replicas()
    assert len(rows) == 2 and not ({r["replica"] for r in rows} & ids), "a redeploy replaces the replicas"
    assert all(r["version"] == "2" and r["from_cache"] and r["origin_bytes"] == 0 for r in rows), rows
    assert details()["deployed_app_config"]["args"] == {"model_uri": f"models:/{NAME}/2"}
    assert bystander() == others
    assert loop.failures() == [], loop.failures()[:5]
    assert loop.versions(after=done) == {"2"}, loop.versions(after=done)
    print(f"\nrolling redeploy v1 -> v2: {len(loop.results)} requests, 0 failed; stages {report['seconds']}")


def test_failed_redeploy_rollout_puts_the_config_file_back_byte_for_byte(on_rig, tmp_path):
    """A rolling redeploy to a version whose replicas cannot load it (no MLmodel; load check skipped): the rollout
    rolls back, and the file it edited is put back exactly as it was (comments, spacing, no trailing newline)."""
    import yaml

    rig = on_rig
    broken = _register_broken_version(rig, tmp_path)
    config_file = tmp_path / "serve_config.yaml"
    original = (_config_text(f"models:/{NAME}/1").replace("Serve config for", "Serve  config   for")
                + "# the end, no newline").encode()
    config_file.write_bytes(original)
    ensure_file_app(yaml.safe_load(original)["applications"][0], "1")
    with RequestLoop(rig.url, body(rig), max_requests=3000, pause=0.02) as loop:
        proc, doc = rollout_cli(rig, "--model-uri", broken, "--no-validate", "--mode", "redeploy",
                                "--config", str(config_file))
        time.sleep(1.0)
    lines = error_lines(proc)
    assert proc.returncode == 5, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and "could not load the new version" in lines[0] and "rolled back" in lines[0], lines
    assert doc["switched"] and doc["rolled_back"], doc
    print(f"\nfailed rolling redeploy -> exit 5: {lines[0]}")
    assert config_file.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir() if "serve_config" in p.name) == ["serve_config.yaml"]
    assert details()["deployed_app_config"]["args"] == {"model_uri": f"models:/{NAME}/1"}
    assert loop.failures() == [], loop.failures()[:5]
    assert loop.versions() == {"1"}, loop.versions()
    wait_for(lambda: on_version("1") and all(r["error"] is None for r in replicas()),
             what="2 replicas on v1, no swap error, after the roll-back")


# -- 4. watch ------------------------------------------------------------------------------------------------------
class Lines:
    """A subprocess's stderr, line by line, collected by a thread."""

    def __init__(self, stream, proc: subprocess.Popen | None = None):
        self.lines: list[str] = []
        self.proc = proc
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, needle: str, timeout: float = 120.0, start: int = 0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ended = self.proc is not None and self.proc.poll() is not None and not self._thread.is_alive()
            for i, line in enumerate(self.lines[start:], start):
                if needle in line:
                    return i
            if ended:   # everything it wrote is in: no point waiting
                raise AssertionError(f"the process exited ({self.proc.returncode}) with no line holding "
                                     f"{needle!r}:\n" + "\n".join(self.lines[-30:]))
            time.sleep(0.1)
        raise AssertionError(f"no line with {needle!r} in {timeout:.0f}s:\n" + "\n".join(self.lines[-30:]))

    def first(self, needle: str) -> int:
        """The index of the first line holding `needle` (the lines are all in)."""
        return next((i for i, line in enumerate(self.lines) if needle in line), -1)


def _watch(rig, uri: str, tracking_uri: str | None = None) -> tuple[subprocess.Popen, Lines]:
    """`prefetch watch URI` in a subprocess (poll every second, exits after one rollout); its stderr, line by line."""
    env = {**os.environ, "COLUMNS": "250"}
    if tracking_uri is not None:   # the registry too (use_env exported MLFLOW_REGISTRY_URI for the rig's)
        env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = tracking_uri
    proc = subprocess.Popen([*PREFETCH, "watch", uri, "--app", APP, "--interval", "1", "--max-rollouts", "1",
                             "--address", rig.address], cwd=REPO, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, Lines(proc.stderr, proc)


@contextlib.contextmanager
def _watching(rig, uri: str, tracking_uri: str | None = None):
    proc, out = _watch(rig, uri, tracking_uri)
    try:
        yield proc, out
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        print("\n".join(out.lines))


def test_watch_follows_an_alias_through_a_tracking_server_outage(on_rig, tmp_path):
    """The watch asks a real `mlflow server` (over the rig's registry database); the server is stopped, the alias
    moves meanwhile, the server comes back on the same port: the watch logs the outage, then rolls out."""
    from mlflow import MlflowClient

    rig = on_rig
    ensure_app(f"models:/{NAME}/2")
    others = wait_for(bystander, what="the bystander app's replica")
    client = MlflowClient(tracking_uri=rig.embedded.tracking_uri, registry_uri=rig.embedded.tracking_uri)
    client.set_registered_model_alias(NAME, "live", "2")
    server = harness.RegistryServer(rig.embedded, tmp_path / "server").start()
    try:
        with _watching(rig, f"models:/{NAME}@live", server.tracking_uri) as (proc, out):
            out.wait_for("in sync: app serves v2")
            server.stop_process()
            outage = out.wait_for("registry error", timeout=120)
            assert f"cannot reach the MLflow tracking server at {server.tracking_uri}" in out.lines[outage], \
                out.lines[outage]
            client.set_registered_model_alias(NAME, "live", "1")   # moved while the watch cannot see it
            out.wait_for("registry error", start=outage + 1, timeout=120)   # still retrying, not given up
            assert proc.poll() is None, "the watch gave up during the outage"
            assert on_version("2"), "nothing may change while the registry is away"
            server.restart()
            back_at = time.monotonic()
            assert proc.wait(timeout=400) == 0
            seconds = time.monotonic() - back_at
            rows = on_version("1")
            assert rows, replicas()
    finally:
        server.stop()
    text = "\n".join(out.lines)
    assert outage < out.first("moved: v2 -> v1") < out.first("v1 rolled out"), text
    assert "stopped (max_rollouts): 1 rollouts, 0 failed" in text, text
    print(f"\nserver back -> all {len(rows)} replicas on the new version: {seconds:.1f}s "
          f"(outage logged: {out.lines[outage]!r})")
    assert live_user_config()["model_uri"] == f"models:/{NAME}/1"
    assert all(r["from_cache"] for r in rows), rows
    assert bystander() == others


# -- watch: `latest` and a stage (a model of their own, so no other test moves them) -------------------------------
FOLLOW = "prefetch-rollout-follow"


@pytest.fixture(scope="module")
def follow_model(rig) -> dict:
    return harness.register_seed_versions(rig.env, name=FOLLOW, n_versions=1)


def _new_follow_version(rig, follow_model: dict) -> str:
    """A new registered version of FOLLOW on the first version's files (same predictions, a new version)."""
    from mlflow import MlflowClient

    first = follow_model["versions"][0]
    client = MlflowClient(tracking_uri=rig.embedded.tracking_uri, registry_uri=rig.embedded.tracking_uri)
    return str(client.create_model_version(FOLLOW, source=first["artifact_location"] or first["source"],
                                           run_id=first["run_id"]).version)


def _follow_versions(rig) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=rig.embedded.tracking_uri, registry_uri=rig.embedded.tracking_uri)
    return sorted((str(mv.version) for mv in client.search_model_versions(f"name='{FOLLOW}'")), key=int)


def _answers(rig, version: str, follow_model: dict) -> None:
    """The app answers over HTTP from FOLLOW `version`, with the test's own model's predictions."""
    import numpy as np
    import requests

    r = requests.post(rig.url, json=body(rig), timeout=30)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["model"], doc["version"]) == (FOLLOW, version), doc
    np.testing.assert_allclose(doc["predictions"], follow_model["expected"][1][:3], rtol=1e-12)


def test_watch_follows_latest(on_rig, follow_model):
    rig = on_rig
    newest = _follow_versions(rig)[-1]
    ensure_app(f"models:/{FOLLOW}/{newest}")
    with _watching(rig, f"models:/{FOLLOW}/latest") as (proc, out):
        out.wait_for(f"in sync: app serves v{newest}")
        registered = _new_follow_version(rig, follow_model)
        # The watch exits after one rollout, which it counts only once every replica serves the new version.
        assert proc.wait(timeout=400) == 0
        assert on_version(registered, name=FOLLOW), replicas()
    assert f"moved: v{newest} -> v{registered}" in "\n".join(out.lines)
    assert live_user_config()["model_uri"] == f"models:/{FOLLOW}/{registered}"
    _answers(rig, registered, follow_model)


def test_watch_follows_a_stage(on_rig, follow_model):
    from mlflow import MlflowClient

    rig = on_rig
    client = MlflowClient(tracking_uri=rig.embedded.tracking_uri, registry_uri=rig.embedded.tracking_uri)
    while len(versions := _follow_versions(rig)) < 2:
        _new_follow_version(rig, follow_model)
    first, second = versions[-2:]
    client.transition_model_version_stage(FOLLOW, first, "Staging", archive_existing_versions=True)
    ensure_app(f"models:/{FOLLOW}/{first}")
    with _watching(rig, f"models:/{FOLLOW}/Staging") as (proc, out):
        out.wait_for(f"in sync: app serves v{first}")
        client.transition_model_version_stage(FOLLOW, second, "Staging", archive_existing_versions=True)
        assert proc.wait(timeout=400) == 0
        assert on_version(second, name=FOLLOW), replicas()
    assert f"moved: v{first} -> v{second}" in "\n".join(out.lines)
    assert live_user_config()["model_uri"] == f"models:/{FOLLOW}/{second}"
    _answers(rig, second, follow_model)


# -- the config file edit, without Ray -----------------------------------------------------------------------------
def test_config_file_edit_changes_only_the_model_and_keeps_the_rest(tmp_path):
    import yaml

    from prefetch.errors import BadURI
    from serving.control.config_file import ConfigFile

    text = """\
# fleet config
proxy_location: HeadOnly
applications:
  - name: other
    route_prefix: /other
    import_path: serving.examples:model_app
    args: {model_uri: "models:/fraud/1"}   # another app with the same key: untouched
  - name: fraud
    route_prefix: /fraud
    import_path: serving.examples:model_app
    args:
      model_uri: 'models:/fraud/1'   # quoted
    deployments:
      - name: Model
        user_config:
          model_uri: models:/fraud/1
          format: native
        num_replicas: 2
"""
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    f = ConfigFile.load(path, "fraud")
    assert f.places == [("args",), ("deployments", 0, "user_config")]
    assert f.model_settings() == {"model_uri": "models:/fraud/1", "format": "native"}
    new_text, new_doc, note = f.with_model({"model_uri": "models:/fraud/2", "format": "onnx",
                                            "convert_options": {"tolerance": 0.01}})
    assert note is None, new_text
    expected = yaml.safe_load(text)
    expected["applications"][1]["args"].update(model_uri="models:/fraud/2", format="onnx",
                                               convert_options={"tolerance": 0.01})
    expected["applications"][1]["deployments"][0]["user_config"].update(
        model_uri="models:/fraud/2", format="onnx", convert_options={"tolerance": 0.01})
    assert yaml.safe_load(new_text) == new_doc == expected
    # Everything but the edited values is kept as written: comments, quoting, the other app.
    assert "# fleet config" in new_text and "'models:/fraud/2'   # quoted" in new_text
    assert 'args: {model_uri: "models:/fraud/1"}   # another app' in new_text
    # Three inserted lines: format and convert_options in args, convert_options in user_config.
    assert new_text.count("\n") == text.count("\n") + 3
    f.write(new_text)
    assert path.read_text() == new_text and not list(tmp_path.glob(".serve.yaml.*"))

    # A flow-style app entry cannot take new keys in place: the file is re-written, and the report says so.
    path.write_text("applications: [{name: fraud, import_path: serving.examples:model_app, "
                    "args: {model_uri: models:/fraud/1}}]\n")
    new_text, new_doc, note = ConfigFile.load(path, "fraud").with_model({"model_uri": "models:/fraud/2",
                                                                          "format": "onnx"})
    assert note and "comments" in note
    assert yaml.safe_load(new_text)["applications"][0]["args"] == {"model_uri": "models:/fraud/2", "format": "onnx"}

    for content, words in (("applications: []\n", "no application named 'fraud'"),
                           ("applications:\n  - name: fraud\n    import_path: a.b:c\n", "keeps no model_uri"),
                           ("not: [valid", "not valid YAML"),
                           ("- 1\n", "applications")):
        path.write_text(content)
        with pytest.raises(BadURI, match=words):
            ConfigFile.load(path, "fraud")
    with pytest.raises(BadURI, match="no such Serve config file"):
        ConfigFile.load(tmp_path / "missing.yaml", "fraud")


def test_bad_usage_fails_before_touching_ray(tmp_path):
    from tests.helpers import assert_clean_error

    assert_clean_error(run_cli("rollout", APP, "--model-uri", "models:/fraud"), 2, "names no version")
    assert_clean_error(run_cli("rollout", APP, "--model-uri", "models:/fraud/1", "--mode", "rolling"), 2, "--mode")
    assert_clean_error(run_cli("rollout", APP, "--model-uri", "models:/fraud/1", "--mode", "redeploy"), 2, "--config")
    assert_clean_error(run_cli("rollout", APP, "--model-uri", "models:/fraud/1", "--mode", "redeploy", "--config",
                               str(tmp_path / "none.yaml")), 2, "no such Serve config file", "none.yaml")
    assert_clean_error(run_cli("watch", "models:/fraud/3", "--app", APP), 2, "can move")
    assert_clean_error(run_cli("watch", "models:/fraud@champion", "--app", APP, "--interval", "0"), 2, "--interval")


def test_old_import_paths_still_work_with_a_deprecation_warning():
    """prefetch.rollout / prefetch.watch moved to serving.control: one release of shims that say so."""
    code = """
import warnings
import serving.control.rollout, serving.control.watch
warnings.filterwarnings("error", category=DeprecationWarning, message=".* moved to ")
for old, new in (("prefetch.rollout", "serving.control.rollout"), ("prefetch.watch", "serving.control.watch")):
    try:
        __import__(old)
    except DeprecationWarning as w:
        assert str(w) == f"{old} moved to {new}", w
    else:
        raise SystemExit(f"importing {old} did not warn")
warnings.simplefilter("ignore")
import prefetch.rollout as r, prefetch.watch as w
assert r.rollout is serving.control.rollout.rollout and r.RolloutError is serving.control.rollout.RolloutError
assert w.watch is serving.control.watch.watch
print(r.describe_event("unchanged", {"label": "m v2"}))
print(w.describe_event("moved", {"uri": "models:/m@live", "from": "1", "to": "2"}))
"""
    proc = subprocess.run([PREFETCH[0], "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "every replica already serves m v2: nothing to do", lines
    assert lines[1].endswith(" models:/m@live moved: v1 -> v2") and lines[1][2] == ":", lines


# -- 5. hot swap that keeps the declarative config file in step ------------------------------------------------------
def _user_config_text(uri: str) -> str:
    return f"""\
# Serve config whose model lives in user_config (a hot swap keeps this comment)
applications:
  - name: {APP}
    route_prefix: {ROUTE}
    import_path: serving.examples:model_app
    deployments:
      - name: {DEPLOYMENT}
        num_replicas: 2
        ray_actor_options:
          num_cpus: 0.1
        user_config:
          model_uri: {uri}   # kept in step by prefetch rollout
"""


def test_hot_swap_with_config_writes_the_new_uri_into_the_file(on_rig, tmp_path):
    """`prefetch rollout APP --model-uri U --config FILE` in the default mode: the same replicas reconfigure (a hot
    swap), and FILE now names the pinned version, so a later `serve deploy FILE` does not roll the model back."""
    import yaml

    rig = on_rig
    config_file = tmp_path / "serve_config.yaml"
    config_file.write_text(_user_config_text(f"models:/{NAME}/1"))
    before = ensure_deployed(yaml.safe_load(config_file.read_text())["applications"][0], NAME, "1")
    proc, report = rollout_cli(rig, "--model-uri", f"models:/{NAME}@champion", "--config", str(config_file))
    assert proc.returncode == 0, proc.stderr
    assert report["ok"] and report["mode"] == "user_config" and report["switch"] == "reconfigure"
    from mlflow import MlflowClient

    newest = str(MlflowClient().get_model_version_by_alias(NAME, "champion").version)   # the registry's own answer
    text = config_file.read_text()
    assert f"model_uri: models:/{NAME}/{newest}   # kept in step by prefetch rollout" in text, text
    assert text.startswith("# Serve config whose model lives in user_config")
    assert yaml.safe_load(text) == yaml.safe_load(_user_config_text(f"models:/{NAME}/{newest}"))
    rows = wait_for(lambda: on_version(newest, name=NAME), what=f"the same replicas on v{newest}")
    assert {r["replica"] for r in rows} == {r["replica"] for r in before}, "a hot swap keeps the replicas"
    assert live_user_config()["model_uri"] == f"models:/{NAME}/{newest}"
