"""`load_model(uri, format=...)`: warm through the node-local cache, then load from the local path.

The download happens at most once per node: through this node's agent when one runs (so the agent's status
shows it), else through `prefetch.warm`, whose per-key file lock makes every other process on the node wait
for the same copy instead of starting its own. Loading never touches the network: MLflow reads the local
directory, and a derived (ONNX / TorchScript) model is opened by `prefetch.convert.runtime.load_derived`.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

from prefetch.cluster import compat as _cluster_compat
from prefetch.errors import PrefetchError
from prefetch.formats import FORMATS  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)
_cluster_compat.register_lease_hooks()   # a replica's leases name its Ray actor (checked by other processes)


class ModelLoadError(PrefetchError):
    """The artifacts are on disk but the model cannot be loaded from them."""

    exit_code = 5


@dataclasses.dataclass(eq=False)
class LoadedModel:
    """A model loaded from the node-local cache, with what it is (name, version, key) and where it came from."""

    model: Any                      # mlflow.pyfunc.PyFuncModel, or a prefetch.convert.runtime.DerivedModel
    warmed: Any                     # prefetch.Warmed
    load_seconds: float
    lease: Any = dataclasses.field(default=None, repr=False)
    input_schema: Any = dataclasses.field(default=None, repr=False)   # mlflow Schema (scoring-format parsing)
    loaded_at: float = dataclasses.field(default_factory=time.time)
    sharing: Any = dataclasses.field(default=None, repr=False)        # serving.mapping.Sharing
    memory: dict | None = dataclasses.field(default=None, repr=False)  # serving.memory_profile.measure_load()

    # -- identity ------------------------------------------------------------------------------------------
    @property
    def name(self) -> str | None:
        return self.warmed.resolved.name

    @property
    def version(self) -> str | None:
        return self.warmed.resolved.version

    @property
    def key(self) -> str:
        return self.warmed.key

    @property
    def uri(self) -> str:
        return self.warmed.resolved.uri

    @property
    def path(self) -> Path:
        return Path(self.warmed.path)

    @property
    def format(self) -> str:
        return self.warmed.format

    # -- use -----------------------------------------------------------------------------------------------
    def predict(self, data, params: dict | None = None):
        if params:
            return self.model.predict(data, params=params)
        return self.model.predict(data)

    def release(self) -> None:
        """Give back the cache lease (the object may be evicted once nobody else holds one). Idempotent."""
        lease, self.lease = self.lease, None
        if lease is not None:
            try:
                lease.release()
            except Exception as e:  # a lease that cannot be released expires with its holder
                logger.warning("releasing the lease on %s failed: %s", self.key, e)

    def info(self) -> dict:
        w = self.warmed
        return {"uri": self.uri, "name": self.name, "version": self.version, "key": self.key,
                "format": self.format, "path": str(self.path), "bytes": w.bytes, "from_cache": w.from_cache,
                "warm_seconds": round(w.seconds, 4), "load_seconds": round(self.load_seconds, 4),
                "origin_bytes": w.origin_bytes, "loaded_at": self.loaded_at, "leased": self.lease is not None,
                "offline": w.resolved.offline, "note": w.resolved.note,
                **(self.sharing.to_dict() if self.sharing is not None else {}),
                "memory": _memory_summary(self.memory)}


def load_model(uri: str, format: str = "native", *, session_options: dict | None = None,
               convert_options: dict | None = None, settings=None, lease: bool = True,
               holder: str | None = None, share_weights: bool = True) -> LoadedModel:
    """Warm `uri` into this node's cache (once per node) and load it from the local path.

    format: native (MLflow pyfunc) | onnx | torchscript (converted once per node, then loaded with
    onnxruntime / torch). session_options: runtime options of a derived model (e.g. intra_op_num_threads).
    lease: hold a cache lease while the model is loaded (released by LoadedModel.release()); holder names
    who holds it in `prefetch ls` (default: this process).
    share_weights: map the cached weights read-only where the format allows (ONNX external data, PyTorch
    archives), so replicas on a node share one copy (serving.mapping); False copies them into this process.
    What the load cost (private vs shared bytes) is measured and recorded for memory planning (serving.memory).
    """
    if format not in FORMATS:
        from prefetch.errors import UnsupportedFormat

        raise UnsupportedFormat(f"unknown format '{format}' ({', '.join(FORMATS)})", uri)
    warmed = warm_local(uri, format, convert_options, settings)
    held = _acquire_lease(warmed, settings, holder) if lease else None
    try:
        if not Path(warmed.path).is_dir():
            # Evicted between the warm and the lease: warm again, now that the lease protects it.
            warmed = warm_local(uri, format, convert_options, settings)
        # One-time costs of the process (imports), not of this model: kept out of load_seconds.
        prepare_runtime(format, Path(warmed.path))
        before = _snapshot() if share_weights else None
        started = time.monotonic()
        model, schema, sharing = _load(warmed, format, session_options or {}, share_weights)
        seconds = time.monotonic() - started
        profile = _measure(warmed, format, sharing, before, settings) if before is not None else None
        return LoadedModel(model, warmed, seconds, held, schema, sharing=sharing, memory=profile)
    except BaseException:
        if held is not None:
            held.release()
        raise


def warm_local(uri: str, format: str = "native", convert_options: dict | None = None, settings=None):
    """The node-local copy of uri: via this node's agent inside a Ray cluster, else in this process."""
    import prefetch

    if settings is None:
        via_agent = _warm_via_agent(uri, format, convert_options)
        if via_agent is not None:
            return via_agent
    return prefetch.warm(uri, format=format, settings=settings, convert_options=convert_options)


