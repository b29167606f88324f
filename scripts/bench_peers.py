#!/usr/bin/env python
"""Peer-to-peer benchmark (issue J): `warm --cluster` of one model on N = 1..4 nodes, peers on against
`--no-peers`, in one run, behind a registry uplink shared by the whole cluster.

Real parts: SeaweedFS (weed mini) behind the tests' LinkProxy, capped in aggregate (one token bucket across every
connection, default 40 MiB/s: a registry link shared by the cluster), and a real Ray cluster
(ray.cluster_utils.Cluster) whose nodes each have their own cache dir. The cluster grows from 1 to N nodes; at each
size the same bytes are uploaded under a fresh prefix (a new key, so nothing is a hit) and warmed twice, peers on
and off. Origin bytes are counted at the proxy (the S3 side), wall time around `warm_cluster`.

Then a model on paper for a fleet (1,000 nodes, 20 GB), with the measured peer rate beside stated link speeds.
Usage: python scripts/bench_peers.py [--nodes 4 --large-mib 96 --large-files 2 --small-files 20 --uplink-mib 40]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchkit import REPO  # noqa: F401  (the repo on sys.path, no telemetry)

MiB = 1 << 20


def upload(client, bucket: str, prefix: str, files: dict[str, bytes]) -> str:
    for path, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path}", Body=data)
    return f"s3://{bucket}/{prefix}"


def model_files(large_mib: int, large_files: int, small_files: int) -> dict[str, bytes]:
    rng = random.Random(7)
    files = {f"weights-{i}.bin": rng.randbytes(large_mib * MiB) for i in range(large_files)}
    files |= {f"conf/{i}.json": json.dumps({"i": i, "pad": "x" * 2000}).encode() for i in range(small_files)}
    return files


def one_warm(s3, client, files: dict, tag: str, peers: bool, rig) -> dict:
    from prefetch.cluster import warm_cluster

    uri = upload(client, s3.bucket, f"bench-peers/{tag}", files)
    before = s3.stats()["bytes_out"]
    started = time.perf_counter()
    report = warm_cluster([uri], peers=peers)
    seconds = time.perf_counter() - started
    origin = s3.stats()["bytes_out"] - before
    if not report["ok"]:
        raise SystemExit(f"warm failed: {[r.get('error') for r in report['rows'] if not r.get('ok')]}")
    for node_dir in rig.dirs.values():                # the next round starts cold on every node
        for key in {r["key"] for r in report["rows"]}:
            shutil.rmtree(Path(node_dir) / "objects" / key, ignore_errors=True)
    return {"seconds": round(seconds, 2), "origin_bytes": origin, "peer_bytes": report["peer_bytes"]}


def paper_model(nodes: int, model_gb: float, uplink_gbit: float, nic_gbit: float, chunk_mib: int,
                peer_mib_s: float) -> list[str]:
    """Wall time to put a model on every node, from link speeds (no CPU limit): without peers the uplink carries N
    copies; with a swarm it carries one, each node's NIC receives one, and the pipeline's start-up is a chain of
    log2(N) chunk hops."""
    size = model_gb * 1e9
    up, nic = uplink_gbit * 1e9 / 8, nic_gbit * 1e9 / 8
    chunks = math.ceil(size / (chunk_mib * MiB))
    no_peers = nodes * size / up
    swarm = max(size / up, size / nic) + math.log2(nodes) * chunk_mib * MiB / nic
    ours = max(size / up, size / (peer_mib_s * MiB)) + math.log2(nodes) * chunk_mib * MiB / (peer_mib_s * MiB)
    return [
        f"paper model: {nodes} nodes, a {model_gb:g} GB model in {chunks} chunks of {chunk_mib} MiB, registry "
        f"uplink {uplink_gbit:g} Gbit/s, node NICs {nic_gbit:g} Gbit/s",
        f"  every node from the registry (no peers; KServe LocalModelCache's N downloads): "
        f"{no_peers / 3600:.1f} h, {nodes * model_gb / 1000:.0f} TB over the uplink",
        f"  swarm at NIC speed: {swarm:.0f} s, {model_gb:g} GB over the uplink "
        f"({no_peers / swarm:.0f}x faster, {nodes}x less egress)",
        f"  swarm at the peer rate measured here ({peer_mib_s:.0f} MiB/s per node: HTTP between agents, all nodes "
        f"on one 2-core machine): {ours:.0f} s",
        "  published: Kraken ships 3 GB to 2,600 hosts with p50 10 s (its README); Dragonfly has the same shape "
        "(a scheduler, seed peers fetching from the source, pieces between peers) but states no figure with its "
        "conditions that we could set beside these",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--large-mib", type=int, default=96)
    ap.add_argument("--large-files", type=int, default=2)
    ap.add_argument("--small-files", type=int, default=20)
    ap.add_argument("--uplink-mib", type=float, default=40.0, help="the registry's uplink, shared by all nodes")
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from prefetch.cluster import connect
    from tests import harness
    from tests.harness.ray_rig import Rig

    started, load = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    os.environ["HOME"] = str(work / "home")             # nothing from the machine's ~/.ray or ~/.config leaks in
    (work / "home").mkdir()
    s3 = harness.SeaweedS3(workdir=work / "seaweed", counting_proxy=True).start()
    rig = None
    try:
        s3.proxy.set_uplink(args.uplink_mib * MiB)
        client = s3.client(endpoint=s3.direct_endpoint)
        files = model_files(args.large_mib, args.large_files, args.small_files)
        size = sum(len(d) for d in files.values())
        shape = f"{args.large_files} x {args.large_mib} MiB + {args.small_files} small files = {size / MiB:.0f} MiB"
        print(f"model: {shape}; registry uplink {args.uplink_mib:g} MiB/s shared by every node; {started}, "
              f"load average {load[0]:.2f}", file=sys.stderr)
        os.environ.update(s3.env())
        rig = Rig(Cluster(initialize_head=False), s3.env(), None, work / "nodes")
        rows = []
        for n in range(1, args.nodes + 1):
            rig.add_node("head" if n == 1 else f"worker-{n - 1}")
            if n == 1:
                connect(rig.address)
            # --no-peers first: by the peers' turn the tracker the agents start with is up, as in a running cluster
            off = one_warm(s3, client, files, f"n{n}-off", False, rig)
            on = one_warm(s3, client, files, f"n{n}-on", True, rig)
            row = {"nodes": n, "peers": on, "no_peers": off,
                   "time_ratio": round(off["seconds"] / on["seconds"], 2),
                   "egress_ratio": round(off["origin_bytes"] / on["origin_bytes"], 2)}
            rows.append(row)
            print(f"N={n}: peers {on['seconds']:6.1f} s, origin {on['origin_bytes'] / size:4.2f}x the model | "
                  f"--no-peers {off['seconds']:6.1f} s, origin {off['origin_bytes'] / size:4.2f}x | "
                  f"{row['time_ratio']:.2f}x faster, {row['egress_ratio']:.2f}x less egress", file=sys.stderr)
        last = rows[-1]["peers"]
        # The rate a node took chunks from its peers here, over the part of the warm the uplink did not set.
        floor = size / (args.uplink_mib * MiB)
        peer_rate = (last["peer_bytes"] / max(1, args.nodes - 1)) / max(last["seconds"] - floor, 0.5) / MiB
        lines = paper_model(1000, 20, 10, 25, 8, peer_rate)
        for line in lines:
            print(line, file=sys.stderr)
        print(json.dumps({"bench": "peers", "model": shape, "model_bytes": size, "uplink_mib_s": args.uplink_mib,
                          "date": started, "load_average": load, "rows": rows, "peer_mib_s": round(peer_rate, 1),
                          "paper": lines}))
    finally:
        ray.shutdown()
        if rig is not None:
            rig.cluster.shutdown()
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
