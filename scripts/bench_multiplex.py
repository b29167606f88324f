#!/usr/bin/env python
"""Multiplexing (issue L): a request for a model id that is not in the replica's RAM, served
  seed  - Serve's multiplexing as its docs write it: `mlflow.pyfunc.load_model("models:/<id>@champion")` in a
          `@serve.multiplexed` loader (every load of an id downloads it, also one evicted a minute ago);
  ours  - serving.MultiplexedModel: the load goes through the node cache (a model evicted from RAM is read
          from local disk; the download happens once per node).
One replica per app holding --per-replica models, --ids models cycled --cycles times: with more ids than places
every request misses the replica's RAM. Ours starts on an empty cache: its first cycle downloads (reported
apart), the later cycles are misses with a warm node cache (the latency figure). Then a burst: --burst
requests for different cold ids at once (Serve serializes a replica's loads; ours runs them in threads).

Real parts: SeaweedFS behind a counting proxy, `mlflow server` (artifacts in S3, read directly), local Ray +
Serve over HTTP. Models: register_large_model (one file of --size-mib + 20 small files), pyfunc.

Usage: python scripts/bench_multiplex.py [--ids 20] [--cycles 3] [--size-mib 8] [--per-replica 2]
       [--link loopback|far]     far = 20 ms per request and 64 MiB/s per connection in front of S3
Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchkit import REPO  # noqa: E402  (the repo on sys.path, no telemetry)

from tests import harness  # noqa: E402  (the same real-server harness the tests use)

MiB = 1 << 20
LINKS = harness.LINKS
HEADER = "serve_multiplexed_model_id"
TEMPLATE = "models:/{model_id}@champion"
BODY = {"dataframe_split": {"columns": ["x"], "data": [[0.0]]}}


def seed_deployment():
    """The docs' form, on the pyfunc test models (DataFrame in, the model's bytes out)."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.5})
    class SeedMultiplexedBench:
        def __init__(self, per_replica: int):
            import mlflow.pyfunc

            async def load_model(model_id: str):
                return mlflow.pyfunc.load_model(TEMPLATE.format(model_id=model_id))

            self.get_model = serve.multiplexed(max_num_models_per_replica=per_replica)(load_model)

        async def __call__(self, request):
            import numpy as np
            import pandas as pd

            model = await self.get_model(serve.get_multiplexed_model_id())
            split = (await request.json())["dataframe_split"]
            frame = pd.DataFrame(split["data"], columns=split["columns"])
            return {"predictions": np.asarray(model.predict(frame)).tolist()}

    return SeedMultiplexedBench


def ask(url: str, model_id: str) -> tuple[float, int]:
    import requests

    started = time.perf_counter()
    r = requests.post(url, json=BODY, headers={HEADER: model_id}, timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"{url} {model_id}: {r.status_code} {r.text[:300]}")
    return time.perf_counter() - started, r.json()["predictions"][0]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def cycle(url: str, ids: list[str], cycles: int, s3, expected: dict) -> list[dict]:
    out = []
    for c in range(cycles):
        s3.reset_stats()
        seconds = []
        for model_id in ids:
            s, prediction = ask(url, model_id)
            assert prediction == expected[model_id], (model_id, prediction)
            seconds.append(s)
        out.append({"cycle": c + 1, "seconds": seconds, "origin_bytes": s3.stats()["bytes_out"]})
    return out


