"""Peer-to-peer warm on a real 4-node Ray cluster (ray.cluster_utils.Cluster), artifacts in real S3 (SeaweedFS).

Origin bytes are counted at the S3 side (the counting proxy in front of SeaweedFS), never by the code under test.
Each node has its own cache dir (node label); every node runs with 1 MiB chunks (so a ~11 MiB model is a swarm of
a dozen chunks) and a 5 s peer timeout. A test that needs the transfer to last (a node removed or frozen mid-way)
caps the registry's uplink: one rate shared by every connection, as a registry's link is shared by a cluster.

The swarm book's rules (who fetches what from the origin, claims that expire, peers routed around) are tested
first without Ray.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import uuid
from pathlib import Path

import pytest

from prefetch.store import Store, allocated_bytes
from tests.harness.ray_rig import Rig, wait_for
from tests.helpers import assert_clean_error, objects_in, run_cli

MiB = 1 << 20
# 1 MiB chunks: a ~11 MiB model is a swarm of 16. A rate floor of 1 KiB/s: the tests that slow the uplink to keep
# a transfer going (a node removed or joining meanwhile) share it among ~20 connections.
NODE_ENV = {"PREFETCH_CHUNK_BYTES": "1MiB", "PREFETCH_PEER_TIMEOUT": "5", "PREFETCH_MIN_RATE": "1KiB"}
WIDE = {"COLUMNS": "250"}


# -- the swarm book, without Ray ---------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_swarm_book_spreads_the_origin_and_routes_around_faults():
    from prefetch.cluster.swarm import HEARTBEAT_TTL, SwarmBook, chunk_id

    clock = Clock()
    book = SwarmBook(clock)
    key, grid = "k", MiB
    chunks = [chunk_id("w.bin", 8 * MiB, "e1", i) for i in range(8)]
    for node in ("a", "b"):
        book.join(key, grid, node, concurrency=4)
    # Two nodes of concurrency 4: each may fetch 2 chunks from the origin at once, and never the same one.
    assert [book.route(key, grid, "a", c)["from"] for c in chunks[:3]] == ["origin", "origin", "wait"]
    assert book.route(key, grid, "b", chunks[0]) == {"from": "wait", "why": "a is fetching it from the origin"}
    assert book.route(key, grid, "b", chunks[2])["from"] == "origin"
    # A chunk a node holds goes to the other from that node, with the sha256 its copy must match.
    book.have(key, grid, "a", chunks[0], "sha0")
    assert book.route(key, grid, "b", chunks[0]) == {"from": "peer", "peers": ["a"], "sha256": "sha0"}
    # A copy whose sha256 differs from the first one recorded is never offered.
    book.have(key, grid, "c", chunks[0], "other")
    assert book.route(key, grid, "b", chunks[0])["peers"] == ["a"]
    # Bytes from a that failed verification: b is never routed to a again for this key; with no other holder
    # and no claim, b fetches that chunk from the origin itself.
    book.reject(key, grid, "b", "a", chunks[0])
    assert book.route(key, grid, "b", chunks[0])["from"] == "origin"
    # A node that stops heartbeating (killed, frozen, removed) loses its claims after HEARTBEAT_TTL.
    assert book.route(key, grid, "b", chunks[1])["from"] == "wait"          # a's claim
    clock.now += HEARTBEAT_TTL / 2
    book.heartbeat("b")
    assert book.route(key, grid, "b", chunks[1])["from"] == "wait"
    clock.now += HEARTBEAT_TTL
    book.heartbeat("b")
    assert book.route(key, grid, "b", chunks[1])["from"] == "origin"
    # An unreachable holder is routed around everywhere until it heartbeats again.
    book.have(key, grid, "a", chunks[3], "sha3")
    book.gone("a")
    book.join(key, grid, "d", concurrency=4)
    assert book.route(key, grid, "d", chunks[3])["from"] == "origin"
    book.heartbeat("a")
    book.leave(key, grid, "d")
    assert book.route(key, grid, "e", chunks[3]) == {"from": "peer", "peers": ["a"], "sha256": "sha3"}
    # A file that failed its origin check after assembly: its chunks are forgotten (the next copies come from the
    # origin again); the other files' are kept.
    other = chunk_id("x.bin", 10, "e2", 0)
    book.have(key, grid, "a", other, "shx")
    book.file_failed(key, grid, chunks[0].rsplit("\x00", 1)[0])
    assert book.route(key, grid, "f", chunks[3])["from"] == "origin"
    assert book.route(key, grid, "f", other)["from"] == "peer"


def test_bad_peer_settings_are_one_line(tmp_path):
    for env, needle in ((dict(PREFETCH_PEERS="maybe"), "PREFETCH_PEERS"), (dict(PREFETCH_PEER_TIMEOUT="0"),
                                                                           "PREFETCH_PEER_TIMEOUT")):
        assert_clean_error(run_cli("warm", str(tmp_path), env=env), 2, needle)


# -- the cluster -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rig(s3, tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    env = s3.env() | NODE_ENV
    if ray.is_initialized():
        ray.shutdown()
    r = Rig(Cluster(initialize_head=False), env, None, tmp_path_factory.mktemp("peer-nodes"))
    try:
        for name in ("head", "worker-1", "worker-2", "worker-3"):
            r.add_node(name)
        yield r
    finally:
        ray.shutdown()
        r.cluster.shutdown()


@pytest.fixture
def on_rig(rig, use_env, s3):
    from prefetch.cluster import connect

    use_env(rig.env)
    connect(rig.address)
    yield rig
    s3.proxy.set_uplink(None)


class Model:
    """Files put straight into S3 (not through the counting proxy): two multi-chunk weights files, one of them not
    a multiple of the chunk size, and a few small files."""

    def __init__(self, s3, tag: str):
        self.prefix = f"peers/{tag}-{uuid.uuid4().hex[:8]}"
        rng = __import__("random").Random(tag)
        self.files = {"weights-a.bin": rng.randbytes(6 * MiB), "weights-b.bin": rng.randbytes(5 * MiB + 300_000),
                      **{f"conf/{i}.json": json.dumps({"i": i, "pad": "x" * (1000 * i)}).encode() for i in range(4)}}
        client = s3.client(endpoint=s3.direct_endpoint)
        for path, data in self.files.items():
            client.put_object(Bucket=s3.bucket, Key=f"{self.prefix}/{path}", Body=data)
        self.uri = f"s3://{s3.bucket}/{self.prefix}"
        self.size = sum(len(d) for d in self.files.values())

    def assert_on(self, cache_dir: Path, key: str) -> None:
        """The node's committed copy holds exactly the bytes put into S3 (hashed here, not by the code under test)."""
        base = cache_dir / "objects" / key
        for path, data in self.files.items():
            got = hashlib.sha256((base / path).read_bytes()).hexdigest()
            assert got == hashlib.sha256(data).hexdigest(), f"{path} on {cache_dir} differs from what S3 holds"


