#!/usr/bin/env python
"""Replica cold start (issue B): N Serve replicas of one registered model, started in one run as
  guide  - the Ray guide's MLflowModelDeployment: every replica calls mlflow.pyfunc.load_model("models:/...")
           in __init__, i.e. downloads the whole model from the registry's artifact store;
  warm   - RegistryModel with the node's cache already warm (`prefetch warm` ran once before the deploy);
  cold   - RegistryModel on an empty cache (the replicas share one download: single flight per node);
for each model size. Per run: time until the app is RUNNING (all N replicas ready), the model part of a
replica's start (the slowest replica's model load: download + load for the guide; cache lookup + load from the
local path for RegistryModel), the fixed part (ready time minus the model part: actor start, imports,
Serve's own bookkeeping) and the bytes the S3 server sent (counted by a proxy in front of it).

Real parts: SeaweedFS (weed mini), `mlflow server` (artifacts in S3, clients read S3 directly), a local Ray
with Serve. Models: register_large_model (one large random file + small files), pyfunc, cheap to load
(its load_context only stats the files): the model part is the registry/transfer cost the guide pays.

Usage: python scripts/bench_coldstart.py [--sizes 64,256,512] [--replicas 3] [--modes guide,warm,cold]
       [--link loopback|far]    far = 20 ms per request and 64 MiB/s per connection in front of S3
Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchkit import REPO  # noqa: E402  (the repo on sys.path, no telemetry)

from tests import harness  # noqa: E402  (the same real-server harness the tests use)

MiB = 1 << 20
LINKS = harness.LINKS


def deploy(app, name: str) -> float:
    """Seconds from the deploy call until every replica is ready (serve.run returns at RUNNING)."""
    from ray import serve

    t = time.perf_counter()
    serve.run(app, name=name, route_prefix=f"/{name}")
    return time.perf_counter() - t


def guide_model_seconds(name: str, replicas: int) -> list[float]:
    """Each guide replica's own mlflow.pyfunc.load_model time (asked through the handle until all answered)."""
    from ray import serve

    handle = serve.get_app_handle(name)
    seen: dict[int, float] = {}
    for _ in range(20 * replicas):
        info = handle.model_info.remote().result()
        seen[info["pid"]] = info["load_seconds"]
        if len(seen) == replicas:
            break
    return list(seen.values())


def ours_model_seconds(name: str) -> tuple[list[float], list[dict]]:
    from serving import replica_status

    rows = replica_status(name)
    return [r["warm_seconds"] + r["load_seconds"] for r in rows], rows


