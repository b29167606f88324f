"""Issue D: pre-convert cached models to ONNX / TorchScript once per node, validated, and load them.

Real parts only: an embedded MLflow registry (sqlite + local artifacts), the guide's RandomForest, a small torch
MLP logged with mlflow.pytorch, skl2onnx / torch.onnx.export / torch.jit, onnxruntime, the real CLI.
"""
from __future__ import annotations

import json
import os
import subprocess
import warnings

import numpy as np
import pytest

import prefetch
from prefetch.convert import load_derived
from prefetch.errors import ConversionError, UnsupportedFormat
from prefetch.store import MANIFEST, sha256_file
from tests import harness
from tests.helpers import PREFETCH, REPO, assert_clean_error, run_cli

NAME = harness.SEED_MODEL_NAME
MLP_NAME = "convert-mlp"
PYFUNC_NAME = "convert-pyfunc"


# -- models -------------------------------------------------------------------------------------------------------
def _mlp_data():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 8)).astype(np.float32)
    return X[:200], X[200:]           # train (its first rows are the input example), held-out


@pytest.fixture(scope="module")
def torch_mlp(embedded):
    """A small MLP logged with mlflow.pytorch (MLflow 3's default pt2 serialization) and registered."""
    import mlflow
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()
    X_train, X_test = _mlp_data()
    with harness.mlflow_env(embedded.env()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mlflow.start_run(run_name="convert-mlp"):
            info = mlflow.pytorch.log_model(net, name="mlp", input_example=X_train[:5],
                                            registered_model_name=MLP_NAME, pip_requirements=["torch"])
    with torch.no_grad():
        expected = net(torch.from_numpy(X_test)).numpy()
    return {"uri": f"models:/{MLP_NAME}/{info.registered_model_version}", "X_test": X_test, "expected": expected,
            "env": embedded.env()}


@pytest.fixture(scope="module")
def pyfunc_model(embedded):
    """A plain pyfunc PythonModel: no flavor a converter knows."""
    import mlflow
    from mlflow.pyfunc import PythonModel

    class EchoModel(PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    with harness.mlflow_env(embedded.env()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mlflow.start_run(run_name="convert-pyfunc"):
            info = mlflow.pyfunc.log_model(name="echo", python_model=EchoModel(), registered_model_name=PYFUNC_NAME,
                                           pip_requirements=["mlflow"])
    return {"uri": f"models:/{PYFUNC_NAME}/{info.registered_model_version}", "env": embedded.env()}


def _manifest(path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _derived_entries(cache_dir) -> list[str]:
    root = cache_dir / "derived"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _assert_committed(w, cache_dir, fmt: str) -> dict:
    """A derived dir where the contract says, with a manifest that matches its files, read-only files."""
    assert w.format == fmt and w.path.parent == cache_dir / "derived" / w.key
    assert w.source_path == cache_dir / "objects" / w.key
    m = _manifest(w.path)
    assert w.path.name == f"{fmt}-{m['converter_id']}" and m["source_key"] == w.key and m["format"] == fmt
    v = m["validation"]
    assert v["passed"] and v["rows"] >= 5 and v["example_rows"] == 5 and v["max_abs_error"] <= v["tolerance"]
    assert {"max_abs_error", "mismatch_rate", "tolerance"} <= set(v) and m["created_at"] > 0
    on_disk = sorted(p.name for p in w.path.iterdir() if p.name != MANIFEST)
    assert on_disk == sorted(f["path"] for f in m["files"]) and on_disk
    for f in m["files"]:
        p = w.path / f["path"]
        assert p.stat().st_size == f["size"] and sha256_file(p) == f["sha256"]
        assert (p.stat().st_mode & 0o222) == 0           # read-only, like committed objects
    assert w.bytes == sum(p.stat().st_size for p in w.path.iterdir() if p.name != MANIFEST)   # measured on disk
    staging = cache_dir / "staging"
    assert not staging.exists() or not list(staging.iterdir())
    return m


def _default_tolerance(max_abs_output: float) -> float:
    """The documented default (README, Conversion): 1e-4 x max(1, max |output|)."""
    return 1e-4 * max(1.0, float(max_abs_output))


def _assert_second_warm_converts_nothing(uri: str, fmt: str, first, cache_dir, **opts) -> None:
    before = _manifest(first.path)
    stat = (first.path / MANIFEST).stat()
    model_inode = (first.path / before["files"][0]["path"]).stat().st_ino
    again = prefetch.warm(uri, format=fmt, **opts)
    assert again.path == first.path and again.from_cache
    assert _manifest(again.path)["created_at"] == before["created_at"]
    assert (again.path / MANIFEST).stat().st_mtime_ns == stat.st_mtime_ns
    assert (again.path / before["files"][0]["path"]).stat().st_ino == model_inode


# -- sklearn -> ONNX --------------------------------------------------------------------------------------------
def test_seed_random_forest_to_onnx(seed_embedded, use_env, cache_dir):
    use_env(seed_embedded["env"])
    uri = f"models:/{NAME}/1"
    w = prefetch.warm(uri, format="onnx")
    assert not w.from_cache
    m = _assert_committed(w, cache_dir, "onnx")
    assert m["flavor"] == "sklearn" and m["converter_id"].startswith("skl2onnx") and m["converter_id"].endswith("-op17")
    assert m["io"]["input_dtype"] == "float32"

    # Held-out rows (not the example, not the validation batch): within the recorded tolerance of native.
    X_test, expected = seed_embedded["X_test"], seed_embedded["expected"][1]
    model = load_derived(w.path, "onnx", {"intra_op_num_threads": 1, "inter_op_num_threads": 1})
    got = model.predict(X_test)
    assert got.shape == expected.shape
    err = float(np.abs(got - expected).max())
    print(f"\nRF -> ONNX: max abs error {err:.3g} on {len(X_test)} held-out rows "
          f"(validation: {m['validation']['max_abs_error']:.3g}, tolerance {m['validation']['tolerance']:.3g})")
    assert err <= _default_tolerance(np.abs(expected).max())   # the README's formula, from the test's own outputs
    assert 0 < err            # float32 inputs: not bit-identical, which is what the tolerance is for

    # The pyfunc input forms: DataFrame, list of lists, one row.
    import pandas as pd

    np.testing.assert_array_equal(model.predict(pd.DataFrame(X_test)), got)
    np.testing.assert_array_equal(model.predict(X_test[:3].tolist()), got[:3])
    np.testing.assert_array_equal(model.predict(X_test[0]), got[:1])

    _assert_second_warm_converts_nothing(uri, "onnx", w, cache_dir)


# -- PyTorch -> ONNX and TorchScript ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_torch_mlp_to_onnx_and_torchscript(fmt, torch_mlp, use_env, cache_dir):
    use_env(torch_mlp["env"])
    w = prefetch.warm(torch_mlp["uri"], format=fmt)
    m = _assert_committed(w, cache_dir, fmt)
    assert m["flavor"] == "pytorch" and m["converter_id"].startswith("torch")
    model = load_derived(w.path, fmt, {"intra_op_num_threads": 1})
    X_test, expected = torch_mlp["X_test"], torch_mlp["expected"]
    got = model.predict(X_test)
    assert got.shape == expected.shape == (len(X_test), 2)
    err = float(np.abs(got - expected).max())
    print(f"\nMLP -> {fmt} ({m['io']['converter']}): max abs error {err:.3g} on {len(X_test)} held-out rows")
    assert err <= _default_tolerance(np.abs(expected).max())
    assert model.predict(X_test[:1]).shape == (1, 2)      # batch size was not frozen by the export/trace

    # And the native pyfunc of the same cached object agrees on those rows.
    import mlflow

    native = np.asarray(mlflow.pyfunc.load_model(str(w.source_path)).predict(X_test))
    assert float(np.abs(native - got).max()) <= _default_tolerance(np.abs(native).max())

    _assert_second_warm_converts_nothing(torch_mlp["uri"], fmt, w, cache_dir)


# -- validation refuses ---------------------------------------------------------------------------------------------
def test_bad_tolerance_refuses_and_commits_nothing(seed_embedded, use_env, cache_dir):
    use_env(seed_embedded["env"])
    uri = f"models:/{NAME}/2"
    with pytest.raises(ConversionError) as info:
        prefetch.warm(uri, format="onnx", convert_options={"tolerance": 1e-12})
    e = info.value
    assert e.exit_code == 5 and uri in str(e) and "nothing committed" in str(e)
    assert "max abs error" in str(e) and "exceeds tolerance 1e-12" in str(e)
    assert _derived_entries(cache_dir) == []                       # nothing under derived/
    assert not list((cache_dir / "staging").iterdir())             # and no staging left behind
    assert (cache_dir / "objects").is_dir()                        # the native object itself is fine

    # Through the CLI: exit 5, one line saying by how much, no traceback, still nothing committed.
    proc = run_cli("warm", uri, "--format", "onnx", "--tolerance", "0")
    assert_clean_error(proc, 5, uri, "max abs error", "exceeds tolerance 0")
    assert _derived_entries(cache_dir) == []

    # The same conversion with a sane tolerance commits; asking again for the impossible one is refused
    # from the recorded validation, without converting again.
    w = prefetch.warm(uri, format="onnx", convert_options={"tolerance": 1e-3})
    created = _manifest(w.path)["created_at"]
    with pytest.raises(ConversionError, match="over the requested tolerance 1e-12"):
        prefetch.warm(uri, format="onnx", convert_options={"tolerance": 1e-12})
    assert _manifest(w.path)["created_at"] == created


# -- unsupported ----------------------------------------------------------------------------------------------------
def test_unsupported_flavor_and_format(pyfunc_model, seed_embedded, use_env, cache_dir):
    use_env(pyfunc_model["env"])
    with pytest.raises(UnsupportedFormat) as info:
        prefetch.warm(pyfunc_model["uri"], format="onnx")
    msg = str(info.value)
    assert info.value.exit_code == 2
    assert "'python_function'" in msg and "onnx" in msg and "supports: native" in msg
    assert "sklearn: onnx" in msg and "pytorch: onnx, torchscript" in msg
    with pytest.raises(UnsupportedFormat, match=r"'sklearn' model cannot be converted to torchscript "
                                                r"\(it supports: native, onnx"):
        prefetch.warm(f"models:/{NAME}/1", format="torchscript")
    assert _derived_entries(cache_dir) == []

    proc = run_cli("warm", pyfunc_model["uri"], "--format", "onnx")
    assert_clean_error(proc, 2, pyfunc_model["uri"], "python_function", "supports: native")
    proc = run_cli("warm", f"models:/{NAME}/1", "--format", "torchscript")
    assert_clean_error(proc, 2, "sklearn", "torchscript", "onnx")


# -- single flight -------------------------------------------------------------------------------------------------
def test_three_processes_one_conversion(seed_embedded, use_env, cache_dir):
    use_env(seed_embedded["env"])
    uri = f"models:/{NAME}/1"
    prefetch.warm(uri)                     # native first: then only the conversion is contended
    procs = [subprocess.Popen([*PREFETCH, "warm", uri, "--format", "onnx", "--json"], env=dict(os.environ),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    results = [json.loads(o[0])["results"][0] for o in outs]
    assert len({r["path"] for r in results}) == 1
    assert sum(not r["from_cache"] for r in results) == 1          # one converted, two reused
    derived = cache_dir / "derived"
    assert len(list(derived.iterdir())) == 1 and len(list(next(derived.iterdir()).iterdir())) == 1
    assert not list((cache_dir / "staging").iterdir())


# -- serving.load_model in every format ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_serving_load_model_in_a_derived_format_predicts_like_the_trained_net(fmt, torch_mlp, use_env, cache_dir):
    """The README's `serving.load_model(uri, format=...)`: the converted model, loaded through the serving path,
    answers like the torch module the test trained (expectation computed by the test, from the net itself)."""
    import serving

    use_env(torch_mlp["env"])
    model = serving.load_model(torch_mlp["uri"], format=fmt, session_options={"intra_op_num_threads": 1})
    try:
        assert model.format == fmt and model.path.parent.parent == cache_dir / "derived"
        got = np.asarray(model.predict(torch_mlp["X_test"]))
        np.testing.assert_allclose(got, torch_mlp["expected"], atol=_default_tolerance(np.abs(torch_mlp["expected"]).max()))
    finally:
        model.release()