def _warm_cluster(rig, uri: str, *extra: str, check: bool = True) -> dict:
    proc = run_cli("warm", uri, "--cluster", "--address", rig.address, "--json", *extra, check=check)
    return json.loads(proc.stdout)


def _origin(s3) -> int:
    return s3.stats()["bytes_out"]


def _agents(rig) -> dict:
    """Every node's agent (started if missing, as `warm --cluster` would), answering."""
    import ray

    from prefetch.cluster import get_or_create_agent

    agents = {node_id: get_or_create_agent(node_id) for node_id in rig.dirs}
    ray.get([a.ready.remote() for a in agents.values()], timeout=120)
    return agents


def _transfer_counts(rig) -> dict[str, dict]:
    import ray

    return {n: ray.get(h.status.remote(), timeout=30)["transfer"] for n, h in _agents(rig).items()}


def _peer_metrics(rig) -> dict[str, dict[str, float]]:
    """node -> {"in": bytes, "out": bytes} from prefetch_peer_bytes_total on each agent's metrics endpoint."""
    import ray
    import urllib.request

    out = {}
    for node, handle in _agents(rig).items():
        url = ray.get(handle.ready.remote(), timeout=30)["metrics_url"]
        with urllib.request.urlopen(url, timeout=10) as r:
            lines = r.read().decode().splitlines()
        out[node] = {d: next((float(ln.rsplit(" ", 1)[1]) for ln in lines
                              if ln.startswith(f'prefetch_peer_bytes_total{{direction="{d}"}}')), 0.0)
                     for d in ("in", "out")}
    return out