def _warm_via_agent(uri: str, format: str, convert_options: dict | None):
    ray = sys.modules.get("ray")   # a process that never imported ray is not in a Ray cluster: don't import it
    if ray is None or not ray.is_initialized():
        return None
    from prefetch.cluster.agent import warm_via_local_agent

    return warm_via_local_agent(uri, format, convert_options)


def _acquire_lease(warmed, settings, holder: str | None):
    from prefetch.config import Settings
    from prefetch.store.lifecycle import Lease

    root = (settings or Settings.load()).cache_dir
    return Lease.acquire(root, warmed.key, holder=holder)


# -- loading from the local path ------------------------------------------------------------------------------
def prepare_runtime(format: str = "native", model_dir: Path | None = None) -> None:
    """Pay the once-per-process costs of loading a model in `format` now, so that a load time is the model's
    own: imports (with model_dir, also the MLflow flavor module its MLmodel names, e.g. mlflow.sklearn and
    scikit-learn). MLflow's requirement check, whose package map cost ~1 s on the first load, is not run at all:
    _load_pyfunc asks for suppress_warnings=True."""
    if format != "native":
        import prefetch.convert.runtime  # noqa: F401

        # The runtime itself: importing onnxruntime costs ~100 MiB of private memory (its kernel and schema
        # registries), once per process; paid here so that a load's measured cost is the model's own.
        import importlib

        importlib.import_module("onnxruntime" if format == "onnx" else "torch")
        import mlflow.models  # noqa: F401  (the input schema is read from the native MLmodel: ~85 MiB once)
        return
    import mlflow.pyfunc  # noqa: F401

    if model_dir is not None:
        _import_flavor(model_dir)
        from .mapping import prepare_torch_loader

        prepare_torch_loader(model_dir)


def _import_flavor(model_dir: Path) -> None:
    import importlib

    import yaml

    try:
        flavors = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]
        importlib.import_module(flavors["python_function"]["loader_module"])
        if (flavors.get("sklearn") or {}).get("serialization_format") == "skops":
            import skops.io  # noqa: F401  (imported lazily by MLflow at load time; ~10 s here, once per process)
    except Exception:   # no MLmodel, no pyfunc flavor, a module that fails: the load itself will say why
        pass


