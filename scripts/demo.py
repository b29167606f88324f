#!/usr/bin/env python
"""`make demo`: the whole path on the embedded default, with no servers configured.

1. trains the Ray Serve guide's RandomForest and registers it in a local sqlite registry (demo-data/mlflow.db,
   artifacts in demo-data/artifacts), alias `champion`;
2. loads it through the node-local cache twice: cold (the cache is empty: fetch, verify, commit, load) and warm
   (a cache hit: load only), next to MLflow's own `pyfunc.load_model("models:/...")`, which is what every
   replica of the guide's deployment does;
3. starts Ray Serve on a free loopback port with the RegistryModel app, sends a real HTTP request and prints
   the prediction, the version that answered and how long the replica took to get its model.

Everything it writes stays in demo-data/ (gitignored); each run starts from an empty demo-data/.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "demo-data"
NAME = "sk-learn-random-forest-reg-model"
SKOPS_TRUSTED_TYPES = ["sklearn.tree._tree.Tree"]   # MLflow 3.17's skops refuses the guide's call without it


def say(text: str) -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(serve, attempts: int = 3) -> int:
    """Serve's HTTP proxy on a free loopback port (another pick if the port was taken meanwhile)."""
    for attempt in range(attempts):
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            return port
        except Exception:
            serve.shutdown()
            if attempt == attempts - 1:
                raise
    raise RuntimeError("unreachable")


def pinned(*dists: str) -> list[str]:
    """Explicit requirements: MLflow's inference runs the model in a subprocess (~20 s here)."""
    from importlib.metadata import version

    return [f"{d}=={version(d)}" for d in dists]


def train_and_register() -> tuple[str, list[list[float]]]:
    """The guide's train_and_register_model(), in the form that works on MLflow 3.17 (skops_trusted_types)."""
    import mlflow
    from mlflow import MlflowClient
    from sklearn.datasets import make_regression
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.metrics import mean_squared_error
    from sklearn.model_selection import train_test_split

    client = MlflowClient()
    experiment = client.create_experiment("demo", artifact_location=(WORK / "artifacts").as_uri())
    X, y = make_regression(n_samples=1000, n_features=4, n_informative=2, noise=0.1, random_state=0)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0)
    params = {"n_estimators": 20, "max_depth": 10, "random_state": 0}
    with mlflow.start_run(experiment_id=experiment):
        model = RandomForestRegressor(**params).fit(X_train, y_train)
        mlflow.log_params(params)
        mlflow.log_metrics({"mse": mean_squared_error(y_test, model.predict(X_test))})
        info = mlflow.sklearn.log_model(sk_model=model, name="sklearn-model", input_example=X_train[:5],
                                        registered_model_name=NAME, skops_trusted_types=SKOPS_TRUSTED_TYPES,
                                        pip_requirements=pinned("mlflow", "scikit-learn", "skops", "numpy"))
    client.set_registered_model_alias(NAME, "champion", info.registered_model_version)
    return f"models:/{NAME}@champion", X_test[:2].tolist()


def main() -> int:
    started = time.monotonic()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    os.environ.update({
        "MLFLOW_TRACKING_URI": f"sqlite:///{WORK / 'mlflow.db'}",
        "PREFETCH_CACHE_DIR": str(WORK / "cache"),
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONWARNINGS": "ignore",   # inherited by the replicas: keep their logs about the demo
    })
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)

    say(f"[1/3] training the Ray guide's RandomForest and registering it in {WORK.relative_to(REPO)}/mlflow.db")
    t = time.monotonic()
    uri, rows = train_and_register()
    say(f"      registered {uri} in {time.monotonic() - t:.1f}s")

    say("[2/3] loading it through the node-local cache (demo-data/cache)")
    import mlflow.pyfunc

    import serving

    cold = serving.load_model(uri)
    cold_total = cold.warmed.seconds + cold.load_seconds
    cold.release()
    warm = serving.load_model(uri)
    warm_total = warm.warmed.seconds + warm.load_seconds
    warm.release()
    t = time.monotonic()
    mlflow.pyfunc.load_model(uri)
    mlflow_seconds = time.monotonic() - t
    say(f"      cold load: {cold_total:.3f}s (fetched {cold.warmed.origin_bytes / 1e6:.1f} MB into the cache in "
        f"{cold.warmed.seconds:.3f}s, loaded in {cold.load_seconds:.3f}s)")
    say(f"      warm load: {warm_total:.3f}s (cache hit in {warm.warmed.seconds:.3f}s, "
        f"loaded in {warm.load_seconds:.3f}s)")
    say(f"      for comparison, mlflow.pyfunc.load_model('{uri}'): {mlflow_seconds:.3f}s, every time")

    say("[3/3] starting Ray Serve with the RegistryModel app and sending an HTTP request")
    import ray
    import requests
    from ray import serve

    from serving.examples import Model

    # address="local": always a fresh instance, never a cluster some other `ray start` left behind.
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 << 20,
             logging_level="ERROR", log_to_driver=False, namespace="prefetch-demo")
    try:
        port = start_serve(serve)
        t = time.monotonic()
        serve.run(Model.options(user_config={"model_uri": uri}, ray_actor_options={"num_cpus": 0.5}).bind(),
                  name="demo", route_prefix="/")
        ready = time.monotonic() - t
        url = f"http://127.0.0.1:{port}/"
        body = {"inputs": rows}
        answer = requests.post(url, json=body, timeout=60)
        answer.raise_for_status()
        info = requests.get(f"{url}-/model", timeout=60).json()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    doc = answer.json()
    say("")
    say(f"POST {url} {json.dumps(body)}")
    say(f"  -> {json.dumps(doc)}")
    say(f"prediction:  {', '.join(f'{p:.3f}' for p in doc['predictions'])}  "
        f"(model {doc['model']} version {doc['version']})")
    say(f"cold load:   {cold_total:.3f}s  (empty cache: fetch {cold.warmed.seconds:.3f}s + load "
        f"{cold.load_seconds:.3f}s)")
    say(f"warm load:   {warm_total:.3f}s  (cache hit {warm.warmed.seconds:.3f}s + load {warm.load_seconds:.3f}s)")
    found = "cache hit" if info["from_cache"] else "fetched"
    say(f"replica:     ready in {ready:.1f}s; its model: resolve {uri.rsplit('/', 1)[-1]} + {found} "
        f"{info['warm_seconds']:.3f}s (the process's first registry call), load {info['load_seconds']:.3f}s "
        f"from {info['path']}; the rest is process start and imports")
    say(f"done in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
