"""Load a derived (converted) model from its local directory, with the `.predict` of an MLflow pyfunc model.

`load_derived(path, format, options)` is what serving.load_model calls for format="onnx"|"torchscript".
The derived manifest (.prefetch.json, written by prefetch.convert) says how inputs are fed: the input's
name, dtype and per-row shape, the column order of a DataFrame signature, and whether the output is squeezed
so that it has the shape the original model answers with.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..errors import ConversionError, UnsupportedFormat
from ..store.paths import MANIFEST, manifest_in


def read_manifest(path: Path) -> dict:
    """The derived manifest of a committed (or staged) conversion."""
    try:
        return json.loads(manifest_in(Path(path)).read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} is not a converted model directory (no {MANIFEST})") from None


def load_derived(path: Path, format: str, options: dict | None = None) -> "DerivedModel":
    """A loaded derived model. options: intra_op_num_threads, inter_op_num_threads, config_entries (onnxruntime
    session options and session config keys; for TorchScript, intra_op_num_threads sets torch's process-wide
    thread count)."""
    path = Path(path)
    io = read_manifest(path)["io"]
    return open_model(path, format, io, options or {})


def open_model(path: Path, format: str, io: dict, options: dict) -> "DerivedModel":
    if format == "onnx":
        return OnnxModel(path, io, options)
    if format == "torchscript":
        return TorchScriptModel(path, io, options)
    from ..formats import NATIVE, FORMATS

    derived = [f for f in FORMATS if f != NATIVE]
    raise UnsupportedFormat(f"unknown derived format '{format}' ({' or '.join(derived)})")


class DerivedModel(ABC):
    """Common input handling: DataFrame / ndarray / list of lists -> one tensor in the recorded dtype."""

    format = ""

    def __init__(self, path: Path, io: dict):
        self.path = Path(path)
        self.io = io
        self.dtype = np.dtype(io["input_dtype"])
        self.row_shape = tuple(io.get("row_shape") or ())
        self.columns = io.get("columns")

    def _inputs(self, data) -> np.ndarray:
        if hasattr(data, "to_numpy"):             # pandas DataFrame (or Series)
            if self.columns and hasattr(data, "columns") and set(self.columns) <= set(map(str, data.columns)):
                data = data[self.columns]
            data = data.to_numpy()
        array = np.asarray(data, dtype=self.dtype)
        if self.row_shape and array.ndim == len(self.row_shape):   # a single row without its batch axis
            array = array[np.newaxis]
        if self.row_shape and tuple(array.shape[1:]) != self.row_shape:
            raise ValueError(f"expected rows of shape {self.row_shape}, got input of shape {array.shape}")
        return np.ascontiguousarray(array)

    def _output(self, out) -> np.ndarray:
        out = np.asarray(out)
        return out[..., 0] if self.io.get("squeeze_output") and out.ndim >= 1 and out.shape[-1] == 1 else out

    @abstractmethod
    def predict(self, data, params: dict | None = None) -> np.ndarray:
        """Outputs for a DataFrame, an ndarray, a list of rows or a single row (each runtime's own call)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path})"


class OnnxModel(DerivedModel):
    format = "onnx"

    def __init__(self, path: Path, io: dict, options: dict):
        super().__init__(path, io)
        import onnxruntime as ort

        so = ort.SessionOptions()
        if options.get("intra_op_num_threads"):
            so.intra_op_num_threads = int(options["intra_op_num_threads"])
        if options.get("inter_op_num_threads"):
            so.inter_op_num_threads = int(options["inter_op_num_threads"])
        for key, value in (options.get("config_entries") or {}).items():   # e.g. session.disable_prepacking
            so.add_session_config_entry(str(key), str(value))
        self.session = ort.InferenceSession(str(self.path / io["file"]), sess_options=so,
                                            providers=options.get("providers") or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[int(io.get("output_index", 0))].name

    def predict(self, data, params: dict | None = None) -> np.ndarray:
        return self._output(self.session.run([self.output_name], {self.input_name: self._inputs(data)})[0])


class TorchScriptModel(DerivedModel):
    format = "torchscript"

    def __init__(self, path: Path, io: dict, options: dict):
        super().__init__(path, io)
        import torch

        if options.get("intra_op_num_threads"):
            torch.set_num_threads(int(options["intra_op_num_threads"]))
        from .torchscript import quiet_jit

        self.torch = torch
        with quiet_jit():
            self.module = torch.jit.load(str(self.path / io["file"]), map_location="cpu").eval()

    def predict(self, data, params: dict | None = None) -> np.ndarray:
        x = self.torch.from_numpy(self._inputs(data))
        with self.torch.no_grad():
            out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return self._output(out.numpy())
