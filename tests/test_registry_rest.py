"""Issue I, process start-up: a `models:/` URI on an http(s) tracking server is resolved by MLflow's REST routes
over requests (prefetch/registry_rest.py), without importing mlflow, and gives exactly what the mlflow client gives:
the same version records, download URIs, errors and cache keys (a changed key would fetch every cached model
again). Real `mlflow server` (direct S3 mode) and the embedded sqlite registry of the harness."""
from __future__ import annotations

import subprocess
import sys

import pytest

import prefetch
from prefetch import registry
from prefetch.config import Settings
from prefetch.errors import NotFound
from tests.helpers import REPO


def _forms(name: str) -> list[dict]:
    return [{"version": "1"}, {"version": "2"}, {"alias": "champion"}, {"alias": "stable"},
            {"stage": "Production"}, {}]


def test_rest_answers_are_the_mlflow_clients(seed_direct, mlflow_direct, use_env, tmp_path, monkeypatch):
    use_env(mlflow_direct.env())
    name = seed_direct["name"]
    uri = f"models:/{name}"
    assert registry._rest() is not None           # an http server: the REST path is the one taken
    for form in _forms(name):
        assert registry.model_version(uri, name, **form) == registry.mlflow_model_version(uri, name, **form), form
    for v in ("1", "2"):
        assert registry.version_storage(uri, name, v) == registry.mlflow_version_storage(uri, name, v)
    # Errors: the same kinds (exit codes) either way.
    for form in ({"version": "99"}, {"alias": "no-such-alias"}, {"stage": "Archived"}):
        with pytest.raises(NotFound):
            registry.model_version(uri, name, **form)
        with pytest.raises(NotFound):
            registry.mlflow_model_version(uri, name, **form)
    with pytest.raises(NotFound):
        registry.model_version(uri, f"no-such-model-{name}", version="1")

    # Cache keys (and the identity hashed into them) of every form, through each path into its own cache.
    uris = [f"models:/{name}/1", f"models:/{name}/2", f"models:/{name}@champion", f"models:/{name}/Production",
            f"models:/{name}/latest"]
    rest = {u: prefetch.resolve(u, Settings.load(cache_dir=tmp_path / "rest")) for u in uris}
    monkeypatch.setattr(registry, "_rest", lambda: None)
    client = {u: prefetch.resolve(u, Settings.load(cache_dir=tmp_path / "client")) for u in uris}
    assert {u: (r.key, r.identity, r.storage_uri) for u, r in rest.items()} == \
        {u: (r.key, r.identity, r.storage_uri) for u, r in client.items()}
    assert len({r.key for r in rest.values()}) == 2      # two versions, five names for them


_WARM_AND_SAY = "import sys, prefetch; w = prefetch.warm(sys.argv[1]); print(w.from_cache, 'mlflow' in sys.modules)"


def _warm_in_a_process(uri: str, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", _WARM_AND_SAY, uri], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_a_cold_warm_on_an_http_registry_never_imports_mlflow(seed_direct, seed_embedded, mlflow_direct, embedded,
                                                              cache_dir):
    import os

    base = {k: v for k, v in os.environ.items()}
    http = {**base, **mlflow_direct.env(), "PYTHONPATH": str(REPO)}
    assert _warm_in_a_process(f"models:/{seed_direct['name']}/latest", http) == "False False"
    # The way without: a sqlite registry needs the mlflow client, and it is imported.
    local = {**base, **embedded.env(), "PYTHONPATH": str(REPO)}
    assert _warm_in_a_process(f"models:/{seed_embedded['name']}/latest", local) == "False True"
