"""Issue B: Serve replicas load from the node-local path (real Ray Serve, requests over HTTP).

One Ray instance (and one Serve HTTP proxy on a free port) for the whole module. Replicas get their MLflow /
S3 settings and this test's PREFETCH_CACHE_DIR through runtime_env env_vars: workers inherit the environment
of ray.init(), not the test's.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from tests import harness
from tests.harness.mlflow_server import venv_bin
from tests.helpers import RequestLoop

NAME = harness.SEED_MODEL_NAME
LOOPBACK = "127.0.0.1"
pytestmark = pytest.mark.timeout(600)


# --- Ray + Serve (module) ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def serve_url():
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    # A fresh head of its own (never whatever cluster /tmp/ray/ray_current_cluster points at), its dashboard agent
    # on a port of its own: Ray's default (52365) is shared by every Ray head on this machine.
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=8, include_dashboard=False, object_store_memory=200 << 20,
        dashboard_agent_listen_port=harness.free_port()))
    try:
        ray.init(address=cluster.address, logging_level="WARNING", namespace="prefetch-test-serving")
        try:
            yield start_serve()
        finally:
            serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


def start_serve(attempts: int = 3) -> str:
    """Serve's HTTP proxy on a free loopback port; a port taken between the pick and the bind (by Ray's own
    processes or anyone else's on this shared machine) means another pick. Any other failure is raised."""
    import ray
    from ray import serve

    for attempt in range(attempts):
        port = harness.free_port()
        try:
            serve.start(http_options={"host": LOOPBACK, "port": port})
            return f"http://{LOOPBACK}:{port}"
        except ray.exceptions.RayError as e:   # the proxy actor's start failed: only a lost port race is retried
            if "Failed to bind" not in str(e) or attempt == attempts - 1:
                raise
            serve.shutdown()
    raise AssertionError("unreachable")


def replica_env(env: dict, cache_dir: Path) -> dict:
    return {"env_vars": {**env, "PREFETCH_CACHE_DIR": str(cache_dir), "MLFLOW_DISABLE_TELEMETRY": "true",
                         "PYTHONWARNINGS": "ignore"}}


def run_apps(*apps: tuple) -> None:
    """(app, name, route) each, deployed together (their replicas start concurrently)."""
    from ray import serve

    serve.run_many([serve.RunTarget(app, name=name, route_prefix=route) for app, name, route in apps])


