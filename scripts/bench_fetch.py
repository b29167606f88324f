#!/usr/bin/env python
"""Fetch benchmark (issue A): the same registered model version, fetched in one run by
  1. mlflow.artifacts.download_artifacts("models:/...")     (what the Ray Serve guide's replicas do)
  2. raw boto3, tuned TransferConfig, a thread pool across files (the best a hand-written script does)
  3. prefetch.warm cold (empty cache)
  4. prefetch.warm hit, pinned version (in-process, and the CLI as a process) and `latest` (one registry call)
over two links: loopback, and an emulated far registry (a proxy adding 20 ms per request and capping each
connection at 64 MiB/s, in front of both the S3 server and the tracking server).

Real parts: SeaweedFS (weed mini) and `mlflow server` on loopback. Prints a table and one JSON line.
Usage: python scripts/bench_fetch.py [--large-mib 256 --large-files 2 --small-files 300 --small-kib 8 --rounds 1]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from tests import harness  # noqa: E402  (the same real-server harness the tests use)

MiB = 1 << 20
NAME = "bench-fetch-model"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def mlflow_download(uri: str, dest: Path) -> None:
    import mlflow

    mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest))


def boto3_download(storage: str, dest: Path, threads: int = 32) -> None:
    """What a tuned hand-written script does: list once, then download_file per key on a thread pool."""
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    bucket, _, prefix = storage[len("s3://"):].partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"],
                          config=Config(max_pool_connections=threads * 2, s3={"addressing_style": "path"}))
    config = TransferConfig(max_concurrency=threads, multipart_chunksize=8 * MiB, multipart_threshold=16 * MiB)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])]

    def one(key: str) -> None:
        target = dest / key[len(prefix) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target), Config=config)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, keys))


def prefetch_warm(uri: str, cache: Path, **overrides):
    import prefetch

    return prefetch.warm(uri, settings=prefetch.Settings.load(cache_dir=cache, **overrides))


def measure_link(label: str, s3: "harness.SeaweedS3", tracking_port: int, rec: dict, work: Path, rounds: int,
                 latency: float, rate: float | None) -> dict:
    s3_link = harness.LinkProxy("127.0.0.1", s3.s3_port, latency_s=latency, rate_bytes_per_s=rate).start()
    reg_link = harness.LinkProxy("127.0.0.1", tracking_port, latency_s=latency, rate_bytes_per_s=rate).start()
    env = {**s3.env(s3_link.url), "MLFLOW_TRACKING_URI": reg_link.url}
    saved = harness.apply_env(env)
    total = rec["total_bytes"]
    uri = f"models:/{NAME}/{rec['version']}"
    storage = rec["artifact_location"]
    res: dict = {"link": label, "latency_ms": latency * 1000, "per_conn_mib_s": rate / MiB if rate else None}
    try:
        import mlflow

        mlflow.MlflowClient().get_model_version(NAME, str(rec["version"]))   # warm imports/connections
        runs: dict[str, list[float]] = {"mlflow": [], "boto3": [], "prefetch_cold": []}
        for r in range(rounds):
            for method in runs:
                dest = work / f"{label}-{method}-{r}"
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
                s3_link.reset()
                if method == "mlflow":
                    secs, _ = timed(lambda: mlflow_download(uri, dest))
                elif method == "boto3":
                    secs, _ = timed(lambda: boto3_download(storage, dest))
                else:
                    secs, w = timed(lambda: prefetch_warm(uri, dest / "cache"))
                    assert not w.from_cache and w.bytes >= total
                    cold_path = w.path
                runs[method].append(secs)
                res.setdefault("origin_bytes", {})[method] = s3_link.stats()["bytes_out"]
                if method != "prefetch_cold":
                    shutil.rmtree(dest, ignore_errors=True)
        for method, secs in runs.items():
            best = min(secs)
            res[f"{method}_s"] = round(best, 3)
            res[f"{method}_mib_s"] = round(total / MiB / best, 1)
        res["cold_vs_mlflow"] = round(res["mlflow_s"] / res["prefetch_cold_s"], 2)
        res["cold_vs_boto3"] = round(res["boto3_s"] / res["prefetch_cold_s"], 2)
        cache = cold_path.parent.parent
        # Hit, pinned version: in-process median of 20, and origin requests on both links.
        s3_link.reset(); reg_link.reset()
        hits = [timed(lambda: prefetch_warm(uri, cache))[0] for _ in range(20)]
        res["hit_pinned_ms"] = round(statistics.median(hits) * 1000, 2)
        res["hit_pinned_origin_requests"] = s3_link.stats()["requests"] + reg_link.stats()["requests"]
        cli = subprocess.run([sys.executable, "-m", "prefetch.cli", "warm", uri, "--json"], capture_output=True,
                             text=True, env={**os.environ, "PREFETCH_CACHE_DIR": str(cache)})
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "prefetch.cli", "warm", uri, "--json"], capture_output=True,
                       env={**os.environ, "PREFETCH_CACHE_DIR": str(cache)}, check=True)
        res["hit_pinned_cli_process_ms"] = round((time.perf_counter() - t) * 1000, 1)
        assert json.loads(cli.stdout)["results"][0]["from_cache"]
        # Hit on `latest` with the ref TTL at 0: one registry call, zero artifact bytes.
        prefetch_warm(f"models:/{NAME}/latest", cache)
        s3_link.reset(); reg_link.reset()
        secs, w = timed(lambda: prefetch_warm(f"models:/{NAME}/latest", cache, ref_ttl=0))
        assert w.from_cache
        res["hit_latest_ms"] = round(secs * 1000, 1)
        res["hit_latest_registry_requests"] = reg_link.stats()["requests"]
        res["hit_latest_artifact_bytes"] = s3_link.stats()["bytes_out"]
        shutil.rmtree(cold_path.parent.parent.parent, ignore_errors=True)
    finally:
        harness.restore_env(saved)
        s3_link.stop()
        reg_link.stop()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large-mib", type=int, default=256)
    ap.add_argument("--large-files", type=int, default=2)
    ap.add_argument("--small-files", type=int, default=300)
    ap.add_argument("--small-kib", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--links", default="loopback,far")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fetch-", dir=os.environ.get("BENCH_DIR")))
    s3 = harness.SeaweedS3(workdir=work / "s3").start()
    server = harness.MlflowServer(work / "mlflow", s3, mode="direct").start()
    try:
        large = [(f"weights-{i}.bin", args.large_mib * MiB) for i in range(args.large_files)]
        rec = harness.register_large_model(server.env(), NAME, large_files=large, n_small=args.small_files,
                                           small_size=args.small_kib * 1024, workdir=work)
        shape = (f"{args.large_files} x {args.large_mib} MiB + {args.small_files} x {args.small_kib} KiB "
                 f"= {rec['total_bytes'] / MiB:.0f} MiB in {len(rec['files'])}+ files")
        port = int(server.tracking_uri.rsplit(":", 1)[1])
        links = {"loopback": (0.0, None), "far": (0.020, 64 * MiB)}
        results = [measure_link(name, s3, port, rec, work, args.rounds, *links[name]) for name in args.links.split(",")]
    finally:
        server.stop()
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmodel: {shape}; machine: {os.cpu_count()} cores; best of {args.rounds} round(s)\n")
    head = f"{'link':<9}{'mlflow MiB/s':>13}{'boto3 MiB/s':>12}{'prefetch MiB/s':>15}{'x mlflow':>9}{'x boto3':>8}" \
           f"{'hit pinned':>11}{'hit CLI':>9}{'hit latest':>11}{'reg calls':>10}{'art bytes':>10}"
    print(head)
    for r in results:
        print(f"{r['link']:<9}{r['mlflow_mib_s']:>13}{r['boto3_mib_s']:>12}{r['prefetch_cold_mib_s']:>15}"
              f"{r['cold_vs_mlflow']:>9}{r['cold_vs_boto3']:>8}{r['hit_pinned_ms']:>9}ms{r['hit_pinned_cli_process_ms']:>7}ms"
              f"{r['hit_latest_ms']:>9}ms{r['hit_latest_registry_requests']:>10}{r['hit_latest_artifact_bytes']:>10}")
    print(json.dumps({"bench": "fetch", "model": shape, "results": results}))


if __name__ == "__main__":
    main()
