#!/usr/bin/env python
"""Memory of K Serve replicas of one model on one node (issue K), three ways:
  seed    - the Ray guide's way: every replica calls mlflow.pyfunc.load_model(uri) (a private copy each);
  native  - RegistryModel (serving.load_model, share_weights=True): the MLflow pytorch model, weights mapped
            from the node-local cache;
  onnx    - RegistryModel with format "onnx": onnxruntime maps the external data of the cached conversion.
For K = 1, 2, 4, 8: deploy K replicas, make every replica answer (so mapped weights are resident), then read the
sum of the replicas' PSS (/proc/<pid>/smaps_rollup) while all K are alive. The same K replicas with no model
(the same class and imports, nothing loaded) give the runtime's share, measured the same way; the model part is
the difference, compared with K x the model's weight size.

Real parts: an embedded MLflow registry (sqlite + local artifact dir), a torch MLP (~72 MiB of float32 weights)
logged with mlflow.pytorch, a local Ray with Serve on a free port, a node-local cache in a temp dir.

Usage: python scripts/bench_memory.py [--replicas 1,2,4,8] [--modes seed,native,onnx] [--width 3072]
       [--plot docs/memory.png]
Prints a table and one JSON line; writes the plot (PNG) to --plot.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from benchkit import REPO  # noqa: E402  (the repo on sys.path, no telemetry)

from tests import harness  # noqa: E402  (the same real-registry harness the tests use)

MiB = 1 << 20
MODEL_NAME = "bench-memory-mlp"


def register_mlp(env: dict, width: int) -> tuple[str, int]:
    import mlflow
    import numpy as np

    net, weight_bytes = harness.models.torch_mlp(width)
    X = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    with harness.mlflow_env(env), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mlflow.start_run(run_name=MODEL_NAME):
            info = mlflow.pytorch.log_model(net, name="mlp", input_example=X, registered_model_name=MODEL_NAME,
                                            pip_requirements=["torch"])
    return f"models:/{MODEL_NAME}/{info.registered_model_version}", weight_bytes


def deployments():
    """The two replica classes (defined here so the script needs nothing beyond the library)."""
    from ray import serve

    from serving import RegistryModel

    def runtime() -> None:
        # Every runtime any mode needs, in every replica (also the empty ones): the runtime's share is the same.
        import mlflow.models  # noqa: F401
        import mlflow.pyfunc  # noqa: F401
        import mlflow.pytorch  # noqa: F401
        import onnxruntime  # noqa: F401
        import torch  # noqa: F401

        from serving.mapping import import_pt2_loader

        import_pt2_loader()

    @serve.deployment(name="Ours")
    class Ours(RegistryModel):
        def __init__(self):
            runtime()
            super().__init__()

        def touch(self, rows) -> int:
            import numpy as np

            if self.model is not None:
                self.model.predict(np.asarray(rows, dtype=np.float32))
            return os.getpid()

    @serve.deployment(name="Seed")
    class Seed:
        """The guide's way: mlflow.pyfunc.load_model(uri) in every replica."""

        def __init__(self, model_uri: str | None = None):
            runtime()
            import mlflow.pyfunc

            self.model = mlflow.pyfunc.load_model(model_uri) if model_uri else None

        def touch(self, rows) -> int:
            import numpy as np

            if self.model is not None:
                self.model.predict(np.asarray(rows, dtype=np.float32))
            return os.getpid()

    return Ours, Seed


def pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss for {pid}")


