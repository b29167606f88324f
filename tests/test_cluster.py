"""Node agents on a real multi-node Ray cluster (ray.cluster_utils.Cluster), artifacts in real S3 behind MLflow.

Each simulated node has its own cache directory, declared by the node label `prefetch-cache-dir` (the same rule
a real node uses for its NVMe). Origin bytes are measured at S3 (the counting proxy in front of SeaweedFS).

One cluster for the module, but no test depends on another: each one warms what it needs (a test that needs a
cold cache registers a model of its own), removes the nodes it adds and clears the desired set it declares
(`on_rig` checks that no controller is left behind), so `pytest tests/test_cluster.py::test_x` runs alone.
Rig nodes carry a decoy PREFETCH_CACHE_DIR in their environment: the label must win over it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from prefetch.store import Store
from tests import harness
from tests.harness.ray_rig import LABEL, Rig, wait_for as _wait_for
from tests.helpers import assert_clean_error, run_cli

NAME = "prefetch-cluster-rf"
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
        # Errors here are the tests' business (a controller nobody can stop): reported as a teardown error.
        from prefetch.cluster import clear_desired

        with harness.mlflow_env(env):
            clear_desired(r.address)
    finally:
        ray.shutdown()
        r.cluster.shutdown()


@pytest.fixture
def on_rig(rig, use_env):
    """The test process connected to the rig's cluster, with the registry's environment. A test that declared a
    desired set clears it: none may be left to the next test."""
    from prefetch.cluster import connect, get_controller

    use_env(rig.env)
    connect(rig.address)
    yield rig
    assert get_controller() is None, "the test left a controller (and a desired set) running"


def _uri(version: int, name: str = NAME) -> str:
    return f"models:/{name}/{version}"


def _bytes_out(s3) -> int:
    return s3.stats()["bytes_out"]


def _s3_bytes(s3, location: str) -> int:
    """The bytes stored at S3 under an s3://bucket/prefix location (what the test registered, counted at S3)."""
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    total = 0
    for page in s3.client(endpoint=s3.direct_endpoint).get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        total += sum(o["Size"] for o in page.get("Contents", []))
    return total


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in r.read().decode().splitlines()
                                         if ln and ln[0] != "#")}


def _agent_desired(node_id: str) -> dict | None:
    """The node's agent's desired-set status, or None while it has no agent or does not answer within 10 s."""
    import ray
    from ray.exceptions import GetTimeoutError

    from prefetch.cluster import get_agent

    handle = get_agent(node_id)
    if handle is None:
        return None
    try:
        return ray.get(handle.status.remote(), timeout=10)["desired"]
    except GetTimeoutError:
        return None


def _kept(node_id: str, uri: str, version) -> dict | None:
    """The row of the node's last desired-set pass for uri, once it is ok at `version`."""
    desired = _agent_desired(node_id)
    rows = desired["results"] if desired else []
    return next((r for r in rows if r["uri"] == uri and r["ok"] and r["version"] == str(version)), None)


def _actor_id(handle) -> str:
    return handle._actor_id.hex()