def run_one(mode: str, uri: str, size_mib: int, replicas: int, s3, env: dict, cache: Path) -> dict:
    from ray import serve

    import prefetch
    from serving.examples import MLflowModelDeployment, Model

    opts = {"num_cpus": 0.1, "runtime_env": {"env_vars": env}}
    name = f"{mode}-{size_mib}"
    prewarm_bytes = 0
    if mode in ("warm", "cold"):
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
    s3.reset_stats()
    if mode == "warm":
        w = prefetch.warm(uri, settings=prefetch.Settings.load(cache_dir=cache))
        prewarm_bytes = w.origin_bytes
    before_deploy = s3.stats()["bytes_out"]
    if mode == "guide":
        app = MLflowModelDeployment.options(num_replicas=replicas, ray_actor_options=opts).bind(model_uri=uri)
    else:
        app = Model.options(num_replicas=replicas, user_config={"model_uri": uri}, ray_actor_options=opts).bind()
    ready = deploy(app, name)
    origin = s3.stats()["bytes_out"]
    if mode == "guide":
        parts = guide_model_seconds(name, replicas)
        fetched_by = replicas
    else:
        parts, rows = ours_model_seconds(name)
        fetched_by = sum(1 for r in rows if not r["from_cache"])
    serve.delete(name)
    model_part = max(parts) if parts else float("nan")
    return {"mode": mode, "size_mib": size_mib, "replicas": replicas, "ready_s": round(ready, 3),
            "model_part_s": round(model_part, 4), "fixed_s": round(ready - model_part, 3),
            "model_part_each_s": [round(p, 4) for p in sorted(parts)],
            "origin_bytes": origin, "origin_bytes_during_deploy": origin - before_deploy,
            "prewarm_origin_bytes": prewarm_bytes, "replicas_that_downloaded": fetched_by}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,256,512", help="model sizes in MiB (the large file; + small files)")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--modes", default="guide,warm,cold")
    ap.add_argument("--small-files", type=int, default=100)
    ap.add_argument("--link", choices=sorted(LINKS), default="loopback")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-coldstart-", dir=os.environ.get("BENCH_DIR")))
    latency, rate = LINKS[args.link]
    s3 = harness.SeaweedS3(workdir=work / "s3", counting_proxy=True, latency_s=latency, rate_bytes_per_s=rate)
    server = None
    results: list[dict] = []
    import ray

    try:
        s3.start()
        server = harness.MlflowServer(work / "mlflow", s3, mode="direct").start()
        uris = {}
        for size in sizes:
            t = time.perf_counter()
            rec = harness.register_large_model(server.env(), f"coldstart-{size}mib",
                                               large_files=[("weights.bin", size * MiB)],
                                               n_small=args.small_files, workdir=work)
            uris[size] = (rec["registry_uri"], rec["total_bytes"])
            print(f"registered {rec['registry_uri']}: {rec['total_bytes'] / MiB:.0f} MiB "
                  f"({time.perf_counter() - t:.0f}s)", flush=True)
        cache = work / "cache"
        tmp = work / "replica-tmp"      # where the guide's replicas download to (mlflow uses a temp dir)
        tmp.mkdir()
        env = {**server.env(), "PREFETCH_CACHE_DIR": str(cache), "TMPDIR": str(tmp), "PYTHONWARNINGS": "ignore"}
        harness.apply_env(server.env())
        ray.init(address="local", num_cpus=8, include_dashboard=False, object_store_memory=200 << 20,
                 logging_level="ERROR", log_to_driver=False, namespace="bench-coldstart")
        harness.start_serve()
        # Warm-up: the first replicas on a machine pay for cold imports (page cache); nobody's figures should.
        smallest = min(sizes)
        run_one("cold", uris[smallest][0], smallest, 1, s3, env, cache)
        for size in sizes:
            for mode in modes:
                r = run_one(mode, uris[size][0], size, args.replicas, s3, env, cache)
                r["model_bytes"] = uris[size][1]
                results.append(r)
                print(f"  {mode:<6} {size:>5} MiB x{args.replicas}: ready {r['ready_s']:.1f}s, model part "
                      f"{r['model_part_s']:.3f}s, origin {r['origin_bytes'] / MiB:.0f} MiB", flush=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
    finally:
        harness.stop_bench(server, s3, work)
    report(results, args, sizes)


def report(results: list[dict], args, sizes: list[int]) -> None:
    label = {"guide": "guide (MLflow in __init__)", "warm": "RegistryModel, warm cache",
             "cold": "RegistryModel, empty cache"}
    print(f"\n{args.replicas} replicas per run, one node; link: {args.link}; machine: {os.cpu_count()} cores\n")
    print(f"{'model':>9}  {'deployment':<28}{'ready s':>8}{'fixed s':>9}{'model part s':>14}{'origin MiB':>12}"
          f"{'downloads':>11}")
    for r in results:
        origin = r["origin_bytes"] / MiB
        print(f"{r['model_bytes'] / MiB:>5.0f} MiB  {label[r['mode']]:<28}{r['ready_s']:>8.2f}{r['fixed_s']:>9.2f}"
              f"{r['model_part_s']:>14.4f}{origin:>12.0f}{r['replicas_that_downloaded']:>11}")
    ratios = {}
    by = {(r["mode"], r["size_mib"]): r for r in results}
    for size in sizes:
        g, w, c = by.get(("guide", size)), by.get(("warm", size)), by.get(("cold", size))
        entry = {}
        if g and w:
            entry["model_part_speedup_warm"] = round(g["model_part_s"] / max(w["model_part_s"], 1e-6), 1)
            entry["ready_speedup_warm"] = round(g["ready_s"] / w["ready_s"], 2)
            entry["origin_bytes_guide_over_warm"] = round(g["origin_bytes"] / max(w["origin_bytes"], 1), 2)
        if g and c:
            entry["ready_speedup_cold"] = round(g["ready_s"] / c["ready_s"], 2)
            entry["origin_bytes_guide_over_cold"] = round(g["origin_bytes"] / max(c["origin_bytes"], 1), 2)
        ratios[f"{size}MiB"] = entry
    print("\nratios (guide / RegistryModel):")
    for size, entry in ratios.items():
        print(f"  {size}: " + ", ".join(f"{k}={v}" for k, v in entry.items()))
    print(json.dumps({"bench": "coldstart", "replicas": args.replicas, "link": args.link, "results": results,
                      "ratios": ratios}))


if __name__ == "__main__":
    main()