def apply_config(apps: list[dict]) -> None:
    """What `serve deploy` does (declarative): a changed user_config is a reconfigure, not a restart."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema(applications=apps))


def model_app_config(name: str, route: str, uri: str, env: dict, replicas: int = 2) -> dict:
    return {"name": name, "route_prefix": route, "import_path": "serving.examples:model_app", "runtime_env": env,
            "deployments": [{"name": "Model", "num_replicas": replicas, "user_config": {"model_uri": uri},
                             "ray_actor_options": {"num_cpus": 0.1}}]}


def wait_for(predicate, timeout: float = 120.0, what: str = "condition", every: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def app_status(name: str) -> str | None:
    from ray import serve

    app = serve.status().applications.get(name)
    return None if app is None else str(app.status.value if hasattr(app.status, "value") else app.status)


def replicas_of(app: str) -> list[dict]:
    from serving import replica_status

    return replica_status(app)


def post(url: str, body: dict, timeout: float = 30) -> requests.Response:
    return requests.post(url, json=body, timeout=timeout)


def delete_app(name: str) -> None:
    from ray import serve

    serve.delete(name)


# --- the embedded registry's apps (shared by tests 1 and 2: replica start-up is the slow part) -------------
SWAP_APP, GUIDE_APP = "swap", "guide-format"


class EmbeddedApps:
    """Two apps deployed declaratively, as `serve deploy` would: "swap" (RegistryModel, MLflow scoring JSON)
    and "guide-format" (serving.examples:app, the guide's request format). Their replicas share one cache."""

    def __init__(self, env: dict, cache: Path):
        self.env, self.cache = env, cache

    def apply(self, uri: str, replicas: int = 2) -> None:
        guide = {"name": GUIDE_APP, "route_prefix": "/guide", "import_path": "serving.examples:app",
                 "runtime_env": self.env,
                 "deployments": [{"name": "SeedModel", "num_replicas": 1,
                                  "user_config": {"model_uri": f"models:/{NAME}@stable"},
                                  "ray_actor_options": {"num_cpus": 0.1}}]}
        apply_config([model_app_config(SWAP_APP, "/swap", uri, self.env, replicas), guide])


@pytest.fixture(scope="module")
def embedded_apps(serve_url, seed_embedded, tmp_path_factory):
    cache = tmp_path_factory.mktemp("serve-cache")
    apps = EmbeddedApps(replica_env(seed_embedded["env"], cache), cache)
    apps.apply(f"models:/{NAME}/1")
    try:
        wait_for(lambda: _all_replicas_on(SWAP_APP, "1", 2), timeout=240, what="2 replicas on v1")
        wait_for(lambda: app_status(SWAP_APP) == app_status(GUIDE_APP) == "RUNNING", timeout=240,
                 what="both apps RUNNING")
        yield apps
    finally:
        apply_config([])   # removes the declaratively deployed apps
        wait_for(lambda: app_status(SWAP_APP) is None and app_status(GUIDE_APP) is None, what="apps deleted")


# --- 1. answers over HTTP, same predictions as MLflow ----------------------------------------------------
def test_registry_model_answers_like_mlflow_pyfunc(serve_url, embedded_apps, seed_embedded, use_env):
    """MLflow's scoring formats in, {"predictions", "model", "version"} out, equal to pyfunc.load_model's."""
    import mlflow.pyfunc

    from tests.helpers import objects_in

    use_env(seed_embedded["env"])
    X = seed_embedded["X_test"][:7]
    expected = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(X)
    url = f"{serve_url}/swap"
    bodies = {
        "inputs": {"inputs": X.tolist()},
        "instances": {"instances": X.tolist()},
        "dataframe_split": {"dataframe_split": {"data": X.tolist()}},
        "dataframe_records": {"dataframe_records": [{str(i): v for i, v in enumerate(r)} for r in X.tolist()]},
    }
    for fmt, body in bodies.items():
        r = post(url, body)
        assert r.status_code == 200, (fmt, r.text)
        doc = r.json()
        assert doc["model"] == NAME and doc["version"] == "1" and "swap_error" not in doc, doc
        np.testing.assert_allclose(doc["predictions"], expected, rtol=1e-12, err_msg=fmt)

    # The guide's own request format, kept by a subclass overriding one method (models:/...@stable is v1).
    r = post(f"{serve_url}/guide", {"features": X.tolist()})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["prediction"], expected, rtol=1e-12)

    # A bad request is the caller's fault: 400 with one line, and the replica keeps answering.
    r = post(url, {"features": X.tolist()})
    assert r.status_code == 400 and "dataframe_split" in r.json()["error"], r.text
    assert post(url, bodies["inputs"]).status_code == 200

    # Which model a replica serves, over HTTP and from the driver (each replica publishes its status).
    info = requests.get(f"{url}/-/model", timeout=30).json()
    assert info["model"] == NAME and info["version"] == "1" and info["healthy"] and info["error"] is None
    assert Path(info["path"]).parent == embedded_apps.cache / "objects" and info["leased"] is True
    assert info["key"] in objects_in(embedded_apps.cache)
    rows = replicas_of(SWAP_APP)
    assert [(r["version"], r["key"]) for r in rows] == [("1", info["key"])] * 2
    assert info["replica"] in {r["replica"] for r in rows}


# --- 2. hot swap under load ----------------------------------------------------------------------------
def _all_replicas_on(app: str, version: str, n: int):
    rows = replicas_of(app)
    ok = len(rows) == n and all(r.get("version") == version for r in rows)
    return rows if ok else False