def test_warm_cluster_puts_a_verified_copy_on_every_node(on_rig, s3):
    import ray

    from prefetch.cluster import get_agent

    fresh = harness.register_seed_versions(on_rig.env, name=f"{NAME}-fanout", n_versions=1)["versions"][0]
    uri = _uri(fresh["version"], f"{NAME}-fanout")                      # cached nowhere yet
    size = _s3_bytes(s3, fresh["artifact_location"])
    status = json.loads(run_cli("status", "--address", on_rig.address, "--json", check=True).stdout)
    metrics_before = {n["node_id"]: _metrics(n["metrics_url"]) for n in status["nodes"]}

    # --no-peers: each node downloads its own copy from the origin (tests/test_peers.py: the shared way, and this
    # way again as its control).
    before = _bytes_out(s3)
    report = json.loads(run_cli("warm", uri, "--cluster", "--no-peers", "--address", on_rig.address, "--json",
                                check=True).stdout)
    origin = _bytes_out(s3) - before
    rows = report["rows"]
    assert report["ok"] and report["nodes"] == 3 and len(rows) == 3, report
    assert {r["node_id"] for r in rows} == set(on_rig.dirs)
    key = rows[0]["key"]
    for r in rows:
        assert r["ok"] and r["key"] == key and not r["hit"] and r["version"] == str(fresh["version"])
        assert r["bytes"] == size                                         # what S3 holds for that version
        assert Path(r["cache_dir"]) == on_rig.dirs[r["node_id"]] and Path(r["path"]).parent == on_rig.dirs[r["node_id"]] / "objects"
        assert on_rig.store(r["node_id"]).verify(key) == []               # sizes and sha256 against the manifest
        assert not (on_rig.decoy(r["node_id"]) / "objects").exists()      # the label won over PREFETCH_CACHE_DIR
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
        on_disk = on_rig.store(n["node_id"]).manifests()
        assert n["agent"] == "HEALTHY" and n["inflight"] == []
        assert n["objects"] == len(on_disk) and n["bytes"] == sum(m.bytes for m in on_disk)
        assert Path(n["cache_dir"]) == on_rig.dirs[n["node_id"]]
        assert any(w["key"] == key and w["caller"] == "prefetch warm --cluster" for w in n["recent"])
        # Each agent serves its node's Prometheus metrics: this warm's download, and the node's store.
        after, was = _metrics(n["metrics_url"]), metrics_before[n["node_id"]]
        assert after["prefetch_cache_misses_total"] - was.get("prefetch_cache_misses_total", 0) == 1
        assert after["prefetch_origin_bytes_total"] - was.get("prefetch_origin_bytes_total", 0) == size
        assert after["prefetch_objects"] == len(on_disk)


def _counting_wrapper():
    """The real Ray-backed wrapper, counting the failed health checks each agent answered (to see the rule work)."""
    from prefetch.cluster import ActorAgentWrapper

    class CountingWrapper(ActorAgentWrapper):
        def __init__(self, node_id, node_ip=None):
            super().__init__(node_id, node_ip)
            self.failed_checks = 0

        def is_healthy(self, timeout_s):
            answer = super().is_healthy(timeout_s)
            self.failed_checks += answer is False
            return answer

    return CountingWrapper


def _tick_until(manager, predicate, timeout: float, what: str):
    """Run the reconcile state machine on the real cluster, one update per 0.2 s, until predicate() holds."""
    from prefetch.cluster import alive_nodes
    from prefetch.cluster.node import node_map

    def tick():
        manager.update(node_map(alive_nodes()))
        return predicate()

    return _wait_for(tick, timeout, what, poll=0.2)


def test_killed_or_failing_agent_is_replaced_healthy_and_finds_its_cache_intact(on_rig, s3):
    """The state machine's rules on the real cluster (the same AgentStateManager the controller runs): a killed agent
    is dead at its first failed check and replaced; a live agent failing its health check (its desired-set loop
    stopped) is replaced after UNHEALTHY_THRESHOLD failed checks in a row. Each replacement is a new actor, HEALTHY,
    and the node's disk is all it needed: nothing is downloaded again."""
    import ray

    from prefetch.cluster import AgentStateManager, get_agent, warm_cluster
    from prefetch.cluster.state import UNHEALTHY_THRESHOLD

    assert warm_cluster([_uri(1)], address=on_rig.address)["ok"]         # this test's own setup
    manager = AgentStateManager(_counting_wrapper())
    _tick_until(manager, lambda: manager.settled(on_rig.dirs), 180, "every agent to answer")
    here = ray.get_runtime_context().get_node_id()
    killed, failing = sorted(n for n in on_rig.dirs if n != here)

    def replaced(node_id, old):
        state = manager.states.get(node_id)
        return state if state and state.wrapper is not old and state.status.value == "HEALTHY" else None

    old = manager.states[killed].wrapper
    ray.kill(old.handle, no_restart=True)
    state = _tick_until(manager, lambda: replaced(killed, old), 120, "the killed agent to be replaced")
    assert old.dead and old.failed_checks == 1 and state.restart_count >= 1
    assert state.wrapper.actor_id != old.actor_id and _actor_id(get_agent(killed)) == state.wrapper.actor_id
    assert ray.get(get_agent(killed).ready.remote())["cache_dir"] == str(on_rig.dirs[killed])

    old = manager.states[failing].wrapper
    ray.get(old.handle.shutdown.remote())                                # alive, but check_health() says False
    state = _tick_until(manager, lambda: replaced(failing, old), 120, "the failing agent to be replaced")
    assert not old.dead and old.failed_checks == UNHEALTHY_THRESHOLD and state.restart_count >= 1
    assert "desired-set loop stopped" in state.previous_error and state.wrapper.actor_id != old.actor_id
    assert all(s.status.value == "HEALTHY" for s in manager.states.values())

    before = s3.stats()
    report = warm_cluster([_uri(1)], address=on_rig.address)
    after = s3.stats()
    assert report["ok"], report
    assert all(r["hit"] and r["origin_bytes"] == 0 for r in report["rows"]), report["rows"]
    print(f"\nafter the replacements: origin bytes {after['bytes_out'] - before['bytes_out']}, "
          f"S3 requests {after['requests'] - before['requests']}")
    assert after["bytes_out"] - before["bytes_out"] == 0 and after["requests"] - before["requests"] == 0


