"""Issue E: zero-downtime model updates (`prefetch rollout`, `prefetch watch`) on a real Ray cluster + real Serve.

One 2-node Ray cluster (ray.cluster_utils) for the module, each node with its own cache dir (node label), started
in the embedded registry's environment (sqlite + local artifacts: every process on this machine reads the same
files). Serve's HTTP proxy runs on the head only, on a free port; one app (2 replicas of serving.RegistryModel)
is switched back and forth. Requests go over HTTP from a thread while each rollout runs.

Order matters (one app for the module): hot swap v1 -> v2, failed rollouts (v2 untouched), a rolling redeploy
v1 -> v2 from a config file, then the watch follows an alias through a registry outage.
"""
from __future__ import annotations

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

    env = embedded.env()
    seed = harness.register_seed_versions(env, name=NAME, n_versions=2)   # champion -> v2, stable -> v1
    if ray.is_initialized():
        ray.shutdown()
    root = tmp_path_factory.mktemp("rollout-nodes")
    cluster = Cluster(initialize_head=False)
    dirs = {}
    try:
        # Nodes start in the registry's environment (raylets, agents and replicas inherit it, as on a real node).
        with harness.mlflow_env(env):
            for name, cpus in (("head", 2), ("worker", 1)):
                args = dict(num_cpus=cpus, object_store_memory=100 << 20, labels={LABEL: str(root / name)})
                if name == "head":
                    args["include_dashboard"] = False
                node = cluster.add_node(**args)
                dirs[node.node_id] = root / name
        from prefetch.cluster import connect

        connect(cluster.address)
        port = harness.free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": LOOPBACK, "port": port})
        yield Rig(cluster, env, seed, f"http://{LOOPBACK}:{port}{ROUTE}", dirs, embedded)
    finally:
        try:
            serve.shutdown()
        except Exception:
            pass
        try:
            from prefetch.cluster import clear_desired

            clear_desired(cluster.address)
        except Exception:
            pass
        ray.shutdown()
        cluster.shutdown()


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


def on_version(version: str, n: int = 2):
    rows = replicas()
    ok = len(rows) == n and all(r.get("version") == version for r in rows) and details()["status"] == "RUNNING"
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


def ensure_app(uri: str) -> list[dict]:
    """The app running on `uri` (user_config), 2 replicas on its version."""
    version = uri.rsplit("/", 1)[1]
    deploy(app_config(uri))
    return wait_for(lambda: on_version(version), what=f"2 replicas on v{version}")


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
    before = wait_for(lambda: on_version("2"), what="2 replicas on v2")
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
    deploy(yaml.safe_load(config_file.read_text())["applications"][0])
    before = wait_for(lambda: on_version("1"), what="2 new replicas on v1 from the config file")
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


# -- 4. watch ------------------------------------------------------------------------------------------------------
class Lines:
    """A subprocess's stderr, line by line, collected by a thread."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, needle: str, timeout: float = 120.0, start: int = 0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, line in enumerate(self.lines[start:], start):
                if needle in line:
                    return i
            time.sleep(0.1)
        raise AssertionError(f"no line with {needle!r} in {timeout:.0f}s:\n" + "\n".join(self.lines[-30:]))


def test_watch_follows_an_alias_through_a_registry_outage(on_rig):
    from mlflow import MlflowClient

    rig = on_rig
    wait_for(lambda: on_version("2"), what="2 replicas on v2")
    others = bystander()
    client = MlflowClient(tracking_uri=rig.embedded.tracking_uri, registry_uri=rig.embedded.tracking_uri)
    client.set_registered_model_alias(NAME, "live", "2")
    db = rig.embedded.db_path
    # NullPool: the watch opens the registry's database afresh for every poll (so it sees the outage below).
    env = {**os.environ, "MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool", "COLUMNS": "250"}
    proc = subprocess.Popen([*PREFETCH, "watch", f"models:/{NAME}@live", "--app", APP, "--interval", "1",
                             "--max-rollouts", "1", "--address", rig.address], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = Lines(proc.stderr)
    try:
        out.wait_for("in sync: app serves v2")
        # A registry outage: the database file is unreadable for a while (swapped for junk), then comes back.
        saved = db.with_name(db.name + ".saved")
        os.replace(db, saved)
        try:
            db.write_bytes(b"this is not a database" * 100)
            first_error = out.wait_for("registry error", timeout=60)
        finally:
            os.replace(saved, db)
        moved_at = time.monotonic()
        client.set_registered_model_alias(NAME, "live", "1")
        rows = wait_for(lambda: on_version("1"), timeout=300, what="every replica on v1 after the alias moved")
        seconds = time.monotonic() - moved_at
        print(f"\nalias moved -> all {len(rows)} replicas on the new version: {seconds:.1f}s "
              f"(poll interval 1s; outage survived: {out.lines[first_error]!r})")
        assert proc.wait(timeout=120) == 0, "\n".join(out.lines)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    text = "\n".join(out.lines)
    print(text)
    assert "moved: v2 -> v1" in text and "v1 rolled out" in text, text
    assert "stopped (max_rollouts): 1 rollouts, 0 failed" in text, text
    assert live_user_config()["model_uri"] == f"models:/{NAME}/1"
    assert all(r["from_cache"] for r in rows), rows
    assert bystander() == others


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
    deploy(yaml.safe_load(config_file.read_text())["applications"][0])
    before = wait_for(lambda: on_version("1"), what="2 replicas on v1 from the config file")
    proc, report = rollout_cli(rig, "--model-uri", f"models:/{NAME}@champion", "--config", str(config_file))
    assert proc.returncode == 0, proc.stderr
    assert report["ok"] and report["mode"] == "user_config" and report["switch"] == "reconfigure"
    from mlflow import MlflowClient

    newest = str(MlflowClient().get_model_version_by_alias(NAME, "champion").version)   # the registry's own answer
    text = config_file.read_text()
    assert f"model_uri: models:/{NAME}/{newest}   # kept in step by prefetch rollout" in text, text
    assert text.startswith("# Serve config whose model lives in user_config")
    assert yaml.safe_load(text) == yaml.safe_load(_user_config_text(f"models:/{NAME}/{newest}"))
    rows = wait_for(lambda: on_version(newest), what=f"the same replicas on v{newest}")
    assert {r["replica"] for r in rows} == {r["replica"] for r in before}, "a hot swap keeps the replicas"
    assert live_user_config()["model_uri"] == f"models:/{NAME}/{newest}"
