"""README claims that had no test of their own (issue M): --debug tracebacks, `rm` of derived artifacts, several
URIs in one warm, the TOML config and its precedence under env vars, the byte-size spellings, PREFETCH_REF_TTL,
the default cache dir, and a model made only of empty files.

Origins are local directories and the embedded registry (no servers): every expectation is computed here, from
what the test wrote, never from the code under test."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

import prefetch
from prefetch.config import Settings
from tests import harness
from tests.helpers import assert_clean_error, cli_json, objects_in, run_cli

MiB = 1 << 20
NAME = harness.SEED_MODEL_NAME


def _origin(root: Path, name: str, files: dict[str, bytes]) -> Path:
    d = root / "origin" / name
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return d


# -- --debug ------------------------------------------------------------------------------------------------------
def test_debug_shows_the_traceback_that_the_default_hides(tmp_path):
    missing = str(tmp_path / "no-such-model")
    plain = run_cli("warm", missing)
    assert_clean_error(plain, 3, "no-such-model")
    debug = run_cli("--debug", "warm", missing)
    assert debug.returncode == 3
    assert "Traceback (most recent call last)" in debug.stderr and "no-such-model" in debug.stderr


# -- rm removes derived artifacts too -------------------------------------------------------------------------------
def test_rm_removes_the_object_and_what_was_derived_from_it(tmp_path, cache_dir):
    import mlflow
    import numpy as np
    from sklearn.linear_model import LinearRegression

    X = np.random.default_rng(1).normal(size=(40, 3))
    model_dir = tmp_path / "origin" / "lin"
    model_dir.parent.mkdir(parents=True)
    mlflow.sklearn.save_model(LinearRegression().fit(X, X.sum(axis=1)), str(model_dir), input_example=X[:5])
    onnx = prefetch.warm(str(model_dir), format="onnx")
    key = onnx.source_path.name
    derived = cache_dir / "derived" / key
    assert derived.is_dir() and any(derived.iterdir()) and (cache_dir / "objects" / key).is_dir()
    proc = run_cli("rm", key)
    assert proc.returncode == 0, proc.stderr
    assert not (cache_dir / "objects" / key).exists() and not derived.exists()
    assert objects_in(cache_dir) == []


# -- several URIs in one warm ---------------------------------------------------------------------------------------
def test_one_warm_of_several_uris_caches_each_and_reports_each(tmp_path, cache_dir):
    a = _origin(tmp_path, "a", {"w.bin": os.urandom(MiB)})
    b = _origin(tmp_path, "b", {"w.bin": os.urandom(2 * MiB), "sub/x.txt": b"x"})
    doc = cli_json("warm", str(a), str(b))
    results = doc["results"]
    assert [r["bytes"] for r in results] == [MiB, 2 * MiB + 1]
    assert len({r["key"] for r in results}) == 2 and len(objects_in(cache_dir)) == 2
    for r, origin in zip(results, (a, b)):
        for f in origin.rglob("*"):
            if f.is_file():
                cached = Path(r["path"]) / f.relative_to(origin)
                assert hashlib.sha256(cached.read_bytes()).digest() == hashlib.sha256(f.read_bytes()).digest()
    # One bad URI among good ones: the good ones are cached, the command fails with the bad one's code.
    c = _origin(tmp_path, "c", {"w.bin": b"c" * 1000})
    proc = run_cli("warm", str(c), str(tmp_path / "missing"))
    assert proc.returncode == 3 and "missing" in proc.stderr and "Traceback" not in proc.stderr
    assert len(objects_in(cache_dir)) == 3


# -- configuration --------------------------------------------------------------------------------------------------
def test_toml_config_and_env_precedence(tmp_path, monkeypatch):
    toml = tmp_path / "config.toml"
    toml.write_text(f'cache_dir = "{tmp_path / "from-toml"}"\nmax_bytes = "512MiB"\nref_ttl = 7\nmax_concurrency = 3\n')
    monkeypatch.delenv("PREFETCH_CACHE_DIR", raising=False)
    monkeypatch.setenv("PREFETCH_CONFIG", str(toml))
    s = Settings.load()
    assert s.cache_dir == (tmp_path / "from-toml").resolve() and s.max_bytes == 512 * MiB
    assert s.ref_ttl == 7 and s.max_concurrency == 3
    # Env wins over the file, key by key; keyword overrides win over both.
    monkeypatch.setenv("PREFETCH_MAX_BYTES", "20G")
    monkeypatch.setenv("PREFETCH_CACHE_DIR", str(tmp_path / "from-env"))
    s = Settings.load()
    assert s.max_bytes == 20 * (1 << 30) and s.cache_dir == (tmp_path / "from-env").resolve() and s.ref_ttl == 7
    assert Settings.load(max_concurrency=9).max_concurrency == 9
    # The CLI reads the same file: a warm lands in the env's dir, under the file's other settings.
    origin = _origin(tmp_path, "m", {"w.bin": b"w" * 4096})
    out = cli_json("warm", str(origin), env={"PREFETCH_CONFIG": str(toml), "PREFETCH_CACHE_DIR": str(tmp_path / "from-env")})
    assert Path(out["results"][0]["path"]).parent == (tmp_path / "from-env" / "objects").resolve()


@pytest.mark.parametrize("text,expected", [("512MiB", 512 * MiB), ("512M", 512 * MiB), ("20G", 20 << 30),
                                           ("20GiB", 20 << 30), ("1000", 1000), ("1.5K", 1536)])
def test_byte_size_spellings(text, expected, monkeypatch):
    monkeypatch.setenv("PREFETCH_MAX_BYTES", text)
    assert Settings.load().max_bytes == expected


def test_default_cache_dir_is_under_home(tmp_path, monkeypatch):
    """No PREFETCH_CACHE_DIR, no config: ~/.cache/prefetch of this test's own HOME."""
    home = Path(os.environ["HOME"])          # the test's own HOME (conftest), not the machine's
    assert home.is_relative_to(tmp_path)
    monkeypatch.delenv("PREFETCH_CACHE_DIR", raising=False)
    monkeypatch.delenv("PREFETCH_CONFIG", raising=False)
    origin = _origin(tmp_path, "m", {"w.bin": b"d" * 100})
    env = {k: v for k, v in os.environ.items() if k != "PREFETCH_CACHE_DIR"} | {"HOME": str(home)}
    out = cli_json("warm", str(origin), env=env)
    assert Path(out["results"][0]["path"]).parent == home / ".cache" / "prefetch" / "objects"