def test_an_agent_that_fails_its_start_is_replaced_and_reported(on_rig):
    """A node whose prefetch settings cannot load (PREFETCH_MAX_CONCURRENCY is not a number): its agent's ready()
    fails, so it is UNHEALTHY at once and replaced (restart count grows), and tables say why; other nodes fine."""
    from prefetch.cluster import ensure_agents

    bad = on_rig.add_node("bad-settings", env={"PREFETCH_MAX_CONCURRENCY": "many"})
    try:
        states = ensure_agents(on_rig.address, timeout=30)
        state = states[bad.node_id]
        assert state.status.value != "HEALTHY" and state.restart_count >= 1, state.to_dict()
        assert "'many'" in state.error, state.to_dict()
        assert all(s.status.value == "HEALTHY" for n, s in states.items() if n != bad.node_id)
        proc = run_cli("status", "--address", on_rig.address, env=WIDE)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        line = next(ln for ln in proc.stderr.splitlines() if bad.node_id[:12] in ln)
        assert "HEALTHY" not in line and "many" in proc.stderr, proc.stderr
    finally:
        on_rig.remove_node(bad)
    states = ensure_agents(on_rig.address)
    assert set(states) == set(on_rig.dirs) and all(s.status.value == "HEALTHY" for s in states.values())


