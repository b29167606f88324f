"""Optional dependencies: a feature whose packages are not installed is one line naming the pip command that
installs them (exit 2), never an ImportError or PackageNotFoundError traceback.

Core (always installed): what loading and serving need, onnxruntime included. Extras:
    convert  onnx, skl2onnx, onnxscript   (converting models to ONNX)
    torch    torch                        (PyTorch models: TorchScript, torch -> ONNX)
"""
from __future__ import annotations

import importlib.util

from .errors import BadURI

DIST = "ray-model-prefetch"
# What each conversion needs, as (module, extra) pairs: the module is what is imported.
NEEDS = {
    ("sklearn", "onnx"): (("onnx", "convert"), ("skl2onnx", "convert")),
    ("pytorch", "onnx"): (("torch", "torch"), ("onnx", "convert"), ("onnxscript", "convert")),
    ("pytorch", "torchscript"): (("torch", "torch"),),
}


class MissingExtra(BadURI):
    """A feature needs packages of an extra that is not installed (exit 2)."""


def install_hint(extras: list[str]) -> str:
    return f"pip install '{DIST}[{','.join(sorted(set(extras)))}]'"


def require(needs: tuple[tuple[str, str], ...], what: str, uri: str | None = None) -> None:
    """Check every module of needs is installed (found, not imported: a cache hit of a converted model must not
    pay for importing the converters); if any is missing, one MissingExtra naming them and the pip command."""
    missing: list[tuple[str, str]] = []
    for module, extra in needs:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append((module, extra))
    if missing:
        names = ", ".join(m for m, _ in missing)
        raise MissingExtra(f"{what} needs {names}, which is not installed: {install_hint([e for _, e in missing])}",
                           uri)


def require_conversion(flavor: str, format: str, uri: str | None = None) -> None:
    needs = NEEDS.get((flavor, format))
    if needs:
        require(needs, f"converting a {flavor} model to {format}", uri)