def test_ref_ttl_decides_when_a_mutable_uri_is_asked_again(seed_embedded, use_env, monkeypatch):
    """Within PREFETCH_REF_TTL a moved alias is not seen (the last resolution is trusted); after it, it is."""
    from mlflow import MlflowClient

    use_env(seed_embedded["env"])
    monkeypatch.setenv("PREFETCH_REF_TTL", "2")
    alias = f"models:/{NAME}@stable"
    first = prefetch.warm(alias)
    assert first.resolved.version == "1"
    newest = str(seed_embedded["versions"][-1]["version"])
    MlflowClient().set_registered_model_alias(NAME, "stable", newest)
    try:
        assert prefetch.warm(alias).resolved.version == "1"      # inside the TTL: the ref answers
        time.sleep(2.5)
        assert prefetch.warm(alias).resolved.version == newest   # after it: the registry is asked again
    finally:
        MlflowClient().set_registered_model_alias(NAME, "stable", "1")


# -- a model of empty files ------------------------------------------------------------------------------------------
def test_a_model_of_only_empty_files_is_a_miss_then_a_hit(tmp_path, cache_dir):
    origin = _origin(tmp_path, "empty", {"a.txt": b"", "dir/b.txt": b""})
    first = cli_json("warm", str(origin))["results"][0]
    assert first["from_cache"] is False and first["bytes"] == 0
    assert sorted(p.relative_to(Path(first["path"])).as_posix() for p in Path(first["path"]).rglob("*")
                  if p.is_file() and p.name != ".prefetch.json") == ["a.txt", "dir/b.txt"]
    again = cli_json("warm", str(origin))["results"][0]
    assert again["from_cache"] is True and again["path"] == first["path"]


# -- plan against a cluster that cannot hold the replicas -------------------------------------------------------
def test_plan_exits_6_when_the_cluster_cannot_hold_the_replicas(tmp_path, cache_dir):
    """A real one-node Ray cluster with 300 MiB of `memory` resource; replicas of a 4 MiB model with 100 MiB of
    overhead each (about 108 MiB a replica at factor 2): 2 fit, 3 do not. Expected counts from that arithmetic."""
    from ray.cluster_utils import Cluster

    origin = _origin(tmp_path, "m", {"w.bin": os.urandom(4 * MiB)})
    prefetch.warm(str(origin))
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, memory=300 * MiB, object_store_memory=80 * MiB, include_dashboard=False,
        dashboard_agent_listen_port=harness.free_port()))
    try:
        ok = run_cli("plan", str(origin), "--replicas", "2", "--overhead", "100MiB", "--address", cluster.address, "--json")
        assert ok.returncode == 0, ok.stderr
        fit = json.loads(ok.stdout)["cluster"]
        assert fit["reachable"] and fit["fits"] and fit["replicas_fit"] == 2
        over = run_cli("plan", str(origin), "--replicas", "3", "--overhead", "100MiB", "--address", cluster.address, "--json")
        assert over.returncode == 6, over.stderr
        assert json.loads(over.stdout)["cluster"]["fits"] is False
        human = run_cli("plan", str(origin), "--replicas", "3", "--overhead", "100MiB", "--address", cluster.address)
        assert human.returncode == 6 and "Traceback" not in human.stderr
    finally:
        cluster.shutdown()