def test_a_replica_loads_through_its_nodes_agent(on_rig):
    """What a replica does: serving.load_model in a Ray actor pinned to a node. The node's agent downloads (its
    record names the replica), the replica loads from the node's cache dir."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from prefetch.cluster import ensure_agents, get_agent

    node_id = sorted(on_rig.dirs)[-1]
    assert ensure_agents(on_rig.address)[node_id].status.value == "HEALTHY"
    storage = on_rig.seed["versions"][0]["artifact_location"]          # s3://...: only this test warms it
    replica_name = f"replica-{os.getpid()}-{time.monotonic_ns()}"

    @ray.remote(num_cpus=0)
    class Replica:
        def __init__(self, uri):
            import serving

            self.loaded = serving.load_model(uri)

        def where(self):
            import prefetch

            w = self.loaded.warmed
            return {"cache_dir": str(prefetch.Settings.load().cache_dir), "path": str(w.path), "key": w.key,
                    "hit": w.from_cache, "leased": self.loaded.lease is not None}

    pinned = NodeAffinitySchedulingStrategy(node_id, soft=False)
    replica = Replica.options(name=replica_name, scheduling_strategy=pinned).remote(storage)
    try:
        where = ray.get(replica.where.remote())
    finally:
        ray.kill(replica)
    assert Path(where["cache_dir"]) == on_rig.dirs[node_id]            # the node label
    assert Path(where["path"]).parent == on_rig.dirs[node_id] / "objects" and where["leased"]
    recent = ray.get(get_agent(node_id).status.remote())["recent"]
    mine = [w for w in recent if w["caller"] == replica_name]
    assert [(w["key"], w["ok"], w["hit"]) for w in mine] == [(where["key"], True, False)], recent

    # A library error crosses the actor boundary as itself (the loader's error handling sees a NotFound).
    @ray.remote(num_cpus=0)
    def missing():
        import serving
        from prefetch.errors import NotFound

        try:
            serving.load_model(f"models:/{NAME}/99")
        except NotFound as e:
            return f"NotFound: {e}"
        return "no error"

    answer = ray.get(missing.options(scheduling_strategy=pinned).remote())
    assert answer.startswith("NotFound") and f"{NAME}/99" in answer


def test_status_shows_a_real_inflight_download_with_progress(on_rig, s3, tmp_path):
    """A real `prefetch warm` into a node's cache dir, over a link throttled to 1 MiB/s: while it runs, `status`
    shows it in flight (alive, 0 < progress < 1); once it ended, nothing is in flight on that node."""
    from prefetch.store.paths import INFLIGHT

    node_id = sorted(on_rig.dirs)[0]
    size = 40 << 20
    prefix = f"inflight-{time.monotonic_ns()}"
    blob = tmp_path / "weights.bin"
    harness.write_random_file(blob, size, seed=7)
    s3.client(endpoint=s3.direct_endpoint).upload_file(str(blob), "models", f"{prefix}/weights.bin")
    uri = f"s3://models/{prefix}"
    slow = harness.LinkProxy("127.0.0.1", s3.s3_port, rate_bytes_per_s=1 << 20).start()
    env = {**os.environ, **s3.env(slow.url), "PREFETCH_CACHE_DIR": str(on_rig.dirs[node_id]),
           "PREFETCH_MAX_CONCURRENCY": "1", "PREFETCH_MULTIPART_THRESHOLD": str(1 << 30)}
    proc = subprocess.Popen([sys.executable, "-m", "prefetch.cli", "warm", uri, "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        staging = on_rig.dirs[node_id] / "staging"

        def started():
            assert proc.poll() is None, proc.communicate()
            # Declared, and some bytes already on disk (allocated blocks: what status counts as done).
            return any((d / INFLIGHT).is_file() and any(p.stat().st_blocks for p in (d / "data").rglob("*")
                                                         if p.is_file())
                       for d in staging.glob("*")) if staging.is_dir() else False

        _wait_for(started, 120, "the first bytes of the download", poll=0.2)
        status = json.loads(run_cli("status", "--address", on_rig.address, "--json", check=True).stdout)
        human = run_cli("status", "--address", on_rig.address, env=WIDE)
        assert proc.poll() is None, "the download ended before status looked: slow the link down"
        node = next(n for n in status["nodes"] if n["node_id"] == node_id)
        [inflight] = node["inflight"]
        assert inflight["uri"] == uri and inflight["bytes"] == size and inflight["pid"] == proc.pid
        assert inflight["alive"] and 0 < inflight["done"] < size and 0 < inflight["progress"] < 1, inflight
        assert status["inflight"] == 1
        assert human.returncode == 0 and re.search(rf"{re.escape(uri)} \d+%", human.stderr), human.stderr
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert json.loads(out)["results"][0]["ok"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        slow.stop()
    status = json.loads(run_cli("status", "--address", on_rig.address, "--json", check=True).stdout)
    node = next(n for n in status["nodes"] if n["node_id"] == node_id)
    assert node["inflight"] == [] and status["inflight"] == 0


def test_a_failing_node_shows_in_the_table_and_the_exit_code(on_rig, tmp_path):
    from prefetch.cluster import ensure_agents, warm_cluster

    assert warm_cluster([_uri(1)], address=on_rig.address)["ok"]         # this test's own setup
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
        on_rig.remove_node(bad)
    # The dead node's agent is dropped by the next reconcile; the others are untouched.
    states = ensure_agents(on_rig.address)
    assert set(states) == set(on_rig.dirs) and all(s.status.value == "HEALTHY" for s in states.values())


def test_cache_dir_rules_without_the_label(on_rig, tmp_path):
    """A node without the label: PREFETCH_CACHE_DIR of the node's environment; without that either,
    ~/.cache/prefetch of the node's HOME. (The label winning over the variable: every rig node, see the rig.)"""
    from prefetch.cluster import get_agent, warm_cluster

    env_dir = tmp_path / "env-cache"
    home = tmp_path / "node-home"
    home.mkdir()
    by_env = on_rig.add_node("by-env", label=False, env={"PREFETCH_CACHE_DIR": str(env_dir)}, expect=env_dir)
    by_home = on_rig.add_node("by-home", label=False, env={"PREFETCH_CACHE_DIR": None, "HOME": str(home)},
                              expect=home / ".cache" / "prefetch")
    try:
        report = warm_cluster([_uri(1)], address=on_rig.address)
        assert report["ok"], report
        rows = {r["node_id"]: r for r in report["rows"]}
        for node, expected in ((by_env, env_dir), (by_home, home / ".cache" / "prefetch")):
            row = rows[node.node_id]
            assert Path(row["cache_dir"]) == expected and Path(row["path"]).parent == expected / "objects", row
            assert Store(expected).verify(row["key"]) == []
            import ray

            assert ray.get(get_agent(node.node_id).ready.remote())["cache_dir"] == str(expected)
    finally:
        on_rig.remove_node(by_env)
        on_rig.remove_node(by_home)


