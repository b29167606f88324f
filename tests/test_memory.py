"""Issue B (no Serve needed): serving.load_model from the node-local cache, and memory planning
(serving.memory_for / actor_options / `prefetch plan`)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import prefetch
import serving
from tests import harness
from tests.helpers import assert_clean_error, cli_json, objects_in, run_cli

NAME = harness.SEED_MODEL_NAME


def _declared(path: Path) -> int:
    return int(yaml.safe_load((path / "MLmodel").read_text())["model_size_bytes"])


# --- load_model ------------------------------------------------------------------------------------------
def test_load_model_warms_once_then_loads_from_disk_with_no_network(seed_direct, s3, use_env, cache_dir):
    import mlflow.pyfunc

    use_env(seed_direct["env"])
    X = seed_direct["X_test"]
    s3.reset_stats()
    first = serving.load_model(f"models:/{NAME}/1")
    assert (first.name, first.version) == (NAME, "1") and first.format == "native"
    assert first.path.parent == cache_dir / "objects" and first.key == first.path.name
    assert not first.warmed.from_cache and first.warmed.origin_bytes > 0
    assert s3.stats()["get_requests"] > 0
    np.testing.assert_allclose(first.predict(X), mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(X))
    assert first.lease is not None
    first.release()
    first.release()   # idempotent
    assert first.lease is None

    # Cached pinned version: no request reaches the artifact store, and the same object is loaded.
    s3.reset_stats()
    again = serving.load_model(f"models:/{NAME}/1", lease=False)
    assert s3.stats()["requests"] == 0, s3.stats()
    assert again.warmed.from_cache and again.key == first.key and again.lease is None
    np.testing.assert_allclose(again.predict(X), seed_direct["expected"][1])
    assert again.info()["from_cache"] is True and again.info()["version"] == "1"


def test_load_model_onnx_predicts_like_the_native_model(seed_embedded, use_env, cache_dir):
    use_env(seed_embedded["env"])
    X = seed_embedded["X_test"]
    m = serving.load_model(f"models:/{NAME}/2", format="onnx", session_options={"intra_op_num_threads": 1})
    assert m.format == "onnx" and m.version == "2" and "derived" in m.path.parts
    np.testing.assert_allclose(m.predict(X), seed_embedded["expected"][2], rtol=1e-4, atol=1e-3)
    m.release()


def test_load_model_errors_are_one_clear_line(seed_embedded, use_env, cache_dir, tmp_path):
    use_env(seed_embedded["env"])
    with pytest.raises(prefetch.NotFound, match="99"):
        serving.load_model(f"models:/{NAME}/99")
    with pytest.raises(prefetch.BadURI, match="format"):
        serving.load_model(f"models:/{NAME}/1", format="tensorflow")
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "weights.bin").write_bytes(b"\0" * 64)
    with pytest.raises(serving.ModelLoadError, match="no MLmodel"):
        serving.load_model(str(not_a_model))


def test_untrusted_skops_types_say_how_to_log_the_model(seed_embedded, use_env, cache_dir, tmp_path):
    """A scikit-learn model whose MLmodel does not trust the types its skops file holds (the Ray guide's
    log_model call, on MLflow 3.17): the error names the types and `skops_trusted_types`."""
    use_env(seed_embedded["env"])
    good = prefetch.warm(f"models:/{NAME}/1").path
    model_dir = tmp_path / "untrusted-model"
    shutil.copytree(good, model_dir, ignore=shutil.ignore_patterns(".prefetch.json"))
    for f in model_dir.rglob("*"):
        f.chmod(0o644 if f.is_file() else 0o755)
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert mlmodel["flavors"]["sklearn"].pop("skops_trusted_types")
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(serving.ModelLoadError) as info:
        serving.load_model(str(model_dir))
    message = str(info.value)
    assert "skops_trusted_types=['sklearn.tree._tree.Tree']" in message and "\n" not in message, message


# --- memory planning ---------------------------------------------------------------------------------------
def test_memory_for_reads_model_size_bytes_without_downloading(seed_direct, s3, use_env, cache_dir):
    use_env(seed_direct["env"])
    uri = f"models:/{NAME}/1"
    s3.reset_stats()
    size = serving.model_size(uri)
    assert size.source == "MLmodel model_size_bytes" and size.version == "1"
    assert objects_in(cache_dir) == []                       # planning downloads nothing...
    assert s3.stats()["get_requests"] <= 2                   # ...but the MLmodel file (and a listing)
    assert serving.memory_for(uri) == math.ceil(2.0 * size.bytes)
    assert serving.memory_for(uri, 1.5, overhead_bytes=1000) == math.ceil(1.5 * size.bytes) + 1000
    assert serving.actor_options(uri, num_cpus=2) == {"num_cpus": 2, "memory": math.ceil(2.0 * size.bytes)}
    # Once cached, the size comes from the cached MLmodel (the same number) with no request at all.
    path = prefetch.warm(uri).path
    s3.reset_stats()
    assert serving.model_size(uri).bytes == _declared(path) == size.bytes
    assert s3.stats()["requests"] == 0
    with pytest.raises(prefetch.BadURI, match="factor"):
        serving.memory_for(uri, 0)


def test_plan_cli_prints_per_replica_and_total(seed_embedded, use_env, cache_dir):
    use_env(seed_embedded["env"])
    path = prefetch.warm(f"models:/{NAME}/2").path
    declared = _declared(path)
    doc = cli_json("plan", f"models:/{NAME}@champion", "--replicas", "3", "--factor", "1.5", "--overhead", "1KiB")
    each = math.ceil(1.5 * declared) + 1024
    assert (doc["version"], doc["model_bytes"], doc["size_source"]) == ("2", declared, "MLmodel model_size_bytes")
    assert doc["per_replica_bytes"] == each and doc["total_bytes"] == 3 * each
    assert doc["ray_actor_options"] == {"memory": each} and doc["cluster"] is None
    human = run_cli("plan", f"models:/{NAME}/2", "-n", "2")
    assert human.returncode == 0 and human.stdout == ""
    assert f'"memory": {math.ceil(2 * declared)}' in human.stderr and "2 replicas" in human.stderr
    assert_clean_error(run_cli("plan", f"models:/{NAME}/99", "-n", "2"), 3, "99")
    assert_clean_error(run_cli("plan", f"models:/{NAME}/1", "-n", "0"), 2, "--replicas")
    assert_clean_error(run_cli("plan", f"models:/{NAME}/1", "-n", "1", "--overhead", "lots"), 2, "--overhead")
    assert_clean_error(run_cli("plan", "models:/", "-n", "1"), 2)
