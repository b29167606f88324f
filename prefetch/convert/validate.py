"""Inputs to convert and validate with, and the native-vs-converted comparison.

The rows come from the model itself: its logged input example (input_example.json) plus a batch synthesized
from its signature (or, without one, from the example's shape and spread). Export needs a sample to trace;
validation needs more rows than the usual 5-row example so that a conversion that only works at one batch
size, or that flips a tree split now and then, shows up before anything is committed.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from ..errors import ConversionError

DEFAULT_ROWS = 64            # synthesized rows added to the example's
DEFAULT_RELATIVE = 1e-4      # default tolerance = 1e-4 x max(1, max |native output|)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One numeric input tensor (rows first), and how the native pyfunc model wants it."""

    array: np.ndarray               # (rows, ...) in the signature's dtype
    columns: list[str] | None       # column names when the signature is column-based (a DataFrame input)
    example_rows: int               # how many leading rows came from the logged example
    synthesized_rows: int
    column_types: list[str] | None = None   # each column's numpy dtype, for the native DataFrame

    @property
    def rows(self) -> int:
        return int(self.array.shape[0])

    def native_input(self):
        """What the original pyfunc model is fed: a DataFrame for column signatures, else the array."""
        if self.columns is None:
            return self.array
        import pandas as pd

        frame = pd.DataFrame(self.array, columns=self.columns)
        # The pyfunc enforces its schema per column: a long column must not arrive as float64.
        return frame.astype(dict(zip(self.columns, self.column_types))) if self.column_types else frame

    def sample(self, n: int = 5) -> np.ndarray:
        """A few rows to trace/export with (the example's when there is one)."""
        return self.array[: max(1, min(n, self.example_rows or n))]


def load_mlmodel(model_dir: Path):
    """The cached MLmodel, or None when the directory is not an MLflow model."""
    if not (model_dir / "MLmodel").is_file():
        return None
    from mlflow.models import Model

    return Model.load(str(model_dir / "MLmodel"))


def validation_batch(model_dir: Path, uri: str | None = None, rows: int = DEFAULT_ROWS, seed: int = 0) -> Batch:
    """The example rows followed by `rows` synthesized ones. Raises ConversionError when the model logged
    neither an input example nor a signature (there is nothing to trace or validate with)."""
    mlmodel = load_mlmodel(model_dir)
    schema = mlmodel.get_input_schema() if mlmodel is not None else None
    example = _example(mlmodel, model_dir, uri)
    columns, dtype, shape, column_types = _spec(schema, example, uri)
    if example is None and shape is None:
        raise ConversionError("the model has neither an input example nor a signature to convert and validate "
                              "with; log it with input_example=...", uri)
    if example is not None:
        example = example.astype(dtype, copy=False)
        shape = shape or tuple(example.shape[1:])
        if tuple(example.shape[1:]) != tuple(shape):
            raise ConversionError(f"the input example's shape {example.shape[1:]} differs from the signature's "
                                  f"{tuple(shape)}", uri)
    synth = _synthesize(example, dtype, shape, rows, seed, column_types)
    array = synth if example is None else np.concatenate([example, synth])
    return Batch(array, columns, 0 if example is None else len(example), len(synth), column_types)


def _example(mlmodel, model_dir: Path, uri: str | None) -> np.ndarray | None:
    if mlmodel is None or not getattr(mlmodel, "saved_input_example_info", None):
        return None
    try:
        ex = mlmodel.load_input_example(str(model_dir))
    except FileNotFoundError:
        return None
    if ex is None:
        return None
    import pandas as pd

    if isinstance(ex, dict):
        raise ConversionError("models with several named inputs cannot be converted (one numeric tensor only)", uri)
    if isinstance(ex, pd.DataFrame):
        ex = ex.to_numpy()
    ex = np.asarray(ex)
    if ex.dtype.kind not in "biuf":
        raise ConversionError(f"the input example is not numeric (dtype {ex.dtype}); only numeric inputs convert",
                              uri)
    return ex.reshape(1, -1) if ex.ndim == 1 else ex


def _spec(schema, example: np.ndarray | None, uri: str | None):
    """(column names or None, dtype, per-row shape or None, column dtypes or None) from the signature, else
    from the example."""
    if schema is None:
        return None, (example.dtype if example is not None else np.dtype("float32")), None, None
    if schema.is_tensor_spec():
        if len(schema.inputs) != 1:
            raise ConversionError("models with several input tensors cannot be converted (one tensor only)", uri)
        spec = schema.inputs[0]
        shape = tuple(spec.shape[1:]) if spec.shape else None
        if shape is not None and any(d is None or d < 0 for d in shape):
            shape = tuple(example.shape[1:]) if example is not None else None
            if shape is None:
                raise ConversionError("the signature has free dimensions past the batch one and there is no "
                                      "input example to fix them", uri)
        return None, np.dtype(spec.type), shape, None
    types = schema.numpy_types()
    if any(np.dtype(t).kind not in "biuf" for t in types):
        raise ConversionError("only all-numeric column signatures can be converted", uri)
    names = schema.input_names()
    # One tensor for all columns: the widest column type (float64 when any column is a double).
    return (list(names), np.result_type(*[np.dtype(t) for t in types]), (len(names),),
            [np.dtype(t).name for t in types])


