"""The forms a cached model can be served in: the artifact as logged, or a derived conversion."""
from __future__ import annotations

NATIVE = "native"
FORMATS: tuple[str, ...] = (NATIVE, "onnx", "torchscript")