def test_one_origin_download_per_cluster_and_no_peers_restores_n(on_rig, s3):
    s3.proxy.set_uplink(16 * MiB)       # nodes start together and overlap, as on a real shared uplink
    model = Model(s3, "swarm")
    n = len(on_rig.dirs)
    metrics_before = _peer_metrics(on_rig)
    before = _origin(s3)
    report = _warm_cluster(on_rig, model.uri)
    origin = _origin(s3) - before
    rows = report["rows"]
    assert report["ok"] and len(rows) == n, report
    key = rows[0]["key"]
    for r in rows:
        assert r["ok"] and r["key"] == key and not r["hit"] and r["bytes"] == model.size
        assert r["origin_bytes"] + r["peer_bytes"] == model.size       # every byte came from one or the other
        model.assert_on(on_rig.dirs[r["node_id"]], key)
        assert on_rig.store(r["node_id"]).verify(key) == []
    print(f"\npeers on: origin sent {origin} bytes for {n} nodes x {model.size} (counted at S3); "
          f"peer bytes {report['peer_bytes']}")
    assert origin < 1.3 * model.size
    assert report["peer_bytes"] >= (n - 1.3) * model.size

    # status: per node, bytes from the origin and from / to peers (the agents' counters since they started); what
    # the nodes received from peers, some node sent.
    counts = _transfer_counts(on_rig)
    print("per node since its agent started:", counts)
    got = sum(c["peer_bytes_in"] for c in counts.values())
    # >=: a chunk sent to a node that stopped waiting for it (its peer timeout, on a loaded machine) counts out only
    assert got >= report["peer_bytes"] and sum(c["peer_bytes_out"] for c in counts.values()) >= got
    table = run_cli("status", "--address", on_rig.address, env=WIDE, check=True).stderr
    assert "peers in/out" in table
    # Each agent's Prometheus metrics count the same bytes, by direction.
    metrics_after = _peer_metrics(on_rig)
    moved = {d: sum(metrics_after[node][d] - metrics_before[node][d] for node in metrics_after) for d in ("in", "out")}
    assert moved["in"] == report["peer_bytes"] and moved["out"] >= moved["in"]

    # The way without peers, same cluster, a model of the same shape: every node downloads everything.
    plain = Model(s3, "no-peers")
    before = _origin(s3)
    report = _warm_cluster(on_rig, plain.uri, "--no-peers")
    no_peers = _origin(s3) - before
    assert report["ok"] and report["peer_bytes"] == 0
    assert all(r["origin_bytes"] == plain.size for r in report["rows"])
    print(f"--no-peers: origin sent {no_peers} bytes for {n} nodes x {plain.size}")
    assert no_peers >= n * plain.size
    assert no_peers > 3 * origin


def test_a_corrupted_copy_never_reaches_another_node(on_rig, s3):
    import ray

    model = Model(s3, "corrupt")
    nodes = list(on_rig.dirs)
    first, agents = nodes[1], _agents(on_rig)
    row = ray.get(agents[first].warm.remote(model.uri))     # one node has it (from the origin: nobody else does)
    assert row["ok"] and row["origin_bytes"] == model.size, row
    key = row["key"]
    bad = on_rig.dirs[first] / "objects" / key / "weights-a.bin"
    os.chmod(bad, 0o600)
    with open(bad, "r+b") as f:                             # bit rot on that node's disk, in its third chunk
        f.seek(2 * MiB + 12345)
        byte = f.read(1)
        f.seek(2 * MiB + 12345)
        f.write(bytes([byte[0] ^ 0xFF]))
    rejected_before = sum(c["peer_chunks_rejected"] for c in _transfer_counts(on_rig).values())

    before = _origin(s3)
    report = _warm_cluster(on_rig, model.uri)
    origin = _origin(s3) - before
    assert report["ok"], report
    for r in report["rows"]:
        if r["node_id"] == first:
            assert r["hit"]
            continue
        # Right bytes everywhere else, and caught chunk by chunk: no file had to be fetched again from scratch
        # (which is what the whole-file origin check would have forced had the bad chunk been written).
        model.assert_on(on_rig.dirs[r["node_id"]], key)
        assert "fetched again from scratch" not in (r.get("note") or ""), r
    rejected = sum(c["peer_chunks_rejected"] for c in _transfer_counts(on_rig).values()) - rejected_before
    print(f"\ncorrupted copy on one node: {rejected} chunks from it rejected; origin sent {origin} bytes")
    assert rejected >= 1
    assert origin < 2 * model.size                          # the rest still came from the peers
    assert on_rig.store(first).verify(key) == ["weights-a.bin"]   # the bad copy is where it was, and only there


