"""Node agents on a real multi-node Ray cluster (ray.cluster_utils.Cluster), artifacts in real S3 behind MLflow.

Each simulated node has its own cache directory, declared by the node label `prefetch-cache-dir` (the same rule
a real node uses for its NVMe). Origin bytes are measured at S3 (the counting proxy in front of SeaweedFS).

Order matters (one cluster for the module): warm --cluster, a killed agent, a replica through its agent,
in-flight progress, a failing node, then the daemon (which leaves a controller running until teardown).
"""
from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from prefetch.store import Store
from tests import harness
from tests.helpers import assert_clean_error, run_cli

NAME = "prefetch-cluster-rf"
LABEL = "prefetch-cache-dir"
NODE_ARGS = dict(num_cpus=1, object_store_memory=100 << 20)
WIDE = {"COLUMNS": "250"}      # rich tables on one line per row, so a row can be checked as a line


# -- the state machine, without Ray ----------------------------------------------------------------------------
class FakeWrapper:
    """Scripted answers for AgentState/AgentStateManager (the reason AgentWrapper is an interface)."""

    def __init__(self, node_id, node_ip, ready=(True,), healthy=(True,)):
        self.node_id, self.node_ip = node_id, node_ip
        self.ready_answers, self.healthy_answers = list(ready), list(healthy)
        self.info, self.error, self.dead, self.killed = None, None, False, False

    actor_id = property(lambda self: f"fake-{self.node_id}")
    handle = None

    def is_ready(self, timeout_s):
        return self.ready_answers.pop(0) if self.ready_answers else True

    def is_healthy(self, timeout_s):
        answer = self.healthy_answers.pop(0) if self.healthy_answers else True
        if answer is False:
            self.error = "no answer"
        return answer

    def kill(self):
        self.killed = True


def test_agent_state_machine_without_ray(monkeypatch):
    from prefetch.cluster import state
    from prefetch.cluster.state import AgentStateManager, AgentStatus

    monkeypatch.setattr(state, "HEALTH_CHECK_PERIOD_S", 0.0)
    made: list[FakeWrapper] = []
    scripts = {"a": dict(ready=(None, True)), "b": dict(ready=(False,)), "c": dict(healthy=(True, False, False, False))}

    def factory(node_id, node_ip):
        w = FakeWrapper(node_id, node_ip, **scripts.get(node_id, {}))
        scripts.pop(node_id, None)          # a replacement agent answers normally
        made.append(w)
        return w

    m = AgentStateManager(factory)
    m.update({"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"})
    assert {n: s.status for n, s in m.states.items()} == {n: AgentStatus.STARTING for n in "abc"}
    m.update({"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"})
    # a: readiness pending; b: failed to start -> replaced at once (restart count 1); c: ready.
    assert m.states["a"].status == AgentStatus.STARTING
    assert m.states["b"].status == AgentStatus.STARTING and m.states["b"].restart_count == 1
    assert "replaced" in m.states["b"].error            # a table says why this node's agent is not ready yet
    assert made[1].killed
    assert m.states["c"].status == AgentStatus.HEALTHY
    for _ in range(5):
        m.update({"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"})
    # c failed 3 health checks in a row -> unhealthy -> replaced (and the new one answered); a and b healthy.
    assert made[2].killed and m.states["c"].restart_count == 1
    assert m.settled(["a", "b", "c"])
    # A node that left: its agent is dropped (and killed); nothing else changes.
    m.update({"a": "10.0.0.1", "c": "10.0.0.3"})
    assert set(m.states) == {"a", "c"}
    # A dead actor is unhealthy at the first failed check, not after the threshold.
    dead = m.states["a"].wrapper
    dead.healthy_answers, dead.dead = [False], True
    m.update({"a": "10.0.0.1", "c": "10.0.0.3"})
    assert dead.killed and m.states["a"].restart_count == 1


def test_daemon_bad_input_fails_before_touching_ray(tmp_path):
    assert_clean_error(run_cli("daemon"), 2, "PREFETCH_MODELS")
    assert_clean_error(run_cli("daemon", "--models-file", str(tmp_path / "none.txt")), 2, "none.txt")
    (tmp_path / "models.txt").write_text("# the fleet\nmodels:/fraud@champion\nmodels:/fraud\n")
    assert_clean_error(run_cli("daemon", "--models-file", str(tmp_path / "models.txt")), 2, "models:/fraud")
    assert_clean_error(run_cli("daemon", "--interval", "0", env={"PREFETCH_MODELS": "models:/a/1"}), 2, "--interval")