def test_hot_swap_under_load_and_failed_swaps_keep_serving(serve_url, embedded_apps, seed_embedded, embedded,
                                                           use_env, tmp_path):
    use_env(seed_embedded["env"])
    X = seed_embedded["X_test"][:3]
    url = f"{serve_url}/swap"
    broken_uri = _register_broken_version(embedded, tmp_path)
    embedded_apps.apply(f"models:/{NAME}/1")
    wait_for(lambda: _all_replicas_on(SWAP_APP, "1", 2), what="2 replicas on v1")
    replica_ids = {r["replica"] for r in replicas_of(SWAP_APP)}

    with RequestLoop(url, {"inputs": X.tolist()}, max_requests=5000, pause=0.01) as loop:
        time.sleep(1.0)
        embedded_apps.apply(f"models:/{NAME}/2")
        wait_for(lambda: _all_replicas_on(SWAP_APP, "2", 2), what="every replica on v2")
        swapped_at = time.monotonic()
        time.sleep(1.5)
    assert loop.failures() == [], loop.failures()[:5]
    before = [r for r in loop.results if r[0] < swapped_at]
    after = [r for r in loop.results if r[0] > swapped_at]
    assert {r[2] for r in before} <= {"1", "2"} and "1" in {r[2] for r in before}
    assert after and {r[2] for r in after} == {"2"}, {r[2] for r in after}
    # Same replicas: the swap was a reconfigure, not a restart.
    assert {r["replica"] for r in replicas_of(SWAP_APP)} == replica_ids
    expected_v2 = seed_embedded["expected"][2][:3]
    np.testing.assert_allclose(post(url, {"inputs": X.tolist()}).json()["predictions"], expected_v2)

    # A swap to a missing version, then to one whose artifacts are not a model: v2 keeps serving, the
    # failure is visible (status, answers), and Serve's health check does not restart anything.
    for bad, needle in ((f"models:/{NAME}/99", "99"), (broken_uri, "MLmodel")):
        with RequestLoop(url, {"inputs": X.tolist()}, max_requests=5000, pause=0.01) as loop:
            embedded_apps.apply(bad)
            rows = wait_for(lambda: all((r.get("error") or {}).get("uri") == bad for r in replicas_of(SWAP_APP))
                            and replicas_of(SWAP_APP), what=f"every replica to report the failed swap to {bad}")
            time.sleep(1.0)
        assert loop.failures() == [], loop.failures()[:5]
        assert {r[2] for r in loop.results} == {"2"}
        assert all(r["version"] == "2" and r["healthy"] and needle in r["error"]["message"] for r in rows), rows
        doc = post(url, {"inputs": X.tolist()}).json()
        assert doc["version"] == "2" and bad in doc["swap_error"], doc
        info = requests.get(f"{url}/-/model", timeout=30).json()
        assert info["version"] == "2" and info["error"]["uri"] == bad
        assert app_status(SWAP_APP) == "RUNNING"
        assert {r["replica"] for r in replicas_of(SWAP_APP)} == replica_ids

    # A replica that starts while user_config points at the broken version (scale-up, or a replica Serve
    # replaced) falls back to the deployment's last good model instead of failing to start.
    embedded_apps.apply(broken_uri, replicas=3)
    rows = wait_for(lambda: _all_replicas_on(SWAP_APP, "2", 3), timeout=240,
                    what="a third replica, on the last good v2")
    new = [r for r in rows if r["replica"] not in replica_ids]
    assert len(new) == 1 and new[0]["error"]["uri"] == broken_uri
    assert new[0]["history"][-1]["event"] == "fallback"
    wait_for(lambda: app_status(SWAP_APP) == "RUNNING", what="app RUNNING with 3 replicas")

    # And a good swap clears the error everywhere.
    embedded_apps.apply(f"models:/{NAME}/1", replicas=3)
    rows = wait_for(lambda: _all_replicas_on(SWAP_APP, "1", 3), what="every replica back on v1")
    assert all(r["error"] is None for r in rows)