def test_a_replica_that_misses_gets_the_model_from_peers(on_rig, s3):
    """serving.load_model on a node that misses goes through its agent (warm_via_local_agent), which uses peers."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    model = Model(s3, "replica")
    nodes = list(on_rig.dirs)
    assert ray.get(_agents(on_rig)[nodes[0]].warm.remote(model.uri))["ok"]

    @ray.remote(num_cpus=0)
    def replica_warm(uri):
        from prefetch.cluster.agent import warm_via_local_agent

        w = warm_via_local_agent(uri)
        return None if w is None else (w.origin_bytes, w.peer_bytes, str(w.path))

    before = _origin(s3)
    got = ray.get(replica_warm.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[2], soft=False))
                  .remote(model.uri), timeout=300)
    origin = _origin(s3) - before
    assert got is not None, "the replica's process found no agent on its node"
    origin_bytes, peer_bytes, path = got
    assert (origin_bytes, peer_bytes) == (0, model.size)
    assert Path(path).parent == on_rig.dirs[nodes[2]] / "objects"
    assert origin < 0.1 * model.size            # a listing, no object bytes
    model.assert_on(on_rig.dirs[nodes[2]], Path(path).name)


def test_chunk_servers_answer_only_cluster_members_and_only_for_their_store(on_rig, s3):
    import ray
    import requests

    model = Model(s3, "server")
    node = list(on_rig.dirs)[1]
    agent = _agents(on_rig)[node]
    row = ray.get(agent.warm.remote(model.uri))
    assert row["ok"], row
    held = ray.get(agent.chunk_map.remote(row["key"], MiB))     # over Ray: what a cluster member can ask
    url, secret = held["server"]
    assert url == ray.get(agent.ready.remote())["chunk_server"]
    assert len(held["chunks"]) == 6 + 6 + 4                        # 6 + 6 chunks of 1 MiB, 4 small files

    def get(path, start=0, end=100, key=row["key"], auth=f"Bearer {secret}"):
        return requests.get(f"{url}/chunk", params={"key": key, "path": path, "start": start, "end": end},
                            headers={"Authorization": auth} if auth else {}, timeout=10)

    ok = get("weights-a.bin", MiB, 2 * MiB)
    assert ok.status_code == 200 and ok.content == model.files["weights-a.bin"][MiB:2 * MiB]
    assert get("weights-a.bin", auth=None).status_code == 401             # no secret: not a cluster member
    assert get("weights-a.bin", auth="Bearer " + "x" * len(secret)).status_code == 401
    assert get("../../etc/passwd").status_code == 404                     # only files the key lists
    assert get(".prefetch.json").status_code == 404
    assert get("weights-a.bin", key="0" * 64).status_code == 404            # only keys in its store
    assert get("weights-a.bin", 0, 7 * MiB).status_code == 416              # past the file's end


def test_a_frozen_peer_is_routed_around(on_rig, s3):
    import ray

    model = Model(s3, "frozen")
    nodes, agents = list(on_rig.dirs), _agents(on_rig)
    holder, asker = nodes[1], nodes[3]
    assert ray.get(agents[holder].warm.remote(model.uri))["ok"]
    pid = ray.get(agents[holder].ready.remote())["pid"]
    os.kill(pid, signal.SIGSTOP)                             # alive, holding the model, answering nothing
    try:
        row = ray.get(agents[asker].warm.remote(model.uri), timeout=300)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert row["ok"], row
    model.assert_on(on_rig.dirs[asker], row["key"])
    assert row["origin_bytes"] == model.size                 # the only holder froze: the origin, as a last resort
    assert "no answer within 5s; routed around" in (row.get("note") or ""), row


def test_a_node_removed_mid_transfer_does_not_stop_the_others(on_rig, s3):
    model = Model(s3, "removed")
    extra = on_rig.add_node("leaving")
    extra_dir = on_rig.dirs[extra.node_id]
    staying = [n for n in on_rig.dirs if n != extra.node_id]
    s3.proxy.set_uplink(1 * MiB)                             # ~11 s of origin transfer for the whole cluster
    result: dict = {}

    def warm() -> None:
        result["report"] = _warm_cluster(on_rig, model.uri, check=False)

    before = _origin(s3)
    t = threading.Thread(target=warm, daemon=True)
    t.start()
    wait_for(lambda: allocated_bytes(extra_dir / "staging") > 256 << 10 or not t.is_alive(), 120,
             "the leaving node to have bytes of its download")
    assert t.is_alive(), "the warm finished before the node could be removed mid-transfer"
    on_rig.remove_node(extra)
    s3.proxy.set_uplink(4 * MiB)
    t.join(300)
    assert not t.is_alive()
    origin = _origin(s3) - before
    rows = {r["node_id"]: r for r in result["report"]["rows"]}
    for node_id in staying:
        r = rows[node_id]
        assert r["ok"], (r.get("error"), r.get("note"))
        model.assert_on(on_rig.dirs[node_id], r["key"])
    assert not rows.get(extra.node_id, {"ok": False})["ok"]
    print(f"\na node removed mid-transfer: origin sent {origin} bytes for {model.size}")
    assert origin < 2 * model.size, [(r.get("origin_bytes"), r.get("peer_bytes"), r.get("note")) for r in rows.values()]
    assert Store(on_rig.dirs[staying[0]]).lookup(rows[staying[0]]["key"], touch=False) is not None


def test_a_node_that_joins_during_a_warm_takes_part(on_rig, s3):
    """The cluster warms (every node's agent), a node joins meanwhile and warms the same model (what the controller
    has its agent do for the desired set): it takes chunks from nodes still downloading, and the origin still sends
    the model about once."""
    import ray

    from prefetch.cluster import get_or_create_agent

    model = Model(s3, "joiner")
    s3.proxy.set_uplink(256 << 10)                           # ~45 s of origin transfer: time for a node to join
    result: dict = {}

    def warm() -> None:
        result["report"] = _warm_cluster(on_rig, model.uri, check=False)

    def committed() -> dict[str, list[str]]:
        return {n: objects_in(d) for n, d in on_rig.dirs.items()}

    nodes, was = list(on_rig.dirs), committed()
    before = _origin(s3)
    t = threading.Thread(target=warm, daemon=True)
    t.start()
    # The others are downloading (bytes in their staging) before the node joins.
    wait_for(lambda: all(allocated_bytes(on_rig.dirs[n] / "staging") > 0 for n in nodes) or not t.is_alive(), 120,
             "every node to have bytes of its download")
    joiner = on_rig.add_node("joiner")
    try:
        agent = get_or_create_agent(joiner.node_id)
        ray.get(agent.ready.remote(), timeout=120)
        assert t.is_alive() and {n: v for n, v in committed().items() if n in was} == was, \
            "the cluster's warm committed before the node joined"
        pending = agent.warm.remote(model.uri)
        s3.proxy.set_uplink(8 * MiB)
        row = ray.get(pending, timeout=300)
        t.join(300)
        origin = _origin(s3) - before
        assert row["ok"], row
        model.assert_on(on_rig.dirs[joiner.node_id], row["key"])
        assert result["report"]["ok"], [(r.get("error"), r.get("note")) for r in result["report"]["rows"]]
        print(f"\na node joining mid-warm: {row['peer_bytes']} bytes from peers, {row['origin_bytes']} from the "
              f"origin; the origin sent {origin} bytes for {model.size}")
        assert row["peer_bytes"] > model.size / 2
        assert origin < 1.3 * model.size
    finally:
        on_rig.remove_node(joiner)


def test_a_node_with_peers_off_takes_everything_from_the_origin_and_serves_nobody(on_rig, s3):
    """PREFETCH_PEERS=0 in a node's environment: its agent neither reads chunks from others nor serves any."""
    import ray

    from prefetch.cluster import get_or_create_agent

    model = Model(s3, "peers-off")
    holder = list(on_rig.dirs)[0]
    assert ray.get(_agents(on_rig)[holder].warm.remote(model.uri))["ok"]
    loner = on_rig.add_node("loner", env={"PREFETCH_PEERS": "0"})
    try:
        agent = get_or_create_agent(loner.node_id)
        assert ray.get(agent.ready.remote(), timeout=120)["chunk_server"] is None
        before = _origin(s3)
        row = ray.get(agent.warm.remote(model.uri), timeout=300)
        origin = _origin(s3) - before
        assert row["ok"] and (row["origin_bytes"], row["peer_bytes"]) == (model.size, 0), row
        assert origin >= model.size
        model.assert_on(on_rig.dirs[loner.node_id], row["key"])
        assert ray.get(agent.chunk_map.remote(row["key"], MiB))["server"] is None   # nothing offered to others
    finally:
        on_rig.remove_node(loner)
