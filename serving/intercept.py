"""The drop-in for unchanged MLflow code: `models:/` and `runs:/` downloads served from the node cache.

With `PREFETCH_INTERCEPT_MLFLOW=1` in a process's environment (e.g. a Serve deployment's
`runtime_env: {env_vars: {PREFETCH_INTERCEPT_MLFLOW: "1"}}`), the guide's own code

    self.model = mlflow.sklearn.load_model("models:/fraud@champion")

downloads nothing the node already holds: `mlflow.pyfunc.load_model`, `mlflow.<flavor>.load_model` and
`mlflow.artifacts.download_artifacts` ask MLflow's artifact repository registry for a repository for the
`models` / `runs` scheme, and this package registers one through MLflow's extension point, the
`mlflow.artifact_repository` entry point (pyproject.toml). MLflow registers entry points after its own
schemes, so ours take `models` and `runs` over. No monkey-patching.

What the repository does:
- variable unset (or not "1"/"true"/"yes"): the factory returns MLflow's own repository; nothing changes.
- set: the URI is warmed as `serving.load_model` does (through this node's agent when one runs, else
  `prefetch.warm`; one origin download per node) and the local files are handed to MLflow at the destination
  it asked for: hard links (no bytes copied; the cache's files are read-only, so MLflow cannot change them
  through a link), or a writable copy when the destination is on another filesystem.
- the warm fails (not a URI the cache understands, a registry on another platform, an error): one log line
  per URI, then MLflow's own repository does the download, so a load plain MLflow would do never fails here.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

ENV = "PREFETCH_INTERCEPT_MLFLOW"
_ON = {"1", "true", "yes", "on"}
_META = "registered_model_meta"     # the file MLflow writes beside a registered model it downloads
# Where MLflow 3 keeps a logged model's files: <experiment artifact root>/models/<model id>/artifacts
_LOGGED_MODEL_STORAGE = re.compile(r"/models/m-[0-9a-zA-Z]+/artifacts/?$")

_logged: set[str] = set()
_logged_lock = threading.Lock()


def enabled(env: dict | None = None) -> bool:
    return (env if env is not None else os.environ).get(ENV, "").strip().lower() in _ON


# -- the entry points ---------------------------------------------------------------------------------------
def models_repository(artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None):
    """`mlflow.artifact_repository` entry point for `models:/`."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    return _repository(ModelsArtifactRepository, artifact_uri, tracking_uri, registry_uri, _models_target)


def runs_repository(artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None):
    """`mlflow.artifact_repository` entry point for `runs:/`."""
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    return _repository(RunsArtifactRepository, artifact_uri, tracking_uri, registry_uri, _runs_target)


def _repository(mlflow_class, artifact_uri, tracking_uri, registry_uri, target):
    def mlflow_repository():
        return mlflow_class(artifact_uri, tracking_uri=tracking_uri, registry_uri=registry_uri)

    if not enabled() or "://" in artifact_uri or tracking_uri or registry_uri:
        # Off, a profile-qualified URI (models://profile@databricks/...), or an explicit tracking/registry URI
        # the cache's resolution (which reads MLFLOW_TRACKING_URI) would not honour: MLflow's own, unchanged.
        return mlflow_repository()
    return CachedRepository(artifact_uri, mlflow_repository, target)


# -- which cache entry serves which request -----------------------------------------------------------------
def _models_target(root_uri: str, artifact_path: str) -> tuple[str, str]:
    """models:/name/1 + sub/path: the cache holds the whole model; the request is a path inside it."""
    return root_uri, artifact_path


def _runs_target(root_uri: str, artifact_path: str) -> tuple[str, str]:
    """runs:/<id>/dir + name: the cache entry is the requested path itself."""
    full = root_uri.rstrip("/") + ("/" + artifact_path.strip("/") if artifact_path.strip("/") else "")
    return full, ""