def run(app, name: str, k: int) -> tuple[int, float]:
    """Deploy, make every replica answer, sum their PSS; (bytes, seconds to ready)."""
    import numpy as np
    from ray import serve

    started = time.perf_counter()
    handle = serve.run(app, name=name, route_prefix=f"/{name}")
    ready = time.perf_counter() - started
    rows = np.random.default_rng(1).normal(size=(1, 32)).astype(np.float32).tolist()
    pids: set[int] = set()
    for _ in range(60 * k):
        pids.add(handle.touch.remote(rows).result())
        if len(pids) == k:
            break
    if len(pids) != k:
        raise RuntimeError(f"{name}: only {len(pids)} of {k} replicas answered")
    total = sum(pss(p) for p in pids)
    serve.delete(name)
    return total, ready


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", default="1,2,4,8")
    ap.add_argument("--modes", default="seed,native,onnx")
    ap.add_argument("--width", type=int, default=3072, help="hidden width (2 square layers: width^2 x 8 bytes)")
    ap.add_argument("--plot", default=str(REPO / "docs" / "memory.png"))
    args = ap.parse_args()
    ks = [int(k) for k in args.replicas.split(",")]
    modes = args.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=os.environ.get("BENCH_DIR")))
    registry = harness.EmbeddedRegistry(work / "mlflow")
    ray_tmp = None
    results: list[dict] = []
    import ray

    try:
        registry.start()
        uri, weight_bytes = register_mlp(registry.env(), args.width)
        cache = work / "cache"
        cache.mkdir()
        env = {**registry.env(), "PREFETCH_CACHE_DIR": str(cache), "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": str(REPO), "TMPDIR": str(work / "tmp")}
        (work / "tmp").mkdir()
        harness.apply_env(registry.env())
        os.environ["PREFETCH_CACHE_DIR"] = str(cache)
        import prefetch

        for fmt in ("native", "onnx"):     # download and convert once, before any replica starts
            prefetch.warm(uri, format=fmt)
        print(f"model {uri}: {weight_bytes / MiB:.1f} MiB of weights", flush=True)
        # Its own Ray session dir (short: Ray's socket paths have a length limit), not the machine's /tmp/ray.
        ray_tmp = tempfile.mkdtemp(prefix="rbm-", dir="/tmp")
        ray.init(address="local", num_cpus=16, include_dashboard=False, object_store_memory=100 << 20,
                 logging_level="ERROR", log_to_driver=False, namespace="bench-memory",
                 runtime_env={"env_vars": env}, _temp_dir=ray_tmp)
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": harness.free_port()})
        Ours, Seed = deployments()
        opts = {"num_cpus": 0.1}
        for k in ks:
            runtime, _ = run(Ours.options(num_replicas=k, ray_actor_options=opts).bind(), f"empty{k}", k)
            for mode in modes:
                if mode == "seed":
                    app = Seed.options(num_replicas=k, ray_actor_options=opts).bind(model_uri=uri)
                else:
                    config = {"model_uri": uri, "format": mode}
                    app = Ours.options(num_replicas=k, ray_actor_options=opts, user_config=config).bind()
                total, ready = run(app, f"{mode}{k}", k)
                model_part = total - runtime
                r = {"mode": mode, "replicas": k, "pss_bytes": total, "runtime_pss_bytes": runtime,
                     "model_part_bytes": model_part, "ratio": round(model_part / (k * weight_bytes), 3),
                     "ready_s": round(ready, 1)}
                results.append(r)
                print(f"  K={k} {mode:<7} sum PSS {total / MiB:8.1f} MiB, runtime {runtime / MiB:8.1f} MiB, "
                      f"model part {model_part / MiB:7.1f} MiB = {r['ratio']:.2f} x K x weights "
                      f"(ready {ready:.0f}s)", flush=True)
    finally:
        if ray.is_initialized():
            from ray import serve

            serve.shutdown()
            ray.shutdown()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    report(results, weight_bytes, args)


def report(results: list[dict], weight_bytes: int, args) -> None:
    label = {"seed": "seed: pyfunc.load_model", "native": "ours: native (mapped)", "onnx": "ours: onnx (mapped)"}
    print(f"\nweights {weight_bytes / MiB:.1f} MiB; one node, {os.cpu_count()} cores; PSS summed over the K "
          "replicas, runtime = the same K replicas with nothing loaded\n")
    print(f"{'K':>3}  {'way':<26}{'sum PSS MiB':>12}{'runtime MiB':>12}{'model MiB':>11}{'K x weights':>12}"
          f"{'ratio':>7}")
    for r in results:
        print(f"{r['replicas']:>3}  {label[r['mode']]:<26}{r['pss_bytes'] / MiB:>12.1f}"
              f"{r['runtime_pss_bytes'] / MiB:>12.1f}{r['model_part_bytes'] / MiB:>11.1f}"
              f"{r['replicas'] * weight_bytes / MiB:>12.1f}{r['ratio']:>7.2f}")
    plot(results, weight_bytes, args.plot)
    print(json.dumps({"bench": "memory", "weight_bytes": weight_bytes, "results": results, "plot": args.plot}))


def plot(results: list[dict], weight_bytes: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ks = sorted({r["replicas"] for r in results})
    left.plot(ks, [k * weight_bytes / MiB for k in ks], "k--", label="K x weights")
    for mode in dict.fromkeys(r["mode"] for r in results):
        rows = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["replicas"])
        left.plot([r["replicas"] for r in rows], [r["model_part_bytes"] / MiB for r in rows], "o-", label=mode)
        right.plot([r["replicas"] for r in rows], [r["ratio"] for r in rows], "o-", label=mode)
    left.set(xlabel="replicas on one node (K)", ylabel="model part of summed PSS (MiB)", xticks=ks)
    right.set(xlabel="replicas on one node (K)", ylabel="model part / (K x weights)", xticks=ks)
    right.axhline(1.0, color="k", ls="--", lw=0.8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Replica memory, one node ({weight_bytes / MiB:.0f} MiB of weights)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
