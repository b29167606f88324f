"""Issue L: the drop-in for unchanged MLflow code (serving/intercept.py, PREFETCH_INTERCEPT_MLFLOW=1).

Real MLflow server (artifacts on real S3 behind the counting proxy), real Serve replicas answering HTTP. The
entry point must be visible: installed (`pip install -e .`), or, during development, a dist-info directory
with the entry points on PYTHONPATH (NOTES-l-multi.md). A test that finds MLflow's own repository registered
fails: it would otherwise pass or fail for the wrong reason.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from ray import serve

from tests import harness
from tests.test_serving import delete_app, post, replica_env, run_apps, serve_url, wait_for  # noqa: F401

NAME = harness.SEED_MODEL_NAME
WEIGHTS = "model.skops"
pytestmark = pytest.mark.timeout(900)


# The Ray guide's deployment, character for character (its __init__ is the line the drop-in serves).
@serve.deployment
class MLflowModelDeployment:
    def __init__(self, model_uri: str):
        import mlflow.sklearn

        self.model = mlflow.sklearn.load_model(model_uri)

    async def __call__(self, request):
        data = await request.json()
        features = np.array(data["features"])
        prediction = self.model.predict(features)
        return {"prediction": prediction.tolist()}


@pytest.fixture(autouse=True)
def entry_point_registered():
    from mlflow.store.artifact.artifact_repository_registry import get_registered_artifact_repositories

    from serving import intercept

    repos = get_registered_artifact_repositories()
    assert repos["models"] is intercept.models_repository and repos["runs"] is intercept.runs_repository, (
        "the mlflow.artifact_repository entry points are not installed (see NOTES-l-multi.md)")


def _gets(s3, model_id: str, suffix: str = "") -> int:
    paths = [t.split("?")[0] for method, t, _rng in s3.proxy.request_log() if method == "GET"]
    return sum(1 for p in paths if model_id in p and p.endswith(suffix))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- 1. the guide's deployment, 2 replicas: one download with the variable, two without ---------------------
def test_guide_deployment_downloads_once_per_node_with_the_variable(serve_url, seed_direct, s3, use_env,  # noqa: F811
                                                                     cache_dir):
    use_env(seed_direct["env"])
    env = replica_env(seed_direct["env"], cache_dir)
    cached_env = {"env_vars": {**env["env_vars"], "PREFETCH_INTERCEPT_MLFLOW": "1"}}
    v1, v2 = seed_direct["versions"][0], seed_direct["versions"][1]
    X = seed_direct["X_test"][:5]

    s3.reset_stats()
    # Started together, on different versions so every GET tells which app made it.
    run_apps((MLflowModelDeployment.options(num_replicas=2, ray_actor_options={
                 "num_cpus": 0.1, "runtime_env": cached_env}).bind(f"models:/{NAME}/1"), "guide-cached", "/cached"),
             (MLflowModelDeployment.options(num_replicas=2, ray_actor_options={
                 "num_cpus": 0.1, "runtime_env": env}).bind(f"models:/{NAME}/2"), "guide-plain", "/plain"))
    try:
        answers = {route: post(f"{serve_url}/{route}", {"features": X.tolist()}) for route in ("cached", "plain")}
        log = s3.proxy.request_log()
    finally:
        delete_app("guide-cached")
        delete_app("guide-plain")
    for route, r in answers.items():
        assert r.status_code == 200, (route, r.text)
    np.testing.assert_allclose(answers["cached"].json()["prediction"], seed_direct["expected"][1][:5], rtol=1e-12)
    np.testing.assert_allclose(answers["plain"].json()["prediction"], seed_direct["expected"][2][:5], rtol=1e-12)
    cached, plain = _gets(s3, v1["model_id"], WEIGHTS), _gets(s3, v2["model_id"], WEIGHTS)
    print(f"\nthe guide's deployment, 2 replicas on one node: {WEIGHTS} fetched {cached}x with "
          f"PREFETCH_INTERCEPT_MLFLOW=1, {plain}x without ({len(log)} S3 requests in all)")
    assert cached == 1, log
    assert plain == 2, log
    objects = [p for p in (cache_dir / "objects").iterdir()]
    assert len(objects) == 1 and (objects[0] / "MLmodel").is_file()   # v1 only: the plain app used no cache


# --- 2. in-process: the same files as MLflow's, links into the cache, a fallback that logs once -------------
def test_download_artifacts_gives_mlflows_files_from_the_cache(seed_direct, s3, use_env, cache_dir, tmp_path,
                                                               monkeypatch):
    import mlflow

    use_env(seed_direct["env"])
    uri = f"models:/{NAME}@stable"
    plain_dst, cached_dst, again_dst = (tmp_path / d for d in ("plain", "cached", "again"))
    for d in (plain_dst, cached_dst, again_dst, tmp_path / "one"):
        d.mkdir()

    s3.reset_stats()
    plain = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(plain_dst)))
    plain_bytes = s3.stats()["bytes_out"]
    monkeypatch.setenv("PREFETCH_INTERCEPT_MLFLOW", "1")
    cached = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(cached_dst)))
    s3.reset_stats()
    again = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(again_dst)))
    again_bytes = s3.stats()["bytes_out"]

    assert plain_bytes > 0
    assert _tree(cached) == _tree(plain) == _tree(again)            # MLflow's tree, registered_model_meta too
    assert "registered_model_meta" in _tree(plain)
    assert again_bytes == 0                                        # the second download came from the cache
    [key] = os.listdir(cache_dir / "objects")
    stored = cache_dir / "objects" / key / WEIGHTS
    assert os.path.samefile(again / WEIGHTS, stored)               # a hard link, not a copy
    assert not os.path.exists(again / ".prefetch.json")

    # One file inside the model (what mlflow.models.Model.load asks for): that file, at MLflow's path.
    one = Path(mlflow.artifacts.download_artifacts(f"{uri}/MLmodel", dst_path=str(tmp_path / "one")))
    assert one == tmp_path / "one" / "MLmodel" and one.read_bytes() == (plain / "MLmodel").read_bytes()
    assert s3.stats()["bytes_out"] == 0

    # MLflow's flavor loader on the same URI, unchanged code: the model from the cache, no origin bytes.
    s3.reset_stats()
    model = mlflow.sklearn.load_model(uri)
    np.testing.assert_allclose(model.predict(seed_direct["X_test"][:5]), seed_direct["expected"][1][:5],
                               rtol=1e-12)
    assert s3.stats()["bytes_out"] == 0


def test_a_failing_cache_falls_back_to_mlflow_with_one_log_line(seed_direct, s3, use_env, tmp_path, monkeypatch,
                                                                 caplog):
    import mlflow

    from serving import intercept

    use_env(seed_direct["env"])
    uri = f"models:/{NAME}/2"
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache dir should be")
    monkeypatch.setenv("PREFETCH_CACHE_DIR", str(blocker))
    monkeypatch.setenv("PREFETCH_INTERCEPT_MLFLOW", "1")
    monkeypatch.setattr(intercept, "_logged", set())   # "once per process": start this test's count at zero

    dsts = [tmp_path / "a", tmp_path / "b"]
    s3.reset_stats()
    with caplog.at_level(logging.WARNING, logger=intercept.__name__):
        trees = [_tree(Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(d)))) for d in dsts]
    lines = [r.getMessage() for r in caplog.records if r.name == intercept.__name__]
    assert len(lines) == 1 and uri in lines[0] and "MLflow downloads it itself" in lines[0], lines
    assert trees[0] == trees[1] and WEIGHTS in trees[0]
    assert _gets(s3, seed_direct["versions"][1]["model_id"], WEIGHTS) == 2   # MLflow's own downloads, twice


def test_runs_uri_gives_mlflows_files_from_the_cache(seed_direct, s3, use_env, cache_dir, tmp_path, monkeypatch):
    import mlflow

    use_env(seed_direct["env"])
    v1 = seed_direct["versions"][0]
    uri = f"runs:/{v1['run_id']}/{harness.models.SEED_ARTIFACT_PATH}"
    plain_dst, cached_dst = tmp_path / "plain", tmp_path / "cached"
    plain_dst.mkdir()
    cached_dst.mkdir()
    plain = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(plain_dst)))
    monkeypatch.setenv("PREFETCH_INTERCEPT_MLFLOW", "1")
    cached = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(cached_dst)))
    assert cached.relative_to(cached_dst) == plain.relative_to(plain_dst)
    assert _tree(cached) == _tree(plain) and WEIGHTS in _tree(plain)
    keys = os.listdir(cache_dir / "objects")
    assert len(keys) == 1, [(k, open(cache_dir / "objects" / k / ".prefetch.json").read()[:400]) for k in keys]
    [key] = keys
    assert os.path.samefile(cached / WEIGHTS, cache_dir / "objects" / key / WEIGHTS)