def _register_broken_version(embedded, tmp_path: Path) -> str:
    """A registered version whose artifacts are not an MLflow model (no MLmodel): warms fine, cannot load."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    junk = embedded.artifacts_dir / f"broken-{tmp_path.name}"
    junk.mkdir(parents=True)
    (junk / "weights.bin").write_bytes(b"\0" * 1024)
    client = MlflowClient(tracking_uri=embedded.tracking_uri, registry_uri=embedded.tracking_uri)
    name = "serving-broken-model"
    try:
        client.create_registered_model(name)
    except MlflowException as e:   # registered by an earlier test of this session: fine, anything else is not
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = client.create_model_version(name, source=junk.as_uri())
    return f"models:/{name}/{mv.version}"


# --- 3. K replicas, one download ------------------------------------------------------------------------
K = 3


def _gets(s3, model_id: str, suffix: str = "") -> int:
    """GETs the S3 server answered for files of the model with this id (path-style request targets)."""
    paths = [target.split("?")[0] for method, target, _rng in s3.proxy.request_log() if method == "GET"]
    return sum(1 for p in paths if model_id in p and p.endswith(suffix))   # object GETs (listings: in the query)


def test_k_replicas_on_one_node_download_once(serve_url, seed_direct, s3, use_env, cache_dir):
    """Measured at the S3 server side: K RegistryModel replicas = one download; K replicas of the guide's
    deployment = K downloads. Both apps start at the same time, on different versions (so every GET can be
    told apart by its path): v1 for RegistryModel, v2 for the guide's deployment."""
    from serving.examples import MLflowModelDeployment, Model

    use_env(seed_direct["env"])
    env = replica_env(seed_direct["env"], cache_dir)
    opts = {"num_cpus": 0.1, "runtime_env": env}
    v1, v2 = seed_direct["versions"][0], seed_direct["versions"][1]
    weights = "model.skops"

    s3.reset_stats()
    run_apps((Model.options(num_replicas=K, user_config={"model_uri": f"models:/{NAME}/1"},
                            ray_actor_options=opts).bind(), "k-ours", "/k-ours"),
             (MLflowModelDeployment.options(num_replicas=K, ray_actor_options=opts).bind(
                 model_uri=f"models:/{NAME}/2"), "k-guide", "/k-guide"))
    try:
        rows = wait_for(lambda: _all_replicas_on("k-ours", "1", K), what=f"{K} replicas on v1")
        r = post(f"{serve_url}/k-guide", {"features": seed_direct["X_test"][:2].tolist()})
        assert r.status_code == 200, r.text
        stats = s3.stats()
    finally:
        delete_app("k-ours")
        delete_app("k-guide")
    key = rows[0]["key"]
    files = [f for f in (cache_dir / "objects" / key).rglob("*") if f.is_file() and f.name != ".prefetch.json"]
    size = sum(f.stat().st_size for f in files)
    ours, guide = _gets(s3, v1["model_id"], weights), _gets(s3, v2["model_id"], weights)
    print(f"\n{K} replicas each, one node: RegistryModel fetched {weights} {ours}x "
          f"({_gets(s3, v1['model_id'])} GETs for {len(files)} files); the guide's MLflowModelDeployment "
          f"{guide}x ({_gets(s3, v2['model_id'])} GETs); origin sent {stats['bytes_out']} bytes in all "
          f"(model: {size} bytes)")
    assert {r["key"] for r in rows} == {key} and len({r["replica"] for r in rows}) == K
    assert sum(1 for r in rows if not r["from_cache"]) == 1, rows   # one replica fetched, K-1 hit the cache
    assert _gets(s3, v1["model_id"]) == len(files), s3.proxy.request_log()   # each file exactly once
    assert ours == 1
    assert guide == K
    assert 0.9 * (1 + K) * size <= stats["bytes_out"] < 1.3 * (1 + K) * size   # v1 and v2 differ slightly


