"""Issue H, the safety half: no secrets at rest or in output, bad input is one line, quarantine, trust of the
cache directory, leases that expire, registry identity, local sources, missing extras.

Real parts: a real proxied `mlflow server` (artifacts in SeaweedFS) behind loopback proxies that record the
Authorization header each request carries; the real CLI in subprocesses; real files and permissions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import harness
from tests.helpers import REPO, assert_clean_error, objects_in, run_cli

PASSWORD = "s3cr3t-PW-9f1c"
TOKEN = "tok-7d2e-never-on-disk"
OTHER_PASSWORD = "0ther-PW-44aa"


# -- a proxy that remembers what credentials each request carried -------------------------------------------------
class AuthRecordingProxy(harness.LinkProxy):
    """LinkProxy that also records every request's Authorization header (or None): stands in for a server that
    checks credentials, since the harness's mlflow server ignores them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.auth: list[str | None] = []

    def _on_request(self, method: bytes, target: bytes, headers: dict) -> None:
        super()._on_request(method, target, headers)
        value = headers.get(b"authorization")
        with self._lock:
            self.auth.append(value.decode("latin-1") if value else None)


@pytest.fixture(scope="module")
def proxied_server(s3, tmp_path_factory):
    server = harness.MlflowServer(tmp_path_factory.mktemp("mlflow-safety"), s3, mode="proxied", prefix="safety",
                                  start_timeout=240)
    server.start()
    seed = harness.register_seed_versions(server.env(), name="safety-model", n_versions=1)
    tracking = AuthRecordingProxy("127.0.0.1", server.port).start()
    foreign = AuthRecordingProxy("127.0.0.1", server.port).start()   # "another host": another port
    yield {"server": server, "seed": seed, "tracking": tracking, "foreign": foreign}
    tracking.stop()
    foreign.stop()
    server.stop()


def _secret_free(text: str, *secrets: str) -> None:
    for s in secrets:
        assert s not in text, f"a secret reached the output: ...{text[max(0, text.find(s) - 200):text.find(s) + 50]}..."


def _grep_tree(root: Path, *secrets: str) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            data = (Path(dirpath) / name).read_bytes()
            for s in secrets:
                assert s.encode() not in data, f"{Path(dirpath) / name} holds a secret"


def test_no_credentials_at_rest_or_in_output(proxied_server, cache_dir):
    """A tracking URI with user:password@ leaves no trace of the password in the cache dir or in any output, the
    same model under two credentials is one key, and the registry still got the credentials it needed."""
    tracking = proxied_server["tracking"]
    name = proxied_server["seed"]["name"]
    env = {"MLFLOW_TRACKING_URI": f"http://alice:{PASSWORD}@127.0.0.1:{tracking.port}"}
    outputs = []

    def cli(*args, code=0, extra=None):
        proc = run_cli(*args, env={**env, **(extra or {})}, timeout=600)
        outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == code, f"{args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    first = json.loads(cli("warm", f"models:/{name}/1", "--json").stdout)["results"][0]
    assert first["ok"] and not first["from_cache"]
    cli("warm", f"models:/{name}/latest")                  # human output, and a ref on disk
    cli("warm", f"models:/{name}@champion", "--json")
    cli("resolve", f"models:/{name}/1", "--json")
    cli("pin", f"models:/{name}/latest", "--json")
    cli("ls", "--json")
    cli("ls")
    cli("verify", "--json")
    cli("gc", "--json")
    cli("metrics")
    # Errors naming the URI and the tracking server: a missing model, then an unreachable server.
    assert_clean_error(cli("warm", f"models:/no-such-model-{name}/1", code=3), 3)
    dead = harness.free_port()
    cli("warm", f"models:/{name}/Staging", code=4,
        extra={"MLFLOW_TRACKING_URI": f"http://alice:{PASSWORD}@127.0.0.1:{dead}"})
    # A credential in an artifact URI's query string is no identity either.
    art = proxied_server["seed"]["versions"][0]["artifact_location"].split(":", 1)[1].lstrip("/")
    url = f"http://alice:{PASSWORD}@127.0.0.1:{tracking.port}/api/2.0/mlflow-artifacts/artifacts/{art}?token={TOKEN}"
    by_url = json.loads(cli("warm", url, "--json").stdout)["results"][0]
    assert by_url["ok"]
    # The same version under another credential is the same key, served from cache.
    again = json.loads(cli("warm", f"models:/{name}/1", "--json",
                           extra={"MLFLOW_TRACKING_URI": f"http://bob:{OTHER_PASSWORD}@127.0.0.1:{tracking.port}"}
                           ).stdout)["results"][0]
    assert again["key"] == first["key"] and again["from_cache"]

    for text in outputs:
        _secret_free(text, PASSWORD, OTHER_PASSWORD, TOKEN)
    _grep_tree(cache_dir, PASSWORD, OTHER_PASSWORD, TOKEN)
    # The credentials did reach the tracking server (this test would pass vacuously if nothing was sent).
    assert any(a and a.startswith("Basic ") for a in tracking.auth)


def test_mlflow_token_goes_only_to_the_tracking_server(proxied_server, cache_dir):
    """MLFLOW_TRACKING_TOKEN is sent to the tracking server's own host, never to a host an artifact URI names."""
    tracking, foreign = proxied_server["tracking"], proxied_server["foreign"]
    art = proxied_server["seed"]["versions"][0]["artifact_location"].split(":", 1)[1].lstrip("/")
    env = {"MLFLOW_TRACKING_URI": tracking.url, "MLFLOW_TRACKING_TOKEN": TOKEN}
    foreign.auth.clear()
    tracking.auth.clear()
    proc = run_cli("warm", f"{foreign.url}/api/2.0/mlflow-artifacts/artifacts/{art}", "--json", env=env,
                   timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert foreign.auth and all(a is None for a in foreign.auth), foreign.auth
    # The very same artifact through the tracking server's own address: there the token is sent.
    proc = run_cli("warm", f"{tracking.url}/api/2.0/mlflow-artifacts/artifacts/{art}", "--json",
                   env={**env, "PREFETCH_REF_TTL": "0"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"Bearer {TOKEN}" in tracking.auth


def test_redaction_of_uris_and_text():
    from prefetch.errors import NotFound
    from prefetch.redact import redact_text, redact_uri

    assert redact_uri("https://u:p@host:5000/x?token=abc&keep=1") == "https://host:5000/x?keep=1"
    assert redact_uri("s3://b/k?X-Amz-Signature=zz&X-Amz-Credential=cc") == "s3://b/k"
    assert redact_uri("models:/m@champion") == "models:/m@champion"
    line = redact_text("cannot reach http://u:p4ss@h:1/a?sig=xyz&b=2 (retry)")
    assert "p4ss" not in line and "xyz" not in line and "http://h:1/a?sig=***&b=2" in line
    e = NotFound(f"cannot reach http://u:{PASSWORD}@h/", f"http://u:{PASSWORD}@h/m?access_token={TOKEN}")
    _secret_free(str(e), PASSWORD, TOKEN)
