"""TorchScript converter: torch.jit.trace (default) or torch.jit.script, saved with torch.jit.save.

TorchScript is deprecated in torch 2.13 and every torch.jit call warns so; Ray Serve's guide still names
it, and it loads without the model's Python class. The deprecation warnings are silenced here, around our own
calls only (`quiet_jit`). Tracer warnings (Python values frozen into the trace) are kept in the manifest's
notes: validation on a batch of another size than the traced one is what catches a bad trace.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

from ..errors import ConversionError, one_line
from .options import choice, tool_version, torch_sample
from .validate import Batch

MODEL_FILE = "model.pt"
METHODS = ("trace", "script")
_JIT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"


def method(options: dict) -> str:
    return choice(options, "method", METHODS, "TorchScript method")


def converter_id(options: dict) -> str:
    return f"torch{tool_version('torch')}-{method(options)}"


@contextlib.contextmanager
def quiet_jit(record: list[str] | None = None):
    """Silence torch.jit's deprecation warnings (ours only: the filter is scoped to this block); collect
    tracer warnings into `record` when given."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=DeprecationWarning)
        yield
    for w in caught:
        if w.category.__name__ == "TracerWarning" and record is not None:
            text = re.sub(r"\s+", " ", str(w.message))[:400]
            if text not in record:
                record.append(text)
        elif w.category.__name__ != "TracerWarning":
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def convert(model, batch: Batch, out_dir: Path, options: dict) -> dict:
    import torch

    how = method(options)
    sample = torch_sample(batch)
    notes: list[str] = []
    try:
        with quiet_jit(notes), torch.no_grad():
            module = torch.jit.script(model) if how == "script" else torch.jit.trace(model, (sample,))
            torch.jit.save(module, str(out_dir / MODEL_FILE))
    except Exception as e:
        hint = " (try method='script')" if how == "trace" else " (try method='trace')"
        raise ConversionError(f"torch.jit.{how} failed: {one_line(e)}{hint}") from e
    return {"file": MODEL_FILE, "input_dtype": str(batch.array.dtype), "row_shape": list(batch.array.shape[1:]),
            "converter": f"torch.jit.{how}", "notes": notes}
