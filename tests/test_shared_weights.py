"""Issue K: replicas on a node share one copy of the weights in RAM.

Real parts only: an embedded MLflow registry, a ~50 MiB float32 PyTorch MLP logged with mlflow.pytorch (MLflow 3's
default torch.export archive), 4 real processes loading it through serving.load_model, the kernel's own PSS
accounting (/proc/<pid>/smaps_rollup, read here by the test, not by the code under test), the real CLI.

Each replica process imports everything and pays its runtime costs (serving.prepare_runtime) first; the test then
reads every process's PSS (the runtime baseline), lets them all load at once, and reads their PSS again while all
are alive, so shared pages are split between the same processes both times. The load's cost is the sum of the
increases, read once every replica has answered one row (a forward pass reads every weight, so mapped pages are
resident). Mapped: ~1x the weights (one shared copy) + a little private memory each. Copied (share_weights=False):
one private copy per process, ~4x. The test batch is predicted after that reading: the runtime's GEMM work buffers
for a batch (~4 MiB per process in torch, whatever the weights) are not the model's.
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import prefetch
import serving
from tests import harness
from tests.helpers import REPO, cli_json

MLP_NAME = "shared-weights-mlp"
REPLICAS = 4
WIDTH = 2560          # 2 x 2560 x 2560 float32 hidden layers: ~50 MiB of weights in all

# One replica: prepare, say "ready"; on "load": load, answer one row (every weight is read), say what it loaded;
# on "predict": predict the test batch into out_path, say "done"; then wait for "exit".
REPLICA = r"""
import json, sys
import numpy as np
import serving
uri, fmt, share, model_dir, x_path, out_path = sys.argv[1:7]
serving.prepare_runtime(fmt, __import__("pathlib").Path(model_dir))
X = np.load(x_path)
print("ready", flush=True)
assert sys.stdin.readline().strip() == "load"
m = serving.load_model(uri, format=fmt, share_weights=share == "1")
m.predict(X[:1])
print(json.dumps(m.info(), default=str), flush=True)
assert sys.stdin.readline().strip() == "predict"
np.save(out_path, np.asarray(m.predict(X)))
print("done", flush=True)
sys.stdin.readline()
"""


def _pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no Pss in /proc/{pid}/smaps_rollup")


@pytest.fixture(scope="module")
def big_mlp(embedded, tmp_path_factory):
    import mlflow
    import torch

    net, weight_bytes = harness.models.torch_mlp(WIDTH)
    X = np.random.default_rng(3).normal(size=(64, 32)).astype(np.float32)
    with harness.mlflow_env(embedded.env()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mlflow.start_run(run_name="shared-weights-mlp"):
            info = mlflow.pytorch.log_model(net, name="mlp", input_example=X[:5], registered_model_name=MLP_NAME,
                                            pip_requirements=["torch"])
    with torch.no_grad():
        expected = net(torch.from_numpy(X)).numpy()
    x_path = tmp_path_factory.mktemp("shared-weights") / "X.npy"
    np.save(x_path, X)
    return {"uri": f"models:/{MLP_NAME}/{info.registered_model_version}", "X": X, "x_path": x_path,
            "expected": expected, "weight_bytes": weight_bytes, "env": embedded.env()}


def _replicas(mlp: dict, fmt: str, share: bool, out_dir: Path) -> dict:
    """Start REPLICAS processes, load in all of them at once; the sum of their PSS increases and what they said."""
    model_dir = prefetch.warm(mlp["uri"], format=fmt).path   # downloaded (and converted) once, before
    procs, outs = [], []
    try:
        for i in range(REPLICAS):
            out = out_dir / f"{fmt}-{int(share)}-{i}.npy"
            outs.append(out)
            procs.append(subprocess.Popen(
                [sys.executable, "-c", REPLICA, mlp["uri"], fmt, "1" if share else "0", str(model_dir),
                 str(mlp["x_path"]), str(out)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO))
        for p in procs:
            assert p.stdout.readline().strip() == "ready", f"replica {p.pid} did not start"
        baseline = {p.pid: _pss(p.pid) for p in procs}
        for p in procs:
            p.stdin.write("load\n")
            p.stdin.flush()
        infos = [json.loads(p.stdout.readline()) for p in procs]
        loaded = {p.pid: _pss(p.pid) for p in procs}
        for command in ("predict", "exit"):
            for p in procs:
                p.stdin.write(command + "\n")
                p.stdin.flush()
            if command == "predict":
                assert all(p.stdout.readline().strip() == "done" for p in procs)
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    growth = sum(loaded[pid] - baseline[pid] for pid in baseline)
    print(f"\n{fmt} share={share}: PSS growth per replica (MiB)",
          [round((loaded[pid] - baseline[pid]) / 2**20, 1) for pid in baseline],
          "load profile", [i.get("memory") for i in infos][:1])
    return {"ratio": growth / mlp["weight_bytes"], "growth": growth, "infos": infos,
            "predictions": [np.load(o) for o in outs]}


def _check_predictions(run: dict, expected: np.ndarray, exact: bool) -> None:
    for got in run["predictions"]:
        if exact:   # the same torch kernels on the same bytes
            np.testing.assert_array_equal(got, expected)
        else:       # onnxruntime's kernels sum in another order: float32 rounding only
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_native_torch_replicas_share_one_copy_of_the_weights(big_mlp, use_env, cache_dir, tmp_path):
    use_env(big_mlp["env"])
    shared = _replicas(big_mlp, "native", True, tmp_path)
    copied = _replicas(big_mlp, "native", False, tmp_path)
    print(f"\nnative: shared {shared['ratio']:.2f}x, copied {copied['ratio']:.2f}x the weights "
          f"({big_mlp['weight_bytes'] / 2**20:.1f} MiB) over {REPLICAS} processes")
    assert shared["ratio"] <= 1.6, shared["ratio"]
    assert copied["ratio"] > 3.0, copied["ratio"]
    _check_predictions(shared, big_mlp["expected"], exact=True)
    _check_predictions(copied, big_mlp["expected"], exact=True)
    assert all(i["shared_weights"] is True for i in shared["infos"]), shared["infos"][0]
    assert all(i["shared_weights"] is False and "share_weights=False" in i["why"] for i in copied["infos"])


def test_onnx_replicas_share_one_copy_and_plan_counts_it_once(big_mlp, use_env, cache_dir, tmp_path):
    use_env(big_mlp["env"])
    W = big_mlp["weight_bytes"]
    shared = _replicas(big_mlp, "onnx", True, tmp_path)
    copied = _replicas(big_mlp, "onnx", False, tmp_path)
    print(f"\nonnx: shared {shared['ratio']:.2f}x, copied {copied['ratio']:.2f}x the weights over {REPLICAS}")
    assert shared["ratio"] <= 1.6, shared["ratio"]
    assert copied["ratio"] > 3.0, copied["ratio"]
    _check_predictions(shared, big_mlp["expected"], exact=False)
    _check_predictions(copied, big_mlp["expected"], exact=False)
    assert all(i["shared_weights"] is True for i in shared["infos"]), shared["infos"][0]
    derived = Path(shared["infos"][0]["path"])
    assert (derived / "model.onnx.data").stat().st_size >= W       # every weight lives outside the graph
    assert (derived / "model.onnx").stat().st_size < W / 100

    # The plan for 8 replicas: one shared copy + 8 private parts, not 8 copies. The private part per replica is
    # what the test measured above: (sum of increases - one copy) / replicas.
    private = max(0.0, (shared["growth"] - W) / REPLICAS)
    doc = cli_json("plan", big_mlp["uri"], "--replicas", "8", "--format", "onnx")
    assert doc["basis"] == "measured" and doc["format"] == "onnx" and doc["replicas"] == 8
    total = doc["total_bytes"]
    assert abs(total - (W + 8 * private)) < abs(total - 8 * W), (total, W, private)
    assert total < 3 * W
    assert doc["ray_actor_options"]["memory"] < W / 2          # the private part, not the whole model
    est = serving.memory_for(big_mlp["uri"], replicas=8, format="onnx")
    assert est.total_bytes == total and int(est) == doc["per_replica_bytes"]
    assert serving.actor_options(big_mlp["uri"], format="onnx", num_cpus=1)["memory"] < W / 2


def test_plan_without_a_measurement_says_it_uses_the_rule_of_thumb(big_mlp, use_env, cache_dir):
    use_env(big_mlp["env"])
    prefetch.warm(big_mlp["uri"])            # cached, but no replica loaded it here: nothing measured
    doc = cli_json("plan", big_mlp["uri"], "--replicas", "8", "--format", "onnx", "--factor", "1.5")
    assert doc["basis"] == "rule of thumb" and "rule of thumb" in doc["basis_note"]
    assert doc["shared_bytes"] == 0 and doc["total_bytes"] == 8 * doc["per_replica_bytes"]
    assert doc["per_replica_bytes"] >= 1.5 * big_mlp["weight_bytes"]


def test_a_flavor_that_cannot_share_says_why(seed_embedded, use_env, cache_dir):
    use_env(seed_embedded["env"])
    m = serving.load_model(f"models:/{harness.SEED_MODEL_NAME}/1")
    info = m.info()
    assert info["shared_weights"] is False and "scikit-learn" in info["why"], info
    assert info["memory"]["shared_bytes"] == 0
    np.testing.assert_allclose(m.predict(seed_embedded["X_test"]), seed_embedded["expected"][1])
    m.release()