def _load(warmed, format: str, session_options: dict, share_weights: bool = True):
    from . import mapping

    path = Path(warmed.path)
    uri = warmed.resolved.uri
    if format == "native":
        model = _load_pyfunc(path, uri)
        sharing = mapping.share_native(model, path) if share_weights else mapping.OPTED_OUT
        return model, _safe(lambda: model.metadata.get_input_schema()), sharing
    from prefetch.convert import flavor_of
    from prefetch.convert.runtime import load_derived

    if not share_weights:
        sharing = mapping.OPTED_OUT
    elif format == "onnx":
        source = Path(warmed.source_path) if getattr(warmed, "source_path", None) else None
        sharing = mapping.onnx_sharing(path, flavor_of(source) if source else None)
        if sharing.shared:
            session_options = mapping.onnx_session_options(session_options)
    else:
        sharing = mapping.format_sharing_unsupported(format)

    try:
        model = load_derived(path, format, session_options)
    except PrefetchError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot open the {format} model at {path}: {_one_line(e)}", uri) from e
    if sharing.shared and format == "onnx":
        mapping.warm_up_onnx(model)
    native = Path(warmed.source_path) if getattr(warmed, "source_path", None) else None
    return model, _schema(native) if native else None, sharing


def _snapshot():
    from . import memory_profile

    try:
        return memory_profile.snapshot()
    except OSError:          # no /proc/self/smaps_rollup (not Linux, or an old kernel): nothing measured
        return None


def _measure(warmed, format: str, sharing, before, settings) -> dict | None:
    """Measure what the load cost (private vs shared) and record it beside the object, for memory planning.
    A profile that cannot be written costs the load nothing: planning then falls back to the rule of thumb."""
    from prefetch.config import Settings

    from . import memory_profile

    dirs = [Path(warmed.path)] + ([Path(warmed.source_path)] if getattr(warmed, "source_path", None) else [])
    try:
        profile = memory_profile.measure_load(before, dirs, key=warmed.key, format=format,
                                              shared_weights=bool(sharing and sharing.shared),
                                              model_bytes=int(warmed.bytes or 0))
        memory_profile.record((settings or Settings.load()).cache_dir, warmed.key, format, profile)
        return profile
    except (OSError, ValueError) as e:     # no /proc (not Linux), a read-only cache dir
        logger.warning("memory profile of %s (%s) not recorded: %s", warmed.key, format, e)
        return None


def _memory_summary(profile: dict | None) -> dict | None:
    if not profile:
        return None
    return {k: profile[k] for k in ("private_bytes", "shared_bytes", "shared_resident_bytes")}


def _load_pyfunc(path: Path, uri: str):
    if not (path / "MLmodel").is_file():
        raise ModelLoadError(f"{path} has no MLmodel file: not an MLflow model (was a run's artifact root "
                             "given instead of the model's directory?)", uri)
    import mlflow.pyfunc

    try:
        # suppress_warnings: skip the requirement and Python-version checks (a pip-requirements comparison
        # that only warns, and whose package map costs ~1 s on a process's first load).
        return mlflow.pyfunc.load_model(str(path), suppress_warnings=True)
    except Exception as e:
        untrusted = _untrusted_types(e, path)
        if untrusted is not None:
            raise ModelLoadError(
                f"skops refuses to load this scikit-learn model: untrusted types {untrusted}. "
                f"Log it with mlflow.sklearn.log_model(..., skops_trusted_types={untrusted}) "
                "after reviewing them", uri) from e
        raise ModelLoadError(f"cannot load the MLflow model at {path}: {_one_line(e)}", uri) from e


def _untrusted_types(error: BaseException, path: Path) -> list[str] | None:
    """The types skops refused, if that is what went wrong (MLflow raises skops' error unwrapped)."""
    chain, e = [], error
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if type(e).__name__ == "UntrustedTypesFoundException":
            found = re.search(r"Untrusted types found in the file: (\[[^\]]*\])", str(e))
            if found:
                import ast

                try:
                    return list(ast.literal_eval(found.group(1)))
                except (ValueError, SyntaxError):
                    pass
            try:
                import skops.io

                return sorted({t for f in path.rglob("*.skops") for t in skops.io.get_untrusted_types(file=f)})
            except Exception:
                return []
    return None


def _schema(path: Path | None):
    """The model's input schema (for parsing MLflow scoring JSON), or None."""
    if path is None or not (path / "MLmodel").is_file():
        return None
    from mlflow.models import Model

    return _safe(lambda: Model.load(str(path / "MLmodel")).get_input_schema())


def _safe(read):
    try:
        return read()
    except Exception:
        return None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]
