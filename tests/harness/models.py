"""Models the tests register in a real MLflow registry.

- the Ray Serve MLflow guide's model (a RandomForestRegressor on synthetic data), in several
  versions with a stage and aliases: register_seed_versions();
- a pyfunc model with large random files (+ many small ones) for the benchmark and the resume
  test: register_large_model().

All registration functions take a client environment (MlflowServer.env(), EmbeddedRegistry.env())
and apply it only for their own duration (mlflow_env).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

SEED_MODEL_NAME = "sk-learn-random-forest-reg-model"
SKOPS_TRUSTED_TYPES = ["sklearn.tree._tree.Tree"]
SEED_ARTIFACT_PATH = "sklearn-model"

# Environment prefixes that select an MLflow / S3 set-up; switching set-ups clears them all.
ENV_PREFIXES = ("MLFLOW_", "AWS_")
# ...except these, which keep mlflow from phoning home in every set-up.
KEEP_ENV = frozenset({"MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"})

_CHUNK = 8 * 1024 * 1024


# --- switching MLflow set-ups ----------------------------------------------------------------
def reset_mlflow_uris(tracking_uri: str | None = None, registry_uri: str | None = None) -> None:
    """Forget mlflow's process-global tracking/registry URIs, then set the given ones (if any).

    With both None, mlflow reads MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI from os.environ again.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as reg_utils
    from mlflow.tracking._tracking_service import utils as trk_utils

    if mlflow.active_run() is not None:
        mlflow.end_run()
    trk_utils._tracking_uri = None
    reg_utils._registry_uri = None
    # MLflow caches its boto3 client per endpoint (lru_cache, up to hours), and that client keeps
    # the AWS_* credentials it was built with: switching credentials needs a fresh one.
    s3_repo = sys.modules.get("mlflow.store.artifact.s3_artifact_repo")
    if s3_repo is not None and hasattr(s3_repo, "_cached_get_s3_client"):
        s3_repo._cached_get_s3_client.cache_clear()
    # boto3.client() goes through boto3's default Session, whose credentials are resolved from
    # AWS_* once and then kept: drop it so the next client reads the environment again.
    boto3 = sys.modules.get("boto3")
    if boto3 is not None:
        boto3.DEFAULT_SESSION = None
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry_uri or tracking_uri)
    elif registry_uri:
        mlflow.set_registry_uri(registry_uri)


def apply_env(env: Mapping[str, str]) -> dict[str, str | None]:
    """Replace every MLFLOW_*/AWS_* variable in os.environ by those of `env`, point mlflow at it.

    Returns the previous values of every key touched, for restore_env().
    """
    saved: dict[str, str | None] = {}
    for k in list(os.environ):
        if k.startswith(ENV_PREFIXES) and k not in KEEP_ENV:
            saved[k] = os.environ.pop(k)
    for k, v in env.items():
        if k not in saved:
            saved[k] = os.environ.get(k)
        os.environ[k] = v
    reset_mlflow_uris(env.get("MLFLOW_TRACKING_URI"), env.get("MLFLOW_REGISTRY_URI"))
    # set_registry_uri exports MLFLOW_REGISTRY_URI; make sure restore_env knows about it.
    saved.setdefault("MLFLOW_REGISTRY_URI", None)
    return saved


def restore_env(saved: Mapping[str, str | None]) -> None:
    reset_mlflow_uris()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    reset_mlflow_uris()


@contextlib.contextmanager
def mlflow_env(env: Mapping[str, str]) -> Iterator[None]:
    """Run a block with MLflow (and S3) configured by `env` only, then put everything back."""
    saved = apply_env(env)
    try:
        yield
    finally:
        restore_env(saved)


# --- the guide's model -----------------------------------------------------------------------
def train_seed_model(seed: int = 0):
    """(model, X_train, X_test): the Ray Serve MLflow guide's RandomForestRegressor.

    The data set is fixed (so X_test is the same for every version); `seed` changes the forest,
    so versions predict different values. ~2 MB serialized.
    """
    from sklearn.datasets import make_regression
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.model_selection import train_test_split

    X, y = make_regression(n_samples=1000, n_features=4, n_informative=2, noise=0.1, random_state=0)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0)
    model = RandomForestRegressor(n_estimators=20, max_depth=10, random_state=seed)
    model.fit(X_train, y_train)
    return model, X_train, X_test


def _version_record(client, name: str, version: int | str, info=None) -> dict[str, Any]:
    mv = client.get_model_version(name, str(version))
    model_id = getattr(mv, "model_id", None) or (info.model_id if info is not None else None)
    artifact_location = None
    if model_id:
        try:
            artifact_location = client.get_logged_model(model_id).artifact_location
        except Exception:
            artifact_location = None
    return {
        "name": name,
        "version": int(mv.version),
        "run_id": mv.run_id,
        "model_id": model_id,
        "model_uri": info.model_uri if info is not None else f"models:/{model_id}",
        "source": mv.source,
        "artifact_location": artifact_location,
        "registry_uri": f"models:/{name}/{mv.version}",
    }