class CachedRepository:
    """What MLflow's registry gets for `models:/` / `runs:/` while the variable is set: `download_artifacts`
    from the node cache; everything else (listing, logging) is MLflow's own repository's, built on first use
    (building it costs a registry call, which the cache path does not need)."""

    def __init__(self, artifact_uri: str, mlflow_repository: Callable[[], Any],
                 target: Callable[[str, str], tuple[str, str]]):
        self.artifact_uri = artifact_uri
        self._make_mlflow = mlflow_repository
        self._mlflow = None
        self._target = target

    def mlflow_repository(self):
        if self._mlflow is None:
            self._mlflow = self._make_mlflow()
        return self._mlflow

    def __getattr__(self, name: str):
        # Only reached for attributes this class does not define: MLflow's repository answers them.
        if name.startswith("__") or name in ("_make_mlflow", "_mlflow", "_target"):
            raise AttributeError(name)
        return getattr(self.mlflow_repository(), name)

    def download_artifacts(self, artifact_path: str, dst_path: str | None = None, **kwargs) -> str:
        uri, inner = self._target(self.artifact_uri, artifact_path or "")
        try:
            return serve_from_cache(uri, inner, artifact_path or "", dst_path)
        except Exception as e:
            _log_once(uri, e)
        return self.mlflow_repository().download_artifacts(artifact_path, dst_path, **kwargs)


def _log_once(uri: str, error: BaseException) -> None:
    from prefetch.errors import one_line

    with _logged_lock:
        if uri in _logged:
            return
        _logged.add(uri)
    logger.warning("%s: node cache unavailable (%s); MLflow downloads it itself", uri, one_line(error))


# -- warm, then hand MLflow the files ------------------------------------------------------------------------
def serve_from_cache(uri: str, inner: str, artifact_path: str, dst_path: str | None) -> str:
    """Warm `uri` through the node cache, put `inner` (a path inside it, "" = all) at dst_path/artifact_path
    as MLflow would, and return that local path."""
    from .loader import warm_local

    warmed = warm_local(uri)
    source = _inside(Path(warmed.path), inner)
    if not source.exists():
        raise FileNotFoundError(f"{inner!r} is not in the cached artifacts")
    if dst_path:
        dst = Path(dst_path).resolve()
        if not dst.is_dir():
            raise NotADirectoryError(f"destination {dst} is not a directory")  # MLflow's own repo says it better
    else:
        from mlflow.utils.file_utils import create_tmp_dir

        dst = Path(create_tmp_dir())
    target = _inside(dst, artifact_path.strip("/")) if artifact_path.strip("/") else dst
    link_tree(source, target)
    meta = _registered_meta(uri, warmed.resolved)
    if meta is not None and target.is_dir() and (target / "MLmodel").is_file():
        _write_registered_meta(target, meta)
    return str(target)


def _registered_meta(uri: str, resolved) -> dict | None:
    """What MLflow's models repository records beside a model it downloads: the registered name and version,
    or nulls for a logged model (models:/m-..., or a runs:/ path MLflow 3 resolves to one). None: MLflow's
    run repository downloaded it, and writes nothing."""
    if uri.startswith("runs:/"):
        if not _LOGGED_MODEL_STORAGE.search(resolved.storage_uri or ""):
            return None
        return {"model_name": None, "model_version": None}
    if resolved.kind == "logged_model":
        return {"model_name": None, "model_version": None}
    return {"model_name": resolved.name, "model_version": resolved.version}


def _inside(root: Path, rel: str) -> Path:
    """root/rel, refusing a rel that climbs out of root."""
    path = (root / rel).resolve() if rel else root
    if path != root.resolve() and root.resolve() not in path.parents:
        raise ValueError(f"{rel!r} is outside {root}")
    return path


def link_tree(source: Path, target: Path) -> None:
    """Hard-link source (a file or a tree) to target; copy where links cannot be made (another filesystem).
    The store's manifest is the cache's, not the model's: it is left out."""
    if source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(source, target)
        return
    for dirpath, _dirs, files in os.walk(source):
        rel = Path(dirpath).relative_to(source)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if rel == Path(".") and name == ".prefetch.json":
                continue
            _link_or_copy(Path(dirpath) / name, target / rel / name)


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)


def _write_registered_meta(model_dir: Path, meta: dict) -> None:
    """The file MLflow's models repository writes after a download (same content), so the tree is MLflow's."""
    from mlflow.utils.yaml_utils import write_yaml

    write_yaml(str(model_dir), _META, meta, overwrite=True, ensure_yaml_extension=False)
