"""Derived artifacts: convert a cached MLflow model to ONNX or TorchScript once per node, validated, atomically.

`prefetch.warm(uri, format=...)` calls `ensure_converted` after the native object is committed. The result
lives in derived/<key>/<format>-<converter id>/ (converter id = tool + version + opset or method), with its own
manifest (.prefetch.json: source key, converter, validation result, files, and the `io` record the runtime
needs). The flow mirrors a download: single flight under a lock, work in staging, validate, fsync, rename.
A conversion that fails validation commits nothing.

Supported: sklearn -> onnx (skl2onnx, float32 inputs); pytorch -> onnx (torch.onnx.export, the torch.export-based
"dynamo" exporter by default, option exporter="legacy" for the TorchScript-based one) and -> torchscript
(torch.jit.trace, option method="script"). Options (convert_options): tolerance (absolute; default
1e-4 x max(1, max |native output|)), max_mismatch_rate (default 0), opset, exporter, method, validation_rows.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from .. import metrics
from ..errors import ConversionError, NoSpace, UnsupportedFormat
from ..store import MANIFEST, Manifest, Store, sha256_file
from ..store.paths import manifest_in
from .runtime import load_derived, read_manifest  # noqa: F401  (re-exported for serving)

__all__ = ["ensure_converted", "load_derived", "read_manifest", "flavor_of", "supported_formats", "SUPPORTED", "derived_id"]


@dataclasses.dataclass(frozen=True)
class Converter:
    flavor: str
    format: str
    converter_id: Callable[[dict], str]        # options -> e.g. "skl2onnx1.20.0-op17"
    convert: Callable[..., dict]               # (raw model, Batch, out_dir, options) -> io record


def _converters() -> dict[tuple[str, str], Converter]:
    from . import onnx, torchscript

    return {
        ("sklearn", "onnx"): Converter("sklearn", "onnx", onnx.sklearn_converter_id, onnx.convert_sklearn),
        ("pytorch", "onnx"): Converter("pytorch", "onnx", onnx.torch_onnx_converter_id, onnx.convert_torch),
        ("pytorch", "torchscript"): Converter("pytorch", "torchscript", torchscript.converter_id,
                                              torchscript.convert),
    }


SUPPORTED: dict[str, tuple[str, ...]] = {"sklearn": ("onnx",), "pytorch": ("onnx", "torchscript")}
_PYFUNC = "python_function"


def supported_formats(flavor: str | None) -> tuple[str, ...]:
    """Formats a flavor can be served in (native always)."""
    from ..formats import NATIVE

    return (NATIVE, *SUPPORTED.get(flavor or "", ()))


def flavor_of(model_dir: Path) -> str | None:
    """The model's flavor from its MLmodel file: the first convertible one, else the first that is not the
    generic python_function, else python_function. None when the directory holds no MLmodel."""
    import yaml

    try:
        doc = yaml.safe_load((Path(model_dir) / "MLmodel").read_text()) or {}
    except FileNotFoundError:
        return None
    flavors = list((doc.get("flavors") or {}).keys())
    for f in flavors:
        if f in SUPPORTED:
            return f
    others = [f for f in flavors if f != _PYFUNC]
    return others[0] if others else (_PYFUNC if flavors else None)


def _converter_for(flavor: str | None, format: str, uri: str) -> Converter:
    if flavor is None:
        raise UnsupportedFormat(f"cannot convert to {format}: not an MLflow model (no MLmodel file); "
                                f"only MLflow sklearn (onnx) and pytorch (onnx, torchscript) models convert", uri)
    conv = _converters().get((flavor, format))
    if conv is None:
        convertible = "; ".join(f"{f}: {', '.join(fs)}" for f, fs in SUPPORTED.items())
        raise UnsupportedFormat(f"a '{flavor}' model cannot be converted to {format} (it supports: "
                                f"{', '.join(supported_formats(flavor))}; convertible flavors: {convertible})", uri)
    from ..extras import require_conversion

    require_conversion(flavor, format, uri)   # a missing extra: one line naming the pip command (exit 2)
    return conv


def derived_id(flavor: str, format: str, options: dict | None = None, uri: str = "") -> str:
    """The derived directory's name, e.g. onnx-skl2onnx1.20.0-op17."""
    return f"{format}-{_converter_for(flavor, format, uri).converter_id(options or {})}"