def burst(url: str, ids: list[str]) -> float:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
        list(pool.map(lambda i: ask(url, i), ids))
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", type=int, default=20)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=8)
    ap.add_argument("--per-replica", type=int, default=2)
    ap.add_argument("--burst", type=int, default=4)
    ap.add_argument("--link", choices=sorted(LINKS), default="far")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-multiplex-", dir=os.environ.get("BENCH_DIR")))
    latency, rate = LINKS[args.link]
    s3 = harness.SeaweedS3(workdir=work / "s3", counting_proxy=True, latency_s=latency, rate_bytes_per_s=rate)
    server = None
    import ray

    try:
        s3.start()
        server = harness.MlflowServer(work / "mlflow", s3, mode="direct").start()
        ids, expected = [], {}
        t = time.perf_counter()
        for i in range(args.ids + args.burst):   # the burst's ids are never asked for before the burst
            rec = harness.register_large_model(server.env(), f"mux-{i:02d}", large_files=[("weights.bin",
                                               args.size_mib * MiB)], n_small=20, seed=i, workdir=work)
            ids.append(rec["name"])
            expected[rec["name"]] = rec["expected_prediction"]
            _alias(server.env(), rec["name"], rec["version"])
        model_bytes = rec["total_bytes"]
        print(f"registered {len(ids)} models of {model_bytes / MiB:.1f} MiB ({time.perf_counter() - t:.0f}s)",
              flush=True)
        cycled, burst_ids = ids[:args.ids], ids[args.ids:]
        cache = work / "cache"
        tmp = work / "replica-tmp"
        tmp.mkdir()
        env = {"env_vars": {**server.env(), "PREFETCH_CACHE_DIR": str(cache), "TMPDIR": str(tmp),
                            "PYTHONWARNINGS": "ignore", "MLFLOW_DISABLE_TELEMETRY": "true"}}
        harness.apply_env(server.env())
        ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=200 << 20,
                 logging_level="ERROR", log_to_driver=False, namespace="bench-multiplex")
        base = harness.start_serve()
        from ray import serve

        from serving import MultiplexedModel

        opts = {"num_cpus": 0.5, "runtime_env": env}
        ours = serve.deployment(MultiplexedModel, name="Models").options(
            num_replicas=1, ray_actor_options=opts,
            user_config={"model_uri_template": TEMPLATE, "max_models_per_replica": args.per_replica})
        seed = seed_deployment().options(num_replicas=1, ray_actor_options=opts)
        serve.run_many([serve.RunTarget(ours.bind(), name="ours", route_prefix="/ours"),
                        serve.RunTarget(seed.bind(args.per_replica), name="seed", route_prefix="/seed")])
        results = {}
        for app in ("seed", "ours"):
            url = f"{base}/{app}"
            results[app] = {"cycles": cycle(url, cycled, args.cycles, s3, expected)}
            results[app]["burst_s"] = burst(url, burst_ids)
            print(f"  {app}: done", flush=True)
    finally:
        harness.stop_bench(server, s3, work)
    report(results, args, model_bytes)


def _alias(env: dict, name: str, version) -> None:
    from mlflow import MlflowClient

    with harness.mlflow_env(env):
        MlflowClient().set_registered_model_alias(name, "champion", str(version))


def report(results: dict, args, model_bytes: int) -> None:
    seed_lat = [s for c in results["seed"]["cycles"] for s in c["seconds"]]
    ours_warm = [s for c in results["ours"]["cycles"][1:] for s in c["seconds"]]
    ours_first = results["ours"]["cycles"][0]["seconds"]
    origin = {app: sum(c["origin_bytes"] for c in r["cycles"]) for app, r in results.items()}
    rows = [("seed: mlflow.pyfunc.load_model in @serve.multiplexed", seed_lat, origin["seed"]),
            ("ours, first cycle (empty node cache)", ours_first, results["ours"]["cycles"][0]["origin_bytes"]),
            ("ours, later cycles (warm node cache)", ours_warm,
             sum(c["origin_bytes"] for c in results["ours"]["cycles"][1:]))]
    print(f"\nA request for an id not in the replica's RAM: {args.ids} ids x {args.cycles} cycles, 1 replica x "
          f"{args.per_replica} places, models of {model_bytes / MiB:.1f} MiB, link {args.link}")
    print(f"{'':<56} {'p50 s':>7} {'p99 s':>7} {'n':>4} {'origin MiB':>11}")
    for label, lat, ob in rows:
        print(f"{label:<56} {statistics.median(lat):>7.3f} {pct(lat, 99):>7.3f} {len(lat):>4} {ob / MiB:>11.1f}")
    print(f"origin bytes for {args.ids} ids x {args.cycles} cycles: seed {origin['seed'] / MiB:.1f} MiB, ours "
          f"{origin['ours'] / MiB:.1f} MiB ({origin['seed'] / max(origin['ours'], 1):.1f}x less)")
    ratio = statistics.median(seed_lat) / statistics.median(ours_warm)
    print(f"p50 ratio seed / ours (warm node cache): {ratio:.1f}x")
    print(f"burst of {args.burst} different cold ids at once: seed {results['seed']['burst_s']:.2f}s, ours "
          f"{results['ours']['burst_s']:.2f}s (ours downloads them in parallel threads; Serve's lock serializes "
          "the seed's)")
    print(json.dumps({"bench": "multiplex", "args": vars(args), "model_bytes": model_bytes,
                      "seed": {"p50": statistics.median(seed_lat), "p99": pct(seed_lat, 99)},
                      "ours_warm": {"p50": statistics.median(ours_warm), "p99": pct(ours_warm, 99)},
                      "ours_first_cycle": {"p50": statistics.median(ours_first), "p99": pct(ours_first, 99)},
                      "origin_bytes": origin, "burst_s": {a: r["burst_s"] for a, r in results.items()}}))


if __name__ == "__main__":
    main()