# -- the cluster ------------------------------------------------------------------------------------------------
class Rig:
    def __init__(self, cluster, env, seed, root: Path):
        self.cluster, self.env, self.seed, self.root = cluster, env, seed, root
        self.dirs: dict[str, Path] = {}     # node_id -> its cache dir

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self, name: str, cache_dir: Path | None = None):
        """A node with its own cache dir, started in the registry's environment (its raylet and workers inherit
        it, as on a real node). Retried once: on a loaded 2-core machine a raylet may miss Ray's 30 s start-up."""
        cache_dir = cache_dir or (self.root / name)
        args = dict(NODE_ARGS, labels={LABEL: str(cache_dir)})
        with harness.mlflow_env(self.env):
            for attempt in range(2):
                if self.cluster.head_node is None:
                    # A head's dashboard agent listens on 52365 by default: another Ray head on this shared machine
                    # (anyone's ray.init()) makes ours die at start-up. Worker nodes already get a random port.
                    args |= {"include_dashboard": False, "dashboard_agent_listen_port": harness.free_port()}
                try:
                    node = self.cluster.add_node(**args)
                    break
                except Exception:
                    if attempt:
                        raise
        self.dirs[node.node_id] = cache_dir
        return node

    def store(self, node_id: str) -> Store:
        return Store(self.dirs[node_id])