def _pins(*dists: str) -> list[str]:
    """Explicit pip requirements: MLflow's inference of them costs ~20 s per log_model here
    (it loads the model in a subprocess that imports everything installed, torch included)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for d in dists:
        try:
            out.append(f"{d}=={version(d)}")
        except PackageNotFoundError:
            out.append(d)
    return out


def register_seed_versions(
    env: Mapping[str, str],
    name: str = SEED_MODEL_NAME,
    n_versions: int = 2,
    infer_pip_requirements: bool = False,
) -> dict[str, Any]:
    """Log + register n versions of the guide's model (seeds 0..n-1), then:
    version 1 -> stage Production, latest -> alias "champion", version 1 -> alias "stable".

    infer_pip_requirements=True logs exactly the guide's call (MLflow infers requirements: slow);
    by default requirements are pinned explicitly, which changes nothing a loader reads.

    Returns {name, versions: [{version, run_id, model_id, model_uri, source, artifact_location,
    registry_uri}], X_test, expected: {version: predictions}, tracking_uri, env}.
    """
    import mlflow
    from mlflow import MlflowClient

    out: dict[str, Any] = {"name": name, "versions": [], "expected": {}, "env": dict(env)}
    with mlflow_env(env), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = MlflowClient()
        out["tracking_uri"] = mlflow.get_tracking_uri()
        extra = {} if infer_pip_requirements else {"pip_requirements": _pins("mlflow", "scikit-learn", "skops", "numpy")}
        for i in range(n_versions):
            model, X_train, X_test = train_seed_model(seed=i)
            with mlflow.start_run(run_name=f"{name}-seed{i}"):
                info = mlflow.sklearn.log_model(
                    sk_model=model,
                    name=SEED_ARTIFACT_PATH,
                    input_example=X_train[:5],
                    registered_model_name=name,
                    skops_trusted_types=SKOPS_TRUSTED_TYPES,
                    # Named, not inferred: inference runs the model in a subprocess (~20 s per version).
                    **extra,
                )
            version = int(info.registered_model_version)
            rec = _version_record(client, name, version, info)
            out["versions"].append(rec)
            out["expected"][version] = model.predict(X_test)
            out["X_test"] = X_test
        first = out["versions"][0]["version"]
        latest = out["versions"][-1]["version"]
        client.transition_model_version_stage(name, str(first), "Production")
        client.set_registered_model_alias(name, "champion", str(latest))
        client.set_registered_model_alias(name, "stable", str(first))
    return out


# --- large models ----------------------------------------------------------------------------
_FILES_MODEL_CODE = '''\
"""A pyfunc model that is only its artifact files (written by tests/harness/models.py)."""
import hashlib
import os

import mlflow
from mlflow.pyfunc import PythonModel


def _tree_bytes(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


class FilesModel(PythonModel):
    def load_context(self, context):
        # Cheap on purpose: a real model would read its weights; the benchmark measures fetching.
        self.total_bytes = sum(_tree_bytes(p) for p in context.artifacts.values())
        h = hashlib.sha256()
        for key in sorted(context.artifacts):
            p = context.artifacts[key]
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    h.update(f.read(4096))
        self.head_digest = h.hexdigest()

    def predict(self, context, model_input, params=None):
        return [self.total_bytes] * len(model_input)


mlflow.models.set_model(FilesModel())
'''


def write_random_file(path: str | os.PathLike, size: int, seed: int = 0) -> None:
    """`size` pseudo-random (incompressible) bytes, streamed to disk in 8 MiB pieces."""
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(_CHUNK, left)
            f.write(rng.bytes(n))
            left -= n


def register_large_model(
    env: Mapping[str, str],
    name: str,
    large_files: list[tuple[str, int]] = (("weights.bin", 64 * 1024 * 1024),),
    n_small: int = 300,
    small_size: int = 4096,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Log + register a pyfunc model whose artifacts are random files; returns its version record.

    The model directory ends up as  MLmodel, python_model code, ...,
    artifacts/<large file name> (each large file), artifacts/small/part-00000.bin ... (n_small).
    `mlflow.pyfunc.load_model` works on it; predict() returns the artifacts' total size per row.

    Returned: the version record (see register_seed_versions) plus
    files: {path relative to the model dir: size}, total_bytes (artifact bytes), expected_prediction.
    """
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    tmp = Path(tempfile.mkdtemp(prefix="large-model-", dir=workdir))
    try:
        artifacts: dict[str, str] = {}
        files: dict[str, int] = {}
        for i, (fname, size) in enumerate(large_files):
            p = tmp / fname
            write_random_file(p, size, seed=seed * 1000 + i)
            artifacts[fname.replace(".", "_").replace("/", "_")] = str(p)
            files[f"artifacts/{fname}"] = size
        if n_small:
            small = tmp / "small"
            small.mkdir()
            rng = np.random.default_rng(seed + 7)
            for j in range(n_small):
                (small / f"part-{j:05d}.bin").write_bytes(rng.bytes(small_size))
                files[f"artifacts/small/part-{j:05d}.bin"] = small_size
            artifacts["small"] = str(small)
        code = tmp / "files_model.py"
        code.write_text(_FILES_MODEL_CODE)
        total = sum(files.values())
        signature = infer_signature(pd.DataFrame({"x": [0.0]}), np.array([total]))
        with mlflow_env(env), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            client = MlflowClient()
            with mlflow.start_run(run_name=f"{name}-large"):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(code),
                    artifacts=artifacts,
                    signature=signature,
                    registered_model_name=name,
                    pip_requirements=_pins("mlflow", "numpy", "pandas"),
                )
            rec = _version_record(client, name, int(info.registered_model_version), info)
        rec["files"] = files
        rec["total_bytes"] = total
        rec["expected_prediction"] = total
        return rec
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def torch_mlp(width: int, seed: int = 0):
    """(net, weight bytes): the MLP the shared-weights tests and the memory benchmark log, 32 -> width -> width ->
    width -> 4, float32, in eval mode."""
    import torch

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                              torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(),
                              torch.nn.Linear(width, 4)).eval()
    return net, sum(p.numel() * p.element_size() for p in net.parameters())