def test_daemon_models_file_then_clear(on_rig, tmp_path):
    """A models file with comments and blank lines declares exactly its URIs, on the controller and every agent
    (warmed and pinned); `prefetch daemon --clear` makes the controller and the agents forget the set and unpin
    it, while the cached objects stay."""
    import ray

    from prefetch.store import lifecycle
    from prefetch.cluster import get_agent, get_controller

    stable = f"models:/{NAME}@stable"
    wanted = [_uri(1), stable]
    models = tmp_path / "models.txt"
    models.write_text(f"# what every node keeps warm\n\n{_uri(1)}\n   \n{stable}   # the alias too\n# {_uri(99)}\n")
    declared = json.loads(run_cli("daemon", "--models-file", str(models), "--interval", "2", "--address",
                                  on_rig.address, "--json", check=True).stdout)
    try:
        assert declared["ok"] and declared["uris"] == wanted
        assert ray.get(get_controller().desired.remote())["uris"] == wanted
        rows = {}
        for node_id in on_rig.dirs:
            rows[node_id] = [_wait_for(lambda: _kept(node_id, uri, 1), 120, f"{uri} on {node_id[:12]}")
                             for uri in wanted]
            assert _agent_desired(node_id)["uris"] == wanted
            assert all(lifecycle.is_pinned(on_rig.dirs[node_id], r["key"]) for r in rows[node_id])
    finally:
        cleared = json.loads(run_cli("daemon", "--clear", "--address", on_rig.address, "--json", check=True).stdout)
    assert cleared["ok"] and cleared["controller_stopped"] and cleared["agents_cleared"] == len(on_rig.dirs)
    _wait_for(lambda: get_controller() is None, 60, "the controller to go")
    for node_id, node_rows in rows.items():
        assert ray.get(get_agent(node_id).desired.remote())["uris"] == []
        for r in node_rows:
            assert not lifecycle.is_pinned(on_rig.dirs[node_id], r["key"])
            assert on_rig.store(node_id).verify(r["key"]) == []          # the cached objects stay