def _synthesize(example: np.ndarray | None, dtype: np.dtype, shape: tuple, rows: int, seed: int,
                column_types: list[str] | None = None) -> np.ndarray:
    """Rows spread like the example's (per feature mean and std), or standard normal without one. Integer
    features get integer values inside the example's range (a 2.7 in an int column would be truncated by the
    native model's schema enforcement and not by the converted model's float input)."""
    rng = np.random.default_rng(seed)
    if example is not None and len(example):
        flat = example.reshape(len(example), -1).astype(np.float64)
        mean, std = flat.mean(axis=0), flat.std(axis=0)
        std = np.where(std > 0, std, np.maximum(np.abs(mean), 1.0))
        values = rng.normal(mean, std, size=(rows, flat.shape[1])).reshape((rows, *shape))
    else:
        values = rng.normal(size=(rows, *shape))
    integer = [np.dtype(dtype).kind in "biu"] * int(np.prod(shape, dtype=int))
    if column_types:
        integer = [np.dtype(t).kind in "biu" for t in column_types]
    flat = values.reshape(rows, -1)
    for j in np.flatnonzero(integer):
        lo, hi = (example[:, j].min(), example[:, j].max()) if example is not None and len(example) else (0, 9)
        flat[:, j] = np.clip(np.rint(flat[:, j]), lo, hi)
    return flat.reshape(values.shape).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Comparison:
    max_abs_error: float | None     # None for non-numeric outputs (labels compared for equality)
    mismatch_rate: float            # share of output values off by more than the tolerance
    mismatches: int
    values: int
    rows: int
    tolerance: float
    tolerance_rule: str             # "given" or how the default was derived
    max_mismatch_rate: float = 0.0  # share of values allowed over the tolerance (default: none)

    @property
    def passed(self) -> bool:
        return self.mismatch_rate <= self.max_mismatch_rate

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"passed": self.passed}

    def describe(self) -> str:
        err = "labels differ" if self.max_abs_error is None else f"max abs error {self.max_abs_error:.3g}"
        allowed = f", {self.max_mismatch_rate:.1%} allowed" if self.max_mismatch_rate else ""
        return (f"{err} exceeds tolerance {self.tolerance:.3g} on {self.mismatches} of {self.values} output values "
                f"({self.mismatch_rate:.1%}{allowed}) over {self.rows} validation rows")


def as_array(output) -> np.ndarray:
    """A pyfunc output (ndarray, DataFrame, Series, list) as an ndarray."""
    if hasattr(output, "to_numpy"):
        return output.to_numpy()
    if isinstance(output, dict):
        raise ConversionError("models with several named outputs cannot be validated (one output only)")
    return np.asarray(output)


def align(native: np.ndarray, converted: np.ndarray) -> tuple[np.ndarray, bool]:
    """Converted outputs shaped like the native ones: ONNX regressors answer (n, 1) where sklearn answers (n,).
    Returns (aligned, squeezed) so the runtime can squeeze the same way."""
    if converted.shape == native.shape:
        return converted, False
    if converted.ndim == native.ndim + 1 and converted.shape[-1] == 1 and converted.shape[:-1] == native.shape:
        return converted[..., 0], True
    raise ConversionError(f"the converted model answers shape {converted.shape} where the original answers "
                          f"{native.shape}")


def compare(native, converted, rows: int, tolerance: float | None, max_mismatch_rate: float = 0.0) -> Comparison:
    """Element-wise |converted - native| against an absolute tolerance (NaN where the other side is not NaN
    counts as a mismatch). Without a given tolerance: 1e-4 x max(1, max |native|), float32's reach."""
    native, converted = as_array(native), as_array(converted)
    numeric = native.dtype.kind in "biuf" and converted.dtype.kind in "biuf"
    if not numeric:
        bad = native.astype(str) != converted.astype(str)
        n_bad, n = int(bad.sum()), int(bad.size)
        tol = 0.0 if tolerance is None else float(tolerance)
        return Comparison(None, n_bad / n if n else 0.0, n_bad, n, rows, tol, "labels: exact match",
                          max_mismatch_rate)
    a, b = native.astype(np.float64), converted.astype(np.float64)
    if tolerance is None:
        finite = np.abs(a[np.isfinite(a)])
        scale = max(1.0, float(finite.max())) if finite.size else 1.0
        tol, rule = DEFAULT_RELATIVE * scale, f"default: {DEFAULT_RELATIVE:g} x max(1, max |native output|)"
    else:
        tol, rule = float(tolerance), "given"
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a - b))
    bad = ~(diff <= tol)            # NaN differences count as mismatches
    finite_diff = diff[np.isfinite(diff)]
    max_err = float(finite_diff.max()) if finite_diff.size else 0.0
    if np.isnan(diff).any() or np.isinf(diff).any():
        max_err = math.inf
    n_bad, n = int(bad.sum()), int(bad.size)
    return Comparison(max_err, n_bad / n if n else 0.0, n_bad, n, rows, tol, rule, max_mismatch_rate)
