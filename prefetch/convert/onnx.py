"""ONNX converters: scikit-learn via skl2onnx, PyTorch via torch.onnx.export.

Each converter writes its files into an empty directory and returns the `io` record the runtime needs
(file, input name/dtype/row shape, output index). Converter ids name the tool, its version and the opset, so
a new skl2onnx or torch gets a new derived directory instead of silently reusing an old conversion.

Every initializer is stored as external data in one file beside the graph (`model.onnx.data`): onnxruntime maps
that file instead of copying it, so the replicas of a node share one copy of the weights in RAM (serving.mapping).
The `ext` in a converter id marks that layout, so a conversion made before it is not reused.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

from ..errors import ConversionError, one_line
from .options import choice, tool_version, torch_sample
from .validate import Batch

SKLEARN_OPSET = 17
# torch 2.13's default exporter (dynamo=True: torch.export + onnxscript) implements opset 18 and up; asking it
# for 17 exports at 18 then down-converts, so 18 is its natural default. The legacy TorchScript-based exporter
# (exporter="legacy") is still there, deprecated, and exports 17 directly.
TORCH_OPSET = {"dynamo": 18, "legacy": 17}
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
LAYOUT = "ext"      # weights as external data (see save_with_external_data); part of every converter id


# -- scikit-learn ---------------------------------------------------------------------------------------------
def sklearn_converter_id(options: dict) -> str:
    return f"skl2onnx{tool_version('skl2onnx')}-{LAYOUT}-op{int(options.get('opset') or SKLEARN_OPSET)}"


def convert_sklearn(model, batch: Batch, out_dir: Path, options: dict) -> dict:
    """float32 inputs: onnxruntime has no float64 kernels for the tree-ensemble operators, and sklearn trees
    compare in float32 anyway, so float32 is also what the original computes with."""
    from skl2onnx import convert_sklearn as to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    if batch.array.ndim != 2:
        raise ConversionError(f"scikit-learn models take 2-D inputs; the signature gives rows of shape "
                              f"{batch.array.shape[1:]}")
    final = model
    while hasattr(final, "steps"):              # a Pipeline: the last step decides the outputs
        final = final.steps[-1][1]
    # Without zipmap a classifier answers (label, probabilities as a tensor) instead of a list of dicts.
    conv_options = {id(final): {"zipmap": False}} if is_classifier(final) else None
    opset = int(options.get("opset") or SKLEARN_OPSET)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onx = to_onnx(model, initial_types=[("input", FloatTensorType([None, batch.array.shape[1]]))],
                          target_opset=opset, options=conv_options)
    except Exception as e:   # skl2onnx raises plain RuntimeError/NotImplementedError for unknown estimators
        raise ConversionError(f"skl2onnx cannot convert {type(model).__name__}: {one_line(e)}") from e
    save_with_external_data(onx, out_dir / MODEL_FILE)
    return {"file": MODEL_FILE, "input_dtype": "float32", "row_shape": list(batch.array.shape[1:]),
            "output_index": 0, "converter": "skl2onnx", "opset": opset}


# -- PyTorch --------------------------------------------------------------------------------------------------
def torch_exporter(options: dict) -> str:
    return choice(options, "exporter", tuple(TORCH_OPSET), "ONNX exporter")


def torch_onnx_converter_id(options: dict) -> str:
    exporter = torch_exporter(options)
    opset = int(options.get("opset") or TORCH_OPSET[exporter])
    return f"torch{tool_version('torch')}-{exporter}-{LAYOUT}-op{opset}"


def convert_torch(model, batch: Batch, out_dir: Path, options: dict) -> dict:
    """torch.onnx.export with a dynamic batch axis, so one exported graph answers any number of rows."""
    import torch

    exporter = torch_exporter(options)
    opset = int(options.get("opset") or TORCH_OPSET[exporter])
    sample = torch_sample(batch)
    target = out_dir / MODEL_FILE
    try:
        with _quiet_exporter():
            if exporter == "dynamo":
                program = torch.onnx.export(
                    model, (sample,), dynamo=True, verbose=False, opset_version=opset,
                    input_names=["input"], output_names=["output"],
                    dynamic_shapes=({0: torch.export.Dim("batch")},))
                program.save(str(target))
            else:
                torch.onnx.export(
                    model, (sample,), str(target), dynamo=False, opset_version=opset,
                    input_names=["input"], output_names=["output"],
                    dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        save_with_external_data(_onnx().load(str(target)), target)
    except ConversionError:
        raise
    except Exception as e:
        hint = " (try the legacy exporter: convert option exporter='legacy')" if exporter == "dynamo" else ""
        raise ConversionError(f"torch.onnx.export ({exporter}) failed: {one_line(e)}{hint}") from e
    return {"file": MODEL_FILE, "input_dtype": str(batch.array.dtype), "row_shape": list(batch.array.shape[1:]),
            "output_index": 0, "converter": f"torch.onnx.export({exporter})", "opset": opset}


def save_with_external_data(model, target: Path) -> None:
    """Write the graph to target and every tensor (no size threshold) to DATA_FILE beside it."""
    onnx = _onnx()
    (target.parent / DATA_FILE).unlink(missing_ok=True)   # onnx appends to an existing data file
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=0)


def _onnx():
    import onnx

    return onnx


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs progress and notes (torchvision missing, opset up-conversion) at WARNING, and
    warns about its own deprecations: none of it is the user's business, and it would fill the CLI's stderr."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