# --- 4. RegistryModel serving an ONNX conversion, with session options from user_config -------------------
def test_registry_model_serves_an_onnx_conversion_with_session_options(serve_url, seed_embedded, use_env,
                                                                       cache_dir):
    """user_config {format: onnx, session_options: {intra_op_num_threads: 1}}: the replica converts the seed
    RandomForest once (skl2onnx, float32) and answers over HTTP from the derived model, within the documented
    default tolerance of the test's own forest: 1e-4 x max(1, max |output|)."""
    from serving.examples import Model

    use_env(seed_embedded["env"])
    X = seed_embedded["X_test"]
    expected = seed_embedded["expected"][1]   # the forest the test trained for v1 (seed 0), not the converter's
    config = {"model_uri": f"models:/{NAME}/1", "format": "onnx", "session_options": {"intra_op_num_threads": 1}}
    run_apps((Model.options(num_replicas=1, user_config=config, ray_actor_options={
        "num_cpus": 0.1, "runtime_env": replica_env(seed_embedded["env"], cache_dir)}).bind(), "onnx", "/onnx"))
    try:
        r = post(f"{serve_url}/onnx", {"inputs": X.tolist()})
        assert r.status_code == 200, r.text
        doc = r.json()
        info = requests.get(f"{serve_url}/onnx/-/model", timeout=30).json()
    finally:
        delete_app("onnx")
    assert (doc["model"], doc["version"]) == (NAME, "1") and "swap_error" not in doc, doc
    tolerance = 1e-4 * max(1.0, float(np.max(np.abs(expected))))
    got = np.asarray(doc["predictions"], dtype=float).reshape(-1)
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) <= tolerance, (np.max(np.abs(got - expected)), tolerance)
    # ...and it is the conversion that answered, not the native forest (float32 rounding shows).
    assert not np.array_equal(got, expected)
    assert info["format"] == "onnx" and info["version"] == "1" and info["error"] is None, info
    # The status route shows the model URI and format of user_config, nothing else (no secrets at rest or in
    # output: issue H), so the session options are not echoed back.
    assert info["config"] == {"model_uri": f"models:/{NAME}/1", "format": "onnx"}, info["config"]
    derived = Path(info["path"])
    assert derived.parent.parent == cache_dir / "derived" and derived.name.startswith("onnx-"), derived


