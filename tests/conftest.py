"""Shared fixtures: real S3 (SeaweedFS), real MLflow servers, an embedded registry, seed models.

Servers start lazily, on the first test that asks for them, and live for the session.
- s3:               SeaweedS3 behind a counting proxy (s3.stats(), s3.reset_stats()).
- servers:          both MLflow servers, started concurrently; mlflow_direct / mlflow_proxied.
- embedded:         EmbeddedRegistry (sqlite + local artifact dir, no server).
- seed_direct / seed_proxied / seed_embedded: register_seed_versions() results per set-up.
- isolated_env (autouse): fresh PREFETCH_CACHE_DIR, no MLFLOW_*/AWS_*/PREFETCH_* leftovers.
- use_env (alias apply_env): use_env(server.env()) switches os.environ + mlflow to a set-up
  until the end of the test.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# No phone-home from anything the tests start (inherited by every subprocess too).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray's sessions, sockets and logs in a directory of this run's own, not the machine's /tmp/ray (short: Ray's unix
# socket paths must stay under 108 bytes). Every cluster the tests start, and their workers, inherit it.
_RAY_TMP = tempfile.mkdtemp(prefix="pf-ray-", dir="/tmp")
os.environ["RAY_TMPDIR"] = _RAY_TMP

from tests import harness  # noqa: E402

_ISOLATED_PREFIXES = ("MLFLOW_", "AWS_", "PREFETCH_")


def pytest_unconfigure(config):
    shutil.rmtree(_RAY_TMP, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (large models, benchmarks); deselect with -m 'not slow'")


# --- servers (session) -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    server = harness.SeaweedS3(workdir=tmp_path_factory.mktemp("seaweed"), counting_proxy=True)
    server.start()
    print(f"\n[harness] seaweed S3 ready in {server.startup_seconds:.1f}s at {server.endpoint} (proxy) -> {server.direct_endpoint}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def servers(s3, tmp_path_factory):
    """Both MLflow servers, launched together so their 10-45 s start-ups overlap."""
    direct = harness.MlflowServer(tmp_path_factory.mktemp("mlflow-direct"), s3, mode="direct", start_timeout=240)
    proxied = harness.MlflowServer(tmp_path_factory.mktemp("mlflow-proxied"), s3, mode="proxied", start_timeout=240)
    harness.start_all([direct, proxied])
    print(f"\n[harness] mlflow servers healthy: direct {direct.startup_seconds:.1f}s, proxied {proxied.startup_seconds:.1f}s (started together)")
    yield {"direct": direct, "proxied": proxied}
    harness.stop_all_servers([direct, proxied])


@pytest.fixture(scope="session")
def mlflow_direct(servers):
    return servers["direct"]


@pytest.fixture(scope="session")
def mlflow_proxied(servers):
    return servers["proxied"]


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    reg = harness.EmbeddedRegistry(tmp_path_factory.mktemp("mlflow-embedded"))
    reg.start()
    print(f"\n[harness] embedded registry ready in {reg.startup_seconds:.1f}s")
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def seed_direct(mlflow_direct):
    return harness.register_seed_versions(mlflow_direct.env())


@pytest.fixture(scope="session")
def seed_proxied(mlflow_proxied):
    return harness.register_seed_versions(mlflow_proxied.env())


@pytest.fixture(scope="session")
def seed_embedded(embedded):
    return harness.register_seed_versions(embedded.env())


# --- per test ------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """Each test starts with no MLflow/S3/prefetch/Ray-auth settings, its own HOME (so the machine's
    ~/.config/prefetch/config.toml and ~/.ray/auth_token never leak in) and its own empty cache dir."""
    for k in list(os.environ):
        if (k.startswith(_ISOLATED_PREFIXES) or k.startswith("RAY_AUTH")) and k not in harness.models.KEEP_ENV:
            monkeypatch.delenv(k)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    cache = tmp_path / "prefetch-cache"
    cache.mkdir()
    monkeypatch.setenv("PREFETCH_CACHE_DIR", str(cache))
    harness.reset_mlflow_uris()
    yield cache
    harness.reset_mlflow_uris()


@pytest.fixture
def cache_dir(isolated_env):
    """This test's PREFETCH_CACHE_DIR."""
    return isolated_env


@pytest.fixture
def use_env():
    """use_env(env_dict): point os.environ and mlflow at a set-up until the test ends."""
    undo: list[dict] = []

    def _use(env):
        undo.append(harness.apply_env(env))
        return env

    yield _use
    for saved in reversed(undo):
        harness.restore_env(saved)


@pytest.fixture
def apply_env(use_env):
    return use_env