@pytest.fixture(scope="module")
def rig(s3, mlflow_direct, tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    env = mlflow_direct.env()
    seed = harness.register_seed_versions(env, name=NAME, n_versions=1)
    if ray.is_initialized():
        ray.shutdown()
    r = Rig(Cluster(initialize_head=False), env, seed, tmp_path_factory.mktemp("nodes"))
    try:
        for name in ("head", "worker-1", "worker-2"):
            r.add_node(name)
        yield r
    finally:
        try:
            from prefetch.cluster import clear_desired

            clear_desired(r.address)
        except Exception:
            pass
        ray.shutdown()
        r.cluster.shutdown()


@pytest.fixture
def on_rig(rig, use_env):
    """The test process connected to the rig's cluster, with the registry's environment."""
    from prefetch.cluster import connect

    use_env(rig.env)
    connect(rig.address)
    return rig


def _uri(version: int) -> str:
    return f"models:/{NAME}/{version}"


def _bytes_out(s3) -> int:
    return s3.stats()["bytes_out"]


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def test_warm_cluster_puts_a_verified_copy_on_every_node(on_rig, s3):
    import ray

    from prefetch.cluster import get_agent

    before = _bytes_out(s3)
    report = json.loads(run_cli("warm", _uri(1), "--cluster", "--address", on_rig.address, "--json", check=True).stdout)
    origin = _bytes_out(s3) - before
    rows = report["rows"]
    assert report["ok"] and report["nodes"] == 3 and len(rows) == 3, report
    assert {r["node_id"] for r in rows} == set(on_rig.dirs)
    key, size = rows[0]["key"], rows[0]["bytes"]
    for r in rows:
        assert r["ok"] and r["key"] == key and not r["hit"] and r["version"] == "1"
        assert Path(r["cache_dir"]) == on_rig.dirs[r["node_id"]] and Path(r["path"]).parent == on_rig.dirs[r["node_id"]] / "objects"
        assert on_rig.store(r["node_id"]).verify(key) == []               # sizes and sha256 against the manifest
    # Each agent verifies its own copy too (the agent is a shell over prefetch.api.verify).
    for node_id in on_rig.dirs:
        reports = ray.get(get_agent(node_id).verify.remote(key))
        assert [(v["key"], v["ok"], v["bad"]) for v in reports] == [(key, True, [])]
    print(f"\norigin bytes for the cluster: {origin} for 3 nodes x {size} bytes (measured at S3)")
    assert report["origin_bytes"] == 3 * size
    assert 3 * size <= origin < 3 * size * 1.2

    status = json.loads(run_cli("status", "--address", on_rig.address, "--json", check=True).stdout)
    assert status["ok"] and len(status["nodes"]) == 3
    for n in status["nodes"]:
        assert n["agent"] == "HEALTHY" and n["objects"] == 1 and n["bytes"] == size and n["inflight"] == []
        assert Path(n["cache_dir"]) == on_rig.dirs[n["node_id"]]
        assert any(w["key"] == key and w["caller"] == "prefetch warm --cluster" for w in n["recent"])
        # Each agent serves its node's Prometheus metrics: its own download, and the node's store.
        with urllib.request.urlopen(n["metrics_url"], timeout=10) as r:
            samples = dict(ln.rsplit(" ", 1) for ln in r.read().decode().splitlines() if ln and ln[0] != "#")
        assert float(samples["prefetch_cache_misses_total"]) == 1 and float(samples["prefetch_objects"]) == 1
        assert float(samples["prefetch_origin_bytes_total"]) == size


def test_killed_agent_is_recreated_and_finds_its_cache_intact(on_rig, s3):
    import ray

    from prefetch.cluster import get_agent
    from prefetch.cluster import warm_cluster

    victim = next(n for n in on_rig.dirs if n != ray.get_runtime_context().get_node_id())
    old = get_agent(victim)
    old_id = old._actor_id.hex()
    ray.kill(old)
    before = s3.stats()
    report = warm_cluster([_uri(1)], address=on_rig.address)
    after = s3.stats()
    assert report["ok"], report
    new = get_agent(victim)
    assert new is not None and new._actor_id.hex() != old_id
    assert all(r["hit"] and r["origin_bytes"] == 0 for r in report["rows"]), report["rows"]
    print(f"\nafter the kill: origin bytes {after['bytes_out'] - before['bytes_out']}, "
          f"S3 requests {after['requests'] - before['requests']}")
    assert after["bytes_out"] - before["bytes_out"] == 0 and after["requests"] - before["requests"] == 0


def test_a_replica_on_a_node_goes_through_that_nodes_agent(on_rig):
    """serving.load_model calls warm_via_local_agent: the agent downloads, the replica reads the same directory."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from prefetch.cluster import get_agent

    node_id = sorted(on_rig.dirs)[-1]
    storage = on_rig.seed["versions"][0]["artifact_location"]          # s3://...: not cached anywhere yet

    @ray.remote(num_cpus=0)
    def replica(uri):
        import prefetch
        from prefetch.cluster.agent import warm_via_local_agent

        via_agent = warm_via_local_agent(uri)
        local = prefetch.warm(uri)                                      # what the replica's own process sees
        return str(prefetch.Settings.load().cache_dir), via_agent, local

    cache_dir, via_agent, local = ray.get(replica.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(storage))
    assert Path(cache_dir) == on_rig.dirs[node_id]                      # the node label, not PREFETCH_CACHE_DIR
    assert via_agent is not None and not via_agent.from_cache and via_agent.origin_bytes == via_agent.bytes
    assert local.from_cache and local.path == via_agent.path and local.key == via_agent.key
    assert str(via_agent.path).startswith(str(on_rig.dirs[node_id]))
    recent = ray.get(get_agent(node_id).status.remote())["recent"]
    assert any(w["key"] == via_agent.key and not w["hit"] and w["caller"] != "prefetch warm --cluster" for w in recent)

    # A library error crosses the actor boundary as itself (the loader's error handling sees a NotFound).
    from prefetch.errors import NotFound

    @ray.remote(num_cpus=0)
    def missing():
        from prefetch.cluster.agent import warm_via_local_agent

        try:
            warm_via_local_agent(f"models:/{NAME}/99")
        except NotFound as e:
            return f"NotFound: {e}"
        return "no error"

    answer = ray.get(missing.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote())
    assert answer.startswith("NotFound") and f"{NAME}/99" in answer


def test_status_shows_inflight_downloads_with_progress(on_rig):
    """A download in progress on a node (any process's staging dir) shows with its progress: the bytes already
    allocated in the staging dir over the declared size (a sparse .part file counts only what was written)."""
    node_id = sorted(on_rig.dirs)[0]
    staging = on_rig.dirs[node_id] / "staging" / "fake-model--0123456789abcdef.cafe0001"
    staging.mkdir(parents=True)
    total = 4 << 20
    try:
        (staging / ".inflight.json").write_text(json.dumps({
            "uri": "models:/fake/7", "key": "fake-model--0123456789abcdef", "bytes": total,
            "pid": os.getpid(), "started_at": time.time() - 5}))
        with open(staging / "weights.bin.part", "wb") as f:   # truncated to full size up front, 1/4 written
            f.truncate(total)
            f.write(os.urandom(total // 4))
            f.flush()
            os.fsync(f.fileno())
        status = json.loads(run_cli("status", "--address", on_rig.address, "--json", check=True).stdout)
        node = next(n for n in status["nodes"] if n["node_id"] == node_id)
        [inflight] = node["inflight"]
        assert inflight["uri"] == "models:/fake/7" and inflight["bytes"] == total and inflight["alive"]
        # Allocated blocks, not st_size (4 MiB): a quarter written is a quarter done (ext4 allocates exactly).
        assert total // 4 <= inflight["done"] < total // 2 and 0.25 <= inflight["progress"] < 0.5
        assert status["inflight"] == 1
        human = run_cli("status", "--address", on_rig.address, env=WIDE)
        assert human.returncode == 0 and "models:/fake/7 25%" in human.stderr, human.stderr
    finally:
        import shutil

        shutil.rmtree(staging)


def test_a_failing_node_shows_in_the_table_and_the_exit_code(on_rig, tmp_path):
    from prefetch.cluster import alive_nodes, ensure_agents, warm_cluster

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the node's cache dir should be")
    bad = on_rig.add_node("bad", cache_dir=blocker / "cache")
    try:
        report = warm_cluster([_uri(1)], address=on_rig.address)
        assert not report["ok"] and report["exit_code"] == 1 and report["failed"] == 1, report
        [failed] = [r for r in report["rows"] if not r["ok"]]
        assert failed["node_id"] == bad.node_id and "Not a directory" in failed["error"]
        assert all(r["hit"] for r in report["rows"] if r["ok"]) and len(report["rows"]) == 4

        proc = run_cli("warm", _uri(1), "--cluster", "--address", on_rig.address, env=WIDE)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        line = next(ln for ln in proc.stderr.splitlines() if bad.node_id[:12] in ln)
        assert "FAILED" in line and "Not a directory" in proc.stderr
        assert "3/4 ok on 4 nodes" in proc.stderr
    finally:
        on_rig.cluster.remove_node(bad)
        on_rig.dirs.pop(bad.node_id, None)
    # The dead node's agent is dropped by the next reconcile; the others are untouched.
    _wait_for(lambda: {n.node_id for n in alive_nodes()} == set(on_rig.dirs), 60, "the removed node to leave")
    states = ensure_agents(on_rig.address)
    assert set(states) == set(on_rig.dirs) and all(s.status.value == "HEALTHY" for s in states.values())


def test_daemon_keeps_new_nodes_and_moved_aliases_warm(on_rig, s3):
    """`prefetch daemon` declares a desired set and returns; then, with no command from anyone, a node that joins
    gets it, and when the alias moves every node fetches the new version (interval 2 s)."""
    import ray

    from prefetch.store import lifecycle
    from prefetch.cluster import get_agent
    from prefetch.cluster import CONTROLLER_NAME

    alias = f"models:/{NAME}@champion"
    once = json.loads(run_cli("daemon", "--once", "--address", on_rig.address, "--json",
                              env={"PREFETCH_MODELS": alias}, check=True).stdout)
    assert once["ok"] and once["mode"] == "once" and [(r["hit"], r["version"]) for r in once["rows"]] == [(True, "1")]
    v1_key = once["rows"][0]["key"]

    declared = json.loads(run_cli("daemon", "--address", on_rig.address, "--interval", "2", "--json",
                                  env={"PREFETCH_MODELS": alias}, check=True).stdout)
    assert declared["ok"] and declared["controller"] == CONTROLLER_NAME and declared["uris"] == [alias]

    def kept(node_id, version):
        """The row of the node's last desired-set pass for the alias, once it is ok at `version`."""
        handle = get_agent(node_id)
        if handle is None:
            return None
        try:
            results = ray.get(handle.status.remote(), timeout=10)["desired"]["results"]
        except Exception:
            return None
        return next((r for r in results if r["uri"] == alias and r["ok"] and r["version"] == str(version)), None)

    # Every node keeps champion (v1 now) warm and pinned.
    for node_id in list(on_rig.dirs):
        row = _wait_for(lambda: kept(node_id, 1), 90, f"champion on {node_id[:12]}")
        assert row["key"] == v1_key and lifecycle.is_pinned(on_rig.dirs[node_id], v1_key)

    # A node that joins later: no command; the controller starts its agent and hands it the set.
    before = _bytes_out(s3)
    late = on_rig.add_node("late")
    _wait_for(lambda: kept(late.node_id, 1), 120, "the late node to be warmed")
    store = on_rig.store(late.node_id)
    assert store.verify(v1_key) == [] and lifecycle.is_pinned(store.root, v1_key)
    size = store.lookup(v1_key, touch=False).bytes
    late_origin = _bytes_out(s3) - before
    print(f"\nlate node: origin bytes {late_origin} for one copy of {size} bytes (measured at S3)")
    assert size <= late_origin < size * 1.2

    # The alias moves to a new version: every node warms it within the interval, pins it, unpins the old one.
    before = _bytes_out(s3)
    v2 = harness.register_seed_versions(on_rig.env, name=NAME, n_versions=1)["versions"][0]["version"]
    rows = {node_id: _wait_for(lambda: kept(node_id, v2), 90, f"v{v2} on {node_id[:12]}") for node_id in on_rig.dirs}
    origin = _bytes_out(s3) - before
    v2_key = rows[late.node_id]["key"]
    assert v2_key != v1_key and {r["key"] for r in rows.values()} == {v2_key}
    for node_id in on_rig.dirs:
        store = on_rig.store(node_id)
        assert store.verify(v2_key) == []
        assert lifecycle.is_pinned(store.root, v2_key) and not lifecycle.is_pinned(store.root, v1_key)
    v2_size = store.lookup(v2_key, touch=False).bytes
    n = len(on_rig.dirs)
    print(f"alias moved: origin bytes for the cluster {origin} = {n} nodes x {v2_size} bytes (measured at S3)")
    assert n * v2_size <= origin < n * v2_size * 1.2

    status = json.loads(run_cli("status", "--address", on_rig.address, "--json", check=True).stdout)
    assert status["controller"]["uris"] == [alias] and len(status["nodes"]) == n
    assert all(node["desired"]["uris"] == [alias] for node in status["nodes"])


_TOKEN_CLUSTER = """
import sys
from ray.cluster_utils import Cluster
c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, object_store_memory=100 << 20, include_dashboard=False,
                                                     dashboard_agent_listen_port=int(sys.argv[1])))
print(c.address, flush=True)
sys.stdin.read()          # until the test closes our stdin
c.shutdown()
"""


def test_cli_reaches_a_token_auth_cluster_by_address(tmp_path):
    """Ray 2.60: a head started with a token refuses clients without one, and Ray's client turns token mode on by
    itself only for address "auto". `prefetch ... --address` asks the GCS first and switches to token mode when
    it must: RAY_AUTH_TOKEN alone is enough; a wrong token or none fails in one line, fast."""
    import subprocess
    import sys

    token = "0123456789abcdef" * 4
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    proc = subprocess.Popen([sys.executable, "-c", _TOKEN_CLUSTER, str(harness.free_port())],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    try:
        address = proc.stdout.readline().strip()
        assert address, "the token cluster did not start"
        no_mode = {"RAY_AUTH_MODE": "", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "no-token-here")}
        ok = run_cli("status", "--address", address, "--json", env=no_mode | {"RAY_AUTH_TOKEN": token})
        assert ok.returncode == 0, ok.stderr
        doc = json.loads(ok.stdout)
        assert doc["ok"] and [n["agent"] for n in doc["nodes"]] == ["HEALTHY"]
        wrong = run_cli("status", "--address", address, env=no_mode | {"RAY_AUTH_TOKEN": "f" * 64})
        assert_clean_error(wrong, 4, "refused our auth token")
    finally:
        proc.stdin.close()
        proc.wait(timeout=120)