def ensure_converted(warmed, format: str, store: Store, manifest: Manifest, options: dict):
    """The derived Warmed for `format`: reuse a committed conversion, or convert, validate and commit one
    (single flight across processes: one conversion per key and converter per node)."""
    uri = warmed.resolved.uri
    flavor = flavor_of(warmed.path)
    conv = _converter_for(flavor, format, uri)
    fid = f"{format}-{conv.converter_id(options)}"
    dest = store.paths.derived_dir(warmed.key, fid)
    doc = _committed(dest)
    reused = doc is not None
    if doc is None:
        with store.lock(store.paths.derived_lock_name(warmed.key, fid)):
            doc = _committed(dest)      # another process may have converted while we waited
            reused = doc is not None
            if doc is None:
                started = time.monotonic()
                doc = _convert(warmed, conv, fid, store, manifest, options)
                metrics.observe_conversion(time.monotonic() - started)
    if reused:
        _check_against_request(doc, options, uri)
    return dataclasses.replace(warmed, path=dest, format=format, source_path=warmed.path,
                               bytes=sum(f["size"] for f in doc["files"]),
                               from_cache=bool(warmed.from_cache and reused))


def _committed(dest: Path) -> dict | None:
    try:
        return json.loads(manifest_in(dest).read_text())
    except FileNotFoundError:
        return None


def _check_against_request(doc: dict, options: dict, uri: str) -> None:
    """A caller asking for a stricter tolerance than a committed conversion met gets the same refusal a fresh
    conversion would give (conversion is deterministic: redoing it would not help)."""
    v = doc.get("validation") or {}
    tol = options.get("tolerance")
    err = v.get("max_abs_error")
    if tol is not None and err is not None and err > float(tol):
        raise ConversionError(f"the cached {doc['format']} conversion ({doc['converter_id']}) was validated with "
                              f"max abs error {err:.3g}, over the requested tolerance {float(tol):.3g}", uri)


def _convert(warmed, conv: Converter, fid: str, store: Store, manifest: Manifest, options: dict) -> dict:
    import numpy as np

    from . import runtime
    from .validate import align, as_array, compare, validation_batch

    uri, started = warmed.resolved.uri, time.monotonic()
    free = shutil.disk_usage(store.root).free
    if free < manifest.bytes:     # a converted model is about the size of the original
        raise NoSpace(f"converting needs about {manifest.bytes} bytes, {free} free on {store.root}", uri)
    staging = store.derived_staging_for(warmed.key, fid)   # we hold its lock: leftovers of a killed one go
    try:
        batch = validation_batch(warmed.path, uri, rows=int(options.get("validation_rows") or 64))
        native = _load_native(warmed.path, uri)
        try:
            expected = as_array(native.predict(batch.native_input()))
        except Exception as e:
            raise ConversionError(f"the original model failed on its own input example: {_short(e)}", uri) from e
        io = conv.convert(native.get_raw_model(), batch, staging, options)
        io["columns"] = batch.columns
        converted = runtime.open_model(staging, conv.format, io, {})
        try:
            got = as_array(converted.predict(batch.array))
            # One row alone too: a trace or export that froze the batch size fails here, not in serving.
            got_one = as_array(converted.predict(batch.array[:1]))
        except Exception as e:
            raise ConversionError(f"the converted {conv.format} model failed on the validation batch: "
                                  f"{_short(e)}", uri) from e
        got, io["squeeze_output"] = align(expected, got)
        got_one, _ = align(expected[:1], got_one)
        result = compare(np.concatenate([expected, expected[:1]]), np.concatenate([got, got_one]), batch.rows,
                         options.get("tolerance"), float(options.get("max_mismatch_rate") or 0.0))
        if not result.passed:
            raise ConversionError(f"{conv.format} conversion of the {conv.flavor} model refused, nothing "
                                  f"committed: {result.describe()}", uri)
        doc = {
            "version": 1, "source_key": warmed.key, "source_uri": manifest.uri, "format": conv.format,
            "flavor": conv.flavor, "format_id": fid, "converter_id": fid.split("-", 1)[1],
            "validation": result.to_dict() | {"example_rows": batch.example_rows,
                                              "synthesized_rows": batch.synthesized_rows},
            "io": io, "options": {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))},
            "created_at": time.time(), "seconds": round(time.monotonic() - started, 3),
            "files": _file_entries(staging),
        }
        store.commit_derived(staging, warmed.key, fid, doc)
        return doc
    except ConversionError as e:
        if e.uri is None:
            raise ConversionError(e.message, uri) from e
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _load_native(path: Path, uri: str):
    import mlflow.pyfunc

    try:
        return mlflow.pyfunc.load_model(str(path))
    except Exception as e:
        raise ConversionError(f"cannot load the original model to convert it: {_short(e)}", uri) from e


def _file_entries(staging: Path) -> list[dict]:
    entries = []
    for dirpath, _d, files in os.walk(staging):
        for name in sorted(files):
            p = Path(dirpath) / name
            rel = p.relative_to(staging).as_posix()
            if rel != MANIFEST:
                entries.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
    return sorted(entries, key=lambda f: f["path"])


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(e).__name__)
