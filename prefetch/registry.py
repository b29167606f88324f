"""MLflow specifics: which tracking/registry server we talk to, and how each `models:/` / `runs:/` form
becomes an immutable version and a storage location. mlflow is imported only here, and only when a
registry call is really needed (a cache hit on a pinned version never imports it); a registered model version
on an http(s) tracking server is resolved without it, by MLflow's REST routes (registry_rest.py).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from .errors import BadURI, NotFound, PrefetchError, Unreachable

STAGES = {"none": "None", "staging": "Staging", "production": "Production", "archived": "Archived"}


def tracking_uri() -> str:
    """MLflow's tracking URI as mlflow itself would pick it, without importing mlflow when it is not loaded."""
    import sys

    if "mlflow" in sys.modules:
        import mlflow

        return normalize(mlflow.get_tracking_uri())
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return normalize(uri)
    if Path("mlruns").is_dir() and not Path("mlflow.db").exists():
        return normalize(Path("mlruns").absolute().as_uri())  # MLflow 3 keeps using an existing ./mlruns
    return normalize("sqlite:///mlflow.db")                    # MLflow 3's default


def registry_uri() -> str:
    import sys

    if "mlflow" in sys.modules:
        import mlflow

        return normalize(mlflow.get_registry_uri())
    return normalize(os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri())


def normalize(uri: str) -> str:
    """Stable spelling of a tracking URI, used in cache keys: absolute sqlite/file paths, no trailing slash."""
    uri = str(uri).rstrip("/")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).absolute())
    parsed = urlparse(uri)
    if parsed.scheme == "" and uri:
        return Path(uri).absolute().as_uri()
    return uri


def _http_defaults() -> None:
    # MLflow's REST client retries a refused connection for minutes by default; an operator at a terminal
    # (and a node start-up hook) wants the answer in seconds. The user's own settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def _rest():
    """registry_rest when it can answer for the registry in use (an http(s) MLflow server), else None: the
    mlflow client then (sqlite, file, databricks, plugin auth...)."""
    from . import registry_rest

    registry, tracking = registry_uri(), tracking_uri()
    if not registry_rest.applies(registry, tracking):
        return None
    _http_defaults()
    return registry_rest, registry, tracking


def _client():
    _http_defaults()
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri(), registry_uri=registry_uri())


@contextlib.contextmanager
def mlflow_errors(uri: str) -> Iterator[None]:
    """MLflow and requests exceptions -> our errors, with one line naming the URI."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated; users still have them
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    except PrefetchError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes one of ours
        raise translate(e, uri) from None


def translate(e: Exception, uri: str) -> PrefetchError:
    from mlflow.exceptions import MlflowException

    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    lowered = str(e).lower()
    unreachable_marks = ("max retries exceeded", "connection refused", "failed to establish", "name or service not known",
                         "connectionerror", "timed out", "remotedisconnected", "connection aborted")
    if any(m in lowered for m in unreachable_marks):
        return Unreachable(f"cannot reach the MLflow tracking server at {tracking_uri()}", uri)
    if isinstance(e, MlflowException):
        code = getattr(e, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in lowered or "does not exist" in lowered:
            return NotFound(_short(text), uri)
        if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            return Unreachable(f"the tracking server refused us: {_short(text)}", uri)
        if code == "INVALID_PARAMETER_VALUE":
            return BadURI(_short(text), uri)
        return Unreachable(f"MLflow error: {_short(text)}", uri)
    if isinstance(e, (ConnectionError, TimeoutError, OSError)):
        return Unreachable(f"cannot reach the MLflow tracking server at {tracking_uri()} ({type(e).__name__})", uri)
    return PrefetchError(f"MLflow error: {_short(text)}", uri)


def _short(text: str) -> str:
    return text if len(text) < 300 else text[:297] + "..."


def model_version(uri: str, name: str, *, version: str | None = None, stage: str | None = None,
                  alias: str | None = None) -> dict:
    """One registry call: the immutable version a `models:/` form points at now, with its run and model ids."""
    rest = _rest()
    if rest is not None:
        module, registry, tracking = rest
        return module.model_version(registry, tracking, uri, name, version=version, stage=stage, alias=alias)
    return mlflow_model_version(uri, name, version=version, stage=stage, alias=alias)


def mlflow_model_version(uri: str, name: str, *, version: str | None = None, stage: str | None = None,
                         alias: str | None = None) -> dict:
    """model_version() through the mlflow client (any tracking store)."""
    with mlflow_errors(uri):
        client = _client()
        if version is not None:
            mv = client.get_model_version(name, version)
        elif alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            # One call: a registered model carries the latest version of each stage (get_latest_versions
            # costs two round trips through the REST client).
            candidates = client.get_registered_model(name).latest_versions or []
            if stage is not None:
                candidates = [m for m in candidates if (m.current_stage or "").lower() == stage.lower()]
            if not candidates:
                where = f"in stage '{STAGES[stage.lower()]}'" if stage else "at all"
                raise NotFound(f"registered model '{name}' has no version {where}", uri)
            mv = max(candidates, key=lambda m: int(m.version))
        return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id or None,
                "model_id": getattr(mv, "model_id", None) or None, "source": mv.source,
                "stage": mv.current_stage, "aliases": list(getattr(mv, "aliases", []) or [])}


def version_storage(uri: str, name: str, version: str) -> str:
    """Where a model version's files are (s3://, mlflow-artifacts:/, a local path)."""
    rest = _rest()
    if rest is not None:
        module, registry, tracking = rest
        return module.version_storage(registry, tracking, uri, name, version)
    return mlflow_version_storage(uri, name, version)


def mlflow_version_storage(uri: str, name: str, version: str) -> str:
    with mlflow_errors(uri):
        return _client().get_model_version_download_uri(name, version)


def logged_model(uri: str, model_id: str) -> dict:
    with mlflow_errors(uri):
        lm = _client().get_logged_model(model_id)
        return {"model_id": lm.model_id, "name": lm.name, "run_id": lm.source_run_id,
                "storage": lm.artifact_location}


def run_storage(uri: str, run_id: str, path: str) -> str:
    """`runs:/<run_id>/<path>`. In MLflow 3 a model logged from a run lives apart from the run's artifacts, as a
    logged model named after the first path segment; MLflow resolves that name first, and so do we."""
    with mlflow_errors(uri):
        client = _client()
        run = client.get_run(run_id)
        if path:
            name, _, rest = path.partition("/")
            token = None
            while True:
                page = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                   filter_string=f"name = '{name}'", page_token=token)
                for lm in page:
                    if lm.source_run_id == run_id:
                        base = lm.artifact_location.rstrip("/")
                        return f"{base}/{rest}" if rest else base
                token = page.token
                if not token:
                    break
        base = run.info.artifact_uri.rstrip("/")
        return f"{base}/{path}" if path else base
