#!/usr/bin/env python
"""Conversion benchmark (issue D): native MLflow pyfunc vs ONNX (onnxruntime) vs TorchScript, in one run.

For the Ray Serve guide's RandomForest (sklearn flavor: native vs ONNX) and a torch MLP (mlflow.pytorch, MLflow 3's
default pt2 serialization: native vs ONNX vs TorchScript), all loaded from the node-local cache:
  - conversion time (the first `prefetch.warm(uri, format=...)`, once per node),
  - load time from the local path (median of --loads loads, after one untimed load so imports are excluded),
  - predict latency p50/p99 for one row and for a batch of 1,000 rows.
Every runtime gets one thread (onnxruntime intra/inter_op_num_threads=1, torch.set_num_threads(1); sklearn's
forest predicts on one thread by default): the machine is shared, and this compares engines, not core counts.

Real parts: an embedded MLflow registry (sqlite + local artifacts), prefetch.warm, skl2onnx, torch.onnx.export,
torch.jit, onnxruntime. Prints a table and one JSON line with ratios (native time / converted time: >1 = faster).
Usage: python scripts/bench_convert.py [--one-row-iters 300 --batch-iters 30 --loads 5 --hidden 256]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from benchkit import REPO  # noqa: E402  (the repo on sys.path, no telemetry)

import numpy as np  # noqa: E402

from tests import harness  # noqa: E402

MLP_NAME = "bench-convert-mlp"
THREADS = {"intra_op_num_threads": 1, "inter_op_num_threads": 1}


def log_mlp(env: dict, features: int, hidden: int) -> tuple[str, int]:
    import mlflow
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                              torch.nn.ReLU(), torch.nn.Linear(hidden, 1)).eval()
    example = np.random.default_rng(0).normal(size=(5, features)).astype(np.float32)
    with harness.mlflow_env(env), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mlflow.start_run(run_name=MLP_NAME):
            info = mlflow.pytorch.log_model(net, name="mlp", input_example=example, registered_model_name=MLP_NAME,
                                            pip_requirements=["torch"])
    return f"models:/{MLP_NAME}/{info.registered_model_version}", sum(p.numel() for p in net.parameters())


def percentiles(fn, iters: int) -> tuple[float, float]:
    fn()                                   # warm-up call (lazy allocations, first-run kernels)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]


def load_native(path: Path):
    import mlflow

    return mlflow.pyfunc.load_model(str(path))


def load_converted(path: Path, fmt: str):
    from prefetch.convert import load_derived

    return load_derived(path, fmt, THREADS)


def measure(label: str, fmt: str, loader, rows_one: np.ndarray, rows_batch: np.ndarray, args) -> dict:
    loader()                               # untimed: imports, first-time initialisation
    loads = []
    for _ in range(args.loads):
        t = time.perf_counter()
        model = loader()
        loads.append(time.perf_counter() - t)
    one = percentiles(lambda: model.predict(rows_one), args.one_row_iters)
    batch = percentiles(lambda: model.predict(rows_batch), args.batch_iters)
    return {"model": label, "format": fmt, "load_s": statistics.median(loads),
            "one_p50_ms": one[0] * 1e3, "one_p99_ms": one[1] * 1e3,
            "batch_p50_ms": batch[0] * 1e3, "batch_p99_ms": batch[1] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one-row-iters", type=int, default=300)
    ap.add_argument("--batch-iters", type=int, default=30)
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args()

    import prefetch
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    os.environ["PREFETCH_CACHE_DIR"] = str(work / "cache")
    reg = harness.EmbeddedRegistry(work / "registry").start()
    seed = harness.register_seed_versions(reg.env(), n_versions=1)
    mlp_uri, mlp_params = log_mlp(reg.env(), args.features, args.hidden)
    rf_uri = f"models:/{harness.SEED_MODEL_NAME}/1"
    harness.apply_env(reg.env())

    rng = np.random.default_rng(7)
    rf_rows = np.concatenate([seed["X_test"]] * 5)[:1000]                  # the guide's held-out rows, tiled
    mlp_rows = rng.normal(size=(1000, args.features)).astype(np.float32)
    plan = [("random_forest", rf_uri, rf_rows, ("onnx",)),
            ("torch_mlp", mlp_uri, mlp_rows, ("onnx", "torchscript"))]

    results, convert_s, shapes = [], {}, {}
    for label, uri, rows, formats in plan:
        native = prefetch.warm(uri)
        shapes[label] = {"native_bytes": native.bytes}
        results.append(measure(label, "native", lambda p=native.path: load_native(p), rows[:1], rows, args))
        for fmt in formats:
            w = prefetch.warm(uri, format=fmt)
            doc = json.loads((w.path / ".prefetch.json").read_text())
            convert_s[f"{label}/{fmt}"] = doc["seconds"]
            shapes[label][f"{fmt}_bytes"] = w.bytes
            shapes[label][f"{fmt}_converter"] = doc["converter_id"]
            shapes[label][f"{fmt}_max_abs_error"] = doc["validation"]["max_abs_error"]
            results.append(measure(label, fmt, lambda p=w.path, f=fmt: load_converted(p, f), rows[:1], rows, args))
    shapes["random_forest"]["shape"] = "RandomForestRegressor(20 trees, depth 10, 4 features)"
    shapes["torch_mlp"]["shape"] = f"MLP {args.features}-{args.hidden}-{args.hidden}-1 ({mlp_params} params, pt2)"

    print(f"\n{'model':<14} {'format':<12} {'load':>9} {'1 row p50':>10} {'1 row p99':>10} "
          f"{'1k p50':>9} {'1k p99':>9}", file=sys.stderr)
    for r in results:
        print(f"{r['model']:<14} {r['format']:<12} {r['load_s'] * 1e3:>7.1f}ms {r['one_p50_ms']:>8.3f}ms "
              f"{r['one_p99_ms']:>8.3f}ms {r['batch_p50_ms']:>7.2f}ms {r['batch_p99_ms']:>7.2f}ms", file=sys.stderr)
    for label, s in shapes.items():
        print(f"{label}: {s}", file=sys.stderr)
    print(f"conversion (once per node): {', '.join(f'{k} {v:.2f}s' for k, v in convert_s.items())}", file=sys.stderr)

    ratios = {}
    by = {(r["model"], r["format"]): r for r in results}
    for label, _uri, _rows, formats in plan:
        base = by[(label, "native")]
        for fmt in formats:
            r = by[(label, fmt)]
            ratios[f"{label}/{fmt}"] = {k: round(base[k] / r[k], 2) for k in
                                        ("load_s", "one_p50_ms", "one_p99_ms", "batch_p50_ms", "batch_p99_ms")}
    rounded = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in results]
    print(json.dumps({"bench": "convert", "threads": 1, "results": rounded, "ratios_native_over_converted": ratios,
                      "conversion_s": convert_s, "models": shapes}))
    reg.stop()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