def test_controller_replaces_a_dead_agent_and_recovers_its_set_after_a_restart(on_rig):
    """With a declared set and no command from anyone: a killed agent comes back (a new actor, on its node) and gets
    the set; a killed controller is restarted by Ray and takes the set back from the agents."""
    import ray

    from prefetch.cluster import CONTROLLER_NAME, get_agent, get_controller

    uri = _uri(1)
    declared = json.loads(run_cli("daemon", "--interval", "2", "--address", on_rig.address, "--json",
                                  env={"PREFETCH_MODELS": uri}, check=True).stdout)
    try:
        assert declared["ok"] and declared["controller"] == CONTROLLER_NAME
        for node_id in on_rig.dirs:
            _wait_for(lambda: _kept(node_id, uri, 1), 120, f"the set on {node_id[:12]}")
        victim = next(n for n in on_rig.dirs if n != declared["node_id"])   # not the node the daemon ran on
        old_id = _actor_id(get_agent(victim))
        ray.kill(get_agent(victim), no_restart=True)

        def replaced():
            handle = get_agent(victim)
            if handle is None or _actor_id(handle) == old_id:
                return None
            desired = _agent_desired(victim)
            return desired if desired and desired["uris"] == [uri] else None

        _wait_for(replaced, 120, "the controller to replace the killed agent and hand it the set")
        assert _wait_for(lambda: _kept(victim, uri, 1), 60, "the new agent's pass")

        controller = get_controller()
        before = ray.get(controller.desired.remote())
        ray.kill(controller, no_restart=False)                           # Ray restarts it: a fresh Controller()

        def recovered():
            try:
                doc = ray.get(get_controller().desired.remote(), timeout=10)
            except ray.exceptions.RayActorError:                        # restarting
                return None
            # Until the kill lands, the old controller answers with the declaration itself (its updated_at).
            return doc if doc["uris"] == [uri] and doc["updated_at"] != before["updated_at"] else None

        after = _wait_for(recovered, 120, "the restarted controller to take the set back")
        # Taken from an agent: the agents' copy of the set (their own updated_at), not the original declaration.
        assert after["updated_at"] in {_agent_desired(n)["updated_at"] for n in on_rig.dirs}
    finally:
        run_cli("daemon", "--clear", "--address", on_rig.address, check=True)
    _wait_for(lambda: get_controller() is None, 60, "the controller to go")