# --- 5. scripts/serve_config.yaml through the real `serve deploy` CLI, on a real `ray start --head` ---------
def _serve_cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([venv_bin("serve"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _wait_running(address: str, env: dict, app: str, timeout: float = 300.0) -> None:
    """`serve status` (the real CLI) until the app is RUNNING; DEPLOY_FAILED or a failing CLI fails now."""
    import yaml

    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        proc = _serve_cli("status", "--address", address, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        status = ((yaml.safe_load(proc.stdout) or {}).get("applications") or {}).get(app) or {}
        assert status.get("status") != "DEPLOY_FAILED", status
        if status.get("status") == "RUNNING":
            return
        time.sleep(1.0)
    raise AssertionError(f"app {app} not RUNNING in {timeout:.0f}s: {status}")


def _wait_for_answer(url: str, body: dict, check, timeout: float = 120.0) -> dict:
    """POST to a RUNNING app until `check(answer)` holds (a hot swap in progress); any non-200 fails now."""
    deadline = time.monotonic() + timeout
    doc = None
    while time.monotonic() < deadline:
        r = requests.post(url, json=body, timeout=30)
        assert r.status_code == 200, (r.status_code, r.text)
        doc = r.json()
        if check(doc):
            return doc
        time.sleep(0.5)
    raise AssertionError(f"no matching answer from {url} in {timeout:.0f}s (last: {doc!r})")


def _ray_start_head(tmp_path: Path, env: dict, attempts: int = 2) -> tuple:
    """(process, dashboard port, temp dir) of a real `ray start --head --block` with every port and its temp dir of
    its own, once it says it started. Retried once with fresh ports: on this loaded 2-core machine a raylet may miss
    Ray's own start-up deadline ("The current node timed out during startup"); the second failure is raised."""
    import shutil
    import tempfile

    for attempt in range(attempts):
        gcs, dashboard, agent, agent_grpc, client_server, metrics, runtime_env, manager, objects = \
            harness.free_ports(9)
        temp_dir = tempfile.mkdtemp(prefix="pf-sd-", dir="/tmp")   # short: Ray's socket paths stay under 108 bytes
        head = harness.ManagedProcess(
            [venv_bin("ray"), "start", "--head", "--block", "--node-ip-address", LOOPBACK, "--port", str(gcs),
             "--include-dashboard", "true", "--dashboard-host", LOOPBACK, "--dashboard-port", str(dashboard),
             "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
             "--ray-client-server-port", str(client_server), "--metrics-export-port", str(metrics),
             "--runtime-env-agent-port", str(runtime_env), "--node-manager-port", str(manager),
             "--object-manager-port", str(objects), "--temp-dir", temp_dir, "--num-cpus", "2",
             "--memory", str(4 << 30), "--object-store-memory", str(100 << 20), "--disable-usage-stats"],
            tmp_path / f"ray-head-{attempt}.log", env=env, cwd=tmp_path, name="ray-head")
        head.start()
        deadline = time.monotonic() + 240
        while "Ray runtime started" not in head.log_tail(200) and head.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        if "Ray runtime started" in head.log_tail(200):
            return head, dashboard, temp_dir
        head.stop(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if attempt == attempts - 1 or "timed out during startup" not in head.log_tail(200):
            raise AssertionError(f"ray start --head did not start:\n{head.log_tail()}")
    raise AssertionError("unreachable")


def test_serve_config_yaml_through_serve_deploy_on_a_ray_start_head(seed_embedded, use_env, cache_dir, tmp_path):
    """The README's way: `ray start --head` (token auth on, since a token exists in ~/.ray), then
    `RAY_AUTH_MODE=token serve deploy scripts/serve_config.yaml`; without RAY_AUTH_MODE the deploy is refused.
    Then the hot swap the file describes: model_uri changed under user_config, `serve deploy` again."""
    import shutil

    from tests.helpers import REPO

    use_env(seed_embedded["env"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}   # HOME: this test's own
    subprocess.run([venv_bin("ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                   timeout=120)
    assert (Path(env["HOME"]) / ".ray" / "auth_token").is_file()
    config = tmp_path / "serve_config.yaml"
    text = (REPO / "scripts" / "serve_config.yaml").read_text()
    assert text.count("port: 8000") == 1
    http = harness.free_port()
    config.write_text(text.replace("port: 8000", f"port: {http}"))   # the only change: a free port
    head, dashboard, temp_dir = _ray_start_head(tmp_path, {**env, "PREFETCH_CACHE_DIR": str(cache_dir)})
    try:
        address = f"http://{LOOPBACK}:{dashboard}"
        refused = _serve_cli("deploy", "--address", address, str(config), env=env)
        assert refused.returncode != 0 and "Token authentication is enabled" in refused.stderr, \
            refused.stdout + refused.stderr
        print(f"\nserve deploy without RAY_AUTH_MODE: exit {refused.returncode}: "
              f"{(refused.stderr or refused.stdout).strip().splitlines()[-1]}")
        token_env = {**env, "RAY_AUTH_MODE": "token"}
        deployed = _serve_cli("deploy", "--address", address, str(config), env=token_env)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        X = seed_embedded["X_test"][:5]
        url = f"http://{LOOPBACK}:{http}/"
        champion = seed_embedded["expected"][2][:5]   # @champion is v2
        _wait_running(address, token_env, "seed")
        r = requests.post(url, json={"features": X.tolist()}, timeout=30)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["prediction"], champion, rtol=1e-12)
        info = requests.get(f"{url}-/model", timeout=30).json()
        assert (info["model"], info["version"], info["format"]) == (NAME, "2", "native"), info
        assert Path(info["path"]).parent == cache_dir / "objects"

        # The hot swap the file's comment describes: only model_uri under user_config changes.
        config.write_text(config.read_text().replace(f"models:/{NAME}@champion", f"models:/{NAME}@stable"))
        swapped = _serve_cli("deploy", "--address", address, str(config), env=token_env)
        assert swapped.returncode == 0, swapped.stdout + swapped.stderr
        stable = seed_embedded["expected"][1][:5]
        _wait_for_answer(url, {"features": X.tolist()}, lambda d: np.allclose(d["prediction"], stable, rtol=1e-12))
        deadline = time.monotonic() + 120
        while (info := requests.get(f"{url}-/model", timeout=30).json())["version"] != "1":
            assert time.monotonic() < deadline, info
            time.sleep(0.5)
        # A reconfigure of a running replica (a new one would have "loaded", not "swapped"), v2 -> v1.
        last = info["history"][-1]
        assert (last["event"], last["from"], last["to"]) == ("swapped", "2", "1"), info["history"]
    finally:
        head.stop(timeout=30)   # the process group of our own `ray start --block`: its raylet, GCS, workers
        shutil.rmtree(temp_dir, ignore_errors=True)