def test_daemon_keeps_new_nodes_and_moved_aliases_warm(on_rig, s3):
    """`prefetch daemon` declares a desired set and returns; then, with no command from anyone, a node that joins
    gets it, and when the alias moves every node fetches the new version (interval 2 s)."""
    from prefetch.store import lifecycle
    from prefetch.cluster import CONTROLLER_NAME, get_controller

    name = f"{NAME}-daemon"
    v1 = harness.register_seed_versions(on_rig.env, name=name, n_versions=1)["versions"][0]["version"]
    alias = f"models:/{name}@champion"
    once = json.loads(run_cli("daemon", "--once", "--address", on_rig.address, "--json",
                              env={"PREFETCH_MODELS": alias}, check=True).stdout)
    assert once["ok"] and once["mode"] == "once" and [(r["hit"], r["version"]) for r in once["rows"]] == [(False, str(v1))]
    v1_key = once["rows"][0]["key"]

    declared = json.loads(run_cli("daemon", "--address", on_rig.address, "--interval", "2", "--json",
                                  env={"PREFETCH_MODELS": alias}, check=True).stdout)
    late = None
    try:
        assert declared["ok"] and declared["controller"] == CONTROLLER_NAME and declared["uris"] == [alias]

        # Every node keeps champion (v1 now) warm and pinned.
        for node_id in list(on_rig.dirs):
            row = _wait_for(lambda: _kept(node_id, alias, v1), 90, f"champion on {node_id[:12]}")
            assert row["key"] == v1_key and lifecycle.is_pinned(on_rig.dirs[node_id], v1_key)

        # A node that joins later: no command; the controller starts its agent and hands it the set.
        # A node that joins later: no command; the controller starts its agent and hands it the set; its agent
        # takes the model's chunks from the nodes that have it (peers are on by default), not from the origin.
        before = _bytes_out(s3)
        late = on_rig.add_node("late")
        late_row = _wait_for(lambda: _kept(late.node_id, alias, v1), 120, "the late node to be warmed")
        store = on_rig.store(late.node_id)
        assert store.verify(v1_key) == [] and lifecycle.is_pinned(store.root, v1_key)
        size = store.lookup(v1_key, touch=False).bytes
        late_origin = _bytes_out(s3) - before
        print(f"\nlate node: origin bytes {late_origin} for one copy of {size} bytes (measured at S3)")
        assert (late_row["origin_bytes"], late_row["peer_bytes"]) == (0, size)
        assert late_origin < size * 0.2           # the registry's listing and metadata, no artifact bytes

        # The alias moves to a new version: every node warms it within the interval, pins it, unpins the old one.
        before = _bytes_out(s3)
        v2 = harness.register_seed_versions(on_rig.env, name=name, n_versions=1)["versions"][0]["version"]
        assert v2 != v1
        rows = {node_id: _wait_for(lambda: _kept(node_id, alias, v2), 90, f"v{v2} on {node_id[:12]}")
                for node_id in on_rig.dirs}
        origin = _bytes_out(s3) - before
        v2_key = rows[late.node_id]["key"]
        assert v2_key != v1_key and {r["key"] for r in rows.values()} == {v2_key}
        for node_id in on_rig.dirs:
            store = on_rig.store(node_id)
            assert store.verify(v2_key) == []
            assert lifecycle.is_pinned(store.root, v2_key) and not lifecycle.is_pinned(store.root, v1_key)
        v2_size = store.lookup(v2_key, touch=False).bytes
        n = len(on_rig.dirs)
        print(f"alias moved: origin bytes for the cluster {origin} for {n} nodes x {v2_size} bytes (measured at S3)")
        assert v2_size <= origin < v2_size * 1.3  # one download for the cluster, the rest from peers

        status = json.loads(run_cli("status", "--address", on_rig.address, "--json", check=True).stdout)
        assert status["controller"]["uris"] == [alias] and len(status["nodes"]) == n
        assert all(node["desired"]["uris"] == [alias] for node in status["nodes"])
    finally:
        run_cli("daemon", "--clear", "--address", on_rig.address, check=True)
        _wait_for(lambda: get_controller() is None, 60, "the controller to go")
        if late is not None:
            on_rig.remove_node(late)


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
    it must: RAY_AUTH_TOKEN alone is enough (RAY_AUTH_MODE unset, or set to ""); a wrong token, no token at all
    or a closed port fails in one line, exit 4."""
    token = "0123456789abcdef" * 4
    assert not any(k.startswith("RAY_AUTH") for k in os.environ)        # the per-test isolation: all unset
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-c", _TOKEN_CLUSTER, str(harness.free_port())],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    try:
        address = proc.stdout.readline().strip()
        assert address, "the token cluster did not start"
        for mode in ({}, {"RAY_AUTH_MODE": ""}):                       # unset, then empty
            ok = run_cli("status", "--address", address, "--json", env=mode | {"RAY_AUTH_TOKEN": token})
            assert ok.returncode == 0, (mode, ok.stderr)
            doc = json.loads(ok.stdout)
            assert doc["ok"] and [n["agent"] for n in doc["nodes"]] == ["HEALTHY"]
        assert_clean_error(run_cli("status", "--address", address, env={"RAY_AUTH_TOKEN": "f" * 64}),
                           4, "refused our auth token")
        # No token anywhere (no RAY_AUTH_TOKEN, no RAY_AUTH_TOKEN_PATH, this test's HOME has no ~/.ray/auth_token).
        assert_clean_error(run_cli("status", "--address", address), 4, "requires token auth", address)
    finally:
        proc.stdin.close()
        proc.wait(timeout=120)
    closed = f"127.0.0.1:{harness.free_port()}"
    assert_clean_error(run_cli("status", "--address", closed), 4, "no Ray cluster answers there", closed)


# -- scripts/node-startup.sh: a real head and worker started by `ray start` -------------------------------------
def _session_pids(sid: int) -> list[int]:
    """Every process of the session `sid` (a process we started with start_new_session=True, and what it started:
    Ray's `ray start` moves its daemons to their own process group, not to another session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid:                                        # field 6 of stat: the session id
            pids.append(int(entry.name))
    return pids


def _kill_session(sid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)


_PRINT_LABELS = """
import json, logging, sys
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
print(json.dumps([n.get("Labels") or {} for n in ray.nodes() if n.get("Alive")]))
"""


def test_node_startup_script_starts_a_head_and_a_worker_that_keep_the_set(mlflow_direct, s3, tmp_path):
    """`scripts/node-startup.sh head` and `... worker HEAD:PORT`: `ray start` with the node's cache dir as its
    label, then `prefetch daemon` in the background; both nodes end up with an agent, their own cache dir and the
    models file's set warm on disk, with no other command."""
    seed = harness.register_seed_versions(mlflow_direct.env(), name=f"{NAME}-startup", n_versions=1)
    uri = _uri(seed["versions"][0]["version"], f"{NAME}-startup")
    ray_tmp = Path(tempfile_short())
    models = tmp_path / "models.txt"
    models.write_text(f"# the fleet\n{uri}\n")
    dirs = {"head": tmp_path / "head-cache", "worker": tmp_path / "worker-cache"}
    port = harness.free_port()
    address = f"127.0.0.1:{port}"
    base_env = {**os.environ, **mlflow_direct.env(), "RAY_TMPDIR": str(ray_tmp),
                "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
                "PREFETCH_MODELS_FILE": str(models), "PREFETCH_INTERVAL": "2", "PREFETCH_WAIT_SECONDS": "240"}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", f"--object-store-memory={100 << 20}",
              "--disable-usage-stats"]
    script = Path(__file__).resolve().parent.parent / "scripts" / "node-startup.sh"
    sessions: list[int] = []
    logs = {}
    try:
        for role, extra in (("head", ["head", f"--port={port}", "--include-dashboard=false",
                                      f"--ray-client-server-port={harness.free_port()}"]),
                            ("worker", ["worker", address])):
            logs[role] = tmp_path / f"{role}-daemon.log"
            env = base_env | {"PREFETCH_CACHE_DIR": str(dirs[role]), "PREFETCH_LOG": str(logs[role])}
            for attempt in range(2):
                p = subprocess.Popen(["bash", str(script), *extra, *common,
                                      f"--dashboard-agent-listen-port={harness.free_port()}",
                                      f"--metrics-export-port={harness.free_port()}"],
                                     env=env, start_new_session=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
                sessions.append(p.pid)
                out, _ = p.communicate(timeout=300)
                # Ray gives a raylet 30 s to register: on a loaded 2-core machine it may miss that once (as in the
                # rig's add_node). Only that is retried, after stopping what the failed start left.
                if p.returncode != 0 and not attempt and "timed out during startup" in out:
                    _kill_session(p.pid)
                    continue
                break
            assert p.returncode == 0, out                              # the script returns once Ray is up

        def warm_on(role):
            store = Store(dirs[role])
            return [m for m in store.manifests() if store.verify(m.key) == []] if (dirs[role] / "objects").is_dir() else []

        _wait_for(lambda: warm_on("head") and warm_on("worker"), 300, "the models file's set on both nodes")
        status = json.loads(run_cli("status", "--address", address, "--json", check=True).stdout)
        assert sorted(Path(n["cache_dir"]) for n in status["nodes"]) == sorted(dirs.values())
        assert all(n["agent"] == "HEALTHY" and n["objects"] == 1 for n in status["nodes"])
        assert status["controller"]["uris"] == [uri]
        for role in dirs:
            assert "desired set declared" in logs[role].read_text()
        # The cache dir comes from each node's label (the script also sets PREFETCH_CACHE_DIR, to the same dir).
        labels = subprocess.run([sys.executable, "-c", _PRINT_LABELS, address], env=base_env, capture_output=True,
                                text=True, timeout=300, check=True).stdout
        assert sorted(Path(n[LABEL]) for n in json.loads(labels)) == sorted(dirs.values())
    finally:
        for sid in reversed(sessions):
            _kill_session(sid)
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not [pid for sid in sessions for pid in _session_pids(sid)]


def tempfile_short() -> str:
    """A short temp dir of this test's own for Ray (its unix socket paths must stay under 108 bytes)."""
    import tempfile

    return tempfile.mkdtemp(prefix="pf-ns-", dir="/tmp")
