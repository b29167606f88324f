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
    """No secret in any file of the tree, nor in any file or directory name (a key is a directory name)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files + _dirs:
            for s in secrets:
                assert s not in name, f"{Path(dirpath) / name}: a secret in a path name"
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


# -- 2. every bad input is one line with its exit code ----------------------------------------------------------
def _bad_toml(tmp: Path) -> dict:
    (tmp / "broken.toml").write_text("max_bytes = [\n")
    return {"PREFETCH_CONFIG": str(tmp / "broken.toml")}


def _symlink_loop(tmp: Path) -> str:
    src = tmp / "looped"
    (src / "d").mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"w" * 100)
    os.symlink("..", src / "d" / "up")          # a directory that contains itself
    return str(src)


BAD_INPUTS = {
    # case: (argv after `warm`, env, exit code, a word the line must name)
    "rich markup in a URI": (["models:/[/x]"], {}, 2, "models:/[/x]"),
    "unbalanced bracket": (["s3://[b/x"], {}, 2, "s3://[b/x"),
    "bad bucket name": (["s3://bad!bucket/x"], {}, 2, "bad!bucket"),
    "unknown AWS profile": (["s3://bucket/x"], {"AWS_PROFILE": "nope"}, 2, "AWS_PROFILE"),
    "size that is not a size": (["s3://bucket/x"], {"PREFETCH_MAX_BYTES": "lots"}, 2, "PREFETCH_MAX_BYTES"),
    "zero concurrency": (["s3://bucket/x"], {"PREFETCH_MAX_CONCURRENCY": "0"}, 2, "PREFETCH_MAX_CONCURRENCY"),
    "fractional attempts": (["s3://bucket/x"], {"PREFETCH_MAX_ATTEMPTS": "1.5"}, 2, "PREFETCH_MAX_ATTEMPTS"),
    "negative timeout": (["s3://bucket/x"], {"PREFETCH_READ_TIMEOUT": "-1"}, 2, "PREFETCH_READ_TIMEOUT"),
    "broken TOML config": (["s3://bucket/x"], _bad_toml, 2, "broken.toml"),
    "symlink loop in a local source": (_symlink_loop, {}, 5, "loop"),
}


def _transports(case: str) -> tuple:
    """An s3:// case runs through both S3 transports (their settings are read apart); the others once."""
    argv = BAD_INPUTS[case][0]
    return ("native", "boto3") if not callable(argv) and argv[0].startswith("s3://") else (None,)


@pytest.mark.parametrize("case,transport", [(c, t) for c in sorted(BAD_INPUTS) for t in _transports(c)])
def test_bad_input_is_one_line_with_its_exit_code(case, transport, tmp_path, cache_dir):
    argv, env, code, needle = BAD_INPUTS[case]
    argv = [argv(tmp_path)] if callable(argv) else argv
    env = env(tmp_path) if callable(env) else env
    env = {**env, **({"PREFETCH_TRANSPORT": transport} if transport else {})}
    proc = run_cli("warm", *argv, env=env, timeout=120)
    assert_clean_error(proc, code, needle)
    assert objects_in(cache_dir) == []
    # --debug keeps the traceback for whoever wants it.
    debug = run_cli("--debug", "warm", *argv, env=env, timeout=120)
    assert debug.returncode == code and "Traceback" in debug.stderr


def test_a_ref_without_resolved_at_is_ignored(tmp_path, cache_dir):
    """A torn or hand-edited ref (no resolved_at) is not trusted: the origin is asked again; here it is down,
    so the answer is one line with exit 4, not a KeyError."""
    from prefetch.uri import _ref_id

    uri = "s3://bucket/model"
    ref = cache_dir / "refs" / f"{_ref_id({'uri': uri, 'registry': None})}.json"
    ref.parent.mkdir(parents=True)
    ref.write_text(json.dumps({"uri": uri, "key": "model--0123456789abcdef", "kind": "s3", "identity": {}}))
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{harness.free_port()}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "PREFETCH_MAX_ATTEMPTS": "1", "PREFETCH_CONNECT_TIMEOUT": "1"}
    assert_clean_error(run_cli("warm", uri, env=env, timeout=120), 4, uri)
    assert objects_in(cache_dir) == []


# -- 7. local sources never follow symlinks out of their root ---------------------------------------------------
@pytest.mark.parametrize("form", ["local", "file", "path"])
def test_local_source_refuses_symlinks_out_of_its_root(form, tmp_path, cache_dir):
    outside = tmp_path / "outside-secret.txt"
    outside.write_text("not part of the model")
    src = tmp_path / "model"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"w" * 1000)
    os.symlink("weights.bin", src / "alias.bin")          # inside the root: fine
    uri = {"local": f"local://{src}", "file": src.as_uri(), "path": str(src)}[form]
    ok = json.loads(run_cli("warm", uri, "--json", check=True).stdout)["results"][0]
    assert (Path(ok["path"]) / "alias.bin").read_bytes() == b"w" * 1000
    os.symlink(outside, src / "leak.txt")                 # out of the root: refused before any byte
    proc = run_cli("warm", uri, env={"PREFETCH_REF_TTL": "0"})
    assert_clean_error(proc, 5, "leak.txt")
    assert not any("not part of the model" in p.read_text(errors="replace")
                   for p in cache_dir.rglob("*") if p.is_file() and not p.is_symlink())


# -- 3. quarantine, not collapse ----------------------------------------------------------------------------------
def _two_local_models(tmp_path: Path) -> tuple[str, str]:
    uris = []
    for name in ("alpha", "beta"):
        src = tmp_path / name
        src.mkdir()
        (src / "w.bin").write_bytes(name.encode() * 1000)
        uris.append(str(src))
    return uris[0], uris[1]


@pytest.mark.parametrize("damage", ["truncated", "future-format"])
def test_unreadable_manifest_is_quarantined_and_the_rest_keeps_working(damage, tmp_path, cache_dir):
    from prefetch.store import MANIFEST

    a, b = _two_local_models(tmp_path)
    ka = json.loads(run_cli("warm", a, "--json", check=True).stdout)["results"][0]["key"]
    kb = json.loads(run_cli("warm", b, "--json", check=True).stdout)["results"][0]["key"]
    manifest = cache_dir / "objects" / ka / MANIFEST
    text = manifest.read_text()
    os.chmod(manifest, 0o644)
    if damage == "truncated":
        manifest.write_text(text[: len(text) // 2])
    else:
        manifest.write_text(json.dumps({**json.loads(text), "version": 99, "chunks": {"new": "field"}}))
    listing = json.loads(run_cli("ls", "--json", check=True).stdout)
    assert [o["key"] for o in listing["objects"]] == [kb]
    assert [q["key"] for q in listing["quarantined"]] == [ka]
    assert ("newer" in listing["quarantined"][0]["reason"]) == (damage == "future-format")
    assert not (cache_dir / "objects" / ka).exists()
    verify = run_cli("verify", "--json")
    assert verify.returncode == 0, verify.stderr          # what is left is sound
    assert [q["key"] for q in json.loads(verify.stdout)["quarantined"]] == [ka]
    assert run_cli("gc", "--json").returncode == 0
    # The other key is still a hit; the quarantined one downloads again, with a good manifest.
    assert json.loads(run_cli("warm", b, "--json", check=True).stdout)["results"][0]["from_cache"]
    again = json.loads(run_cli("warm", a, "--json", check=True).stdout)["results"][0]
    assert again["key"] == ka and not again["from_cache"] and again["origin_bytes"] == 5000
    assert json.loads((cache_dir / "objects" / ka / MANIFEST).read_text())["version"] == 1


def test_quarantine_found_by_verify_first(tmp_path, cache_dir):
    from prefetch.store import MANIFEST

    a, _b = _two_local_models(tmp_path)
    ka = json.loads(run_cli("warm", a, "--json", check=True).stdout)["results"][0]["key"]
    manifest = cache_dir / "objects" / ka / MANIFEST
    os.chmod(manifest, 0o644)
    manifest.write_text('{"key": "')
    proc = run_cli("verify", "--json")
    assert proc.returncode == 5 and "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["objects"] == [{"key": ka, "uri": "", "files": 0, "bad": [MANIFEST], "repaired": False, "ok": False}]


# -- 4. trust of the cache directory ------------------------------------------------------------------------------
def _local_model(tmp_path: Path, name: str = "trusted", size: int = 3000) -> str:
    src = tmp_path / name
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(os.urandom(size))
    (src / "sub" / "c.json").write_text("{}")
    return str(src)


@pytest.mark.parametrize("where, how", [("root", "mode 777"), ("root", "mode 770"), ("objects", "mode 777"),
                                        ("staging", "mode 775"), ("refs", "other owner"), ("root", "other owner"),
                                        ("locks", "symlink")])
def test_untrusted_cache_dir_is_refused(where, how, tmp_path, cache_dir):
    uri = _local_model(tmp_path)
    assert run_cli("warm", uri).returncode == 0        # creates the layout
    target = cache_dir if where == "root" else cache_dir / where
    if how.startswith("mode"):
        os.chmod(target, int(how.split()[1], 8))
    elif how == "other owner":
        os.chown(target, 65534, 65534)
    else:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        os.rename(target, tmp_path / "old-locks")
        os.symlink(elsewhere, target)
    for argv in (["warm", _local_model(tmp_path, "second")], ["ls"]):
        assert_clean_error(run_cli(*argv), 2, str(target))
    assert len(objects_in(cache_dir)) == 1


def test_modes_whatever_the_umask(tmp_path, cache_dir):
    """Dirs 0700 and files 0400 with umask 000; 2750 and 0440 with PREFETCH_SHARED_GROUP."""
    import stat

    def warm_with_umask(uri: str, cache: Path, **env):
        cmd = f"umask 000; exec {sys.executable} -m prefetch.cli warm --json {uri}"
        proc = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, cwd=REPO, timeout=120,
                              env={**os.environ, "PREFETCH_CACHE_DIR": str(cache), **env})
        assert proc.returncode == 0, proc.stderr
        return Path(json.loads(proc.stdout)["results"][0]["path"])

    def modes(path: Path) -> set[int]:
        return {stat.S_IMODE(p.stat().st_mode) for p in path.rglob("*") if p.is_file() and p.name != ".prefetch.json"}

    private = tmp_path / "private-cache"
    obj = warm_with_umask(_local_model(tmp_path), private)
    assert modes(obj) == {0o400}
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert {stat.S_IMODE((private / d).stat().st_mode) for d in ("objects", "staging", "refs", "locks")} == {0o700}
    shared = tmp_path / "shared-cache"
    obj = warm_with_umask(_local_model(tmp_path, "other"), shared, PREFETCH_SHARED_GROUP="0")
    assert modes(obj) == {0o440}
    assert stat.S_IMODE(shared.stat().st_mode) == 0o2750 and shared.stat().st_gid == 0
    # Nothing in an object grants anything to others; the rest (refs, locks...) sits in 0700/2750 dirs.
    for cache in (private, shared):
        tree = [cache / "objects", *(cache / "objects").rglob("*")]
        assert tree[1:] and all(not (p.lstat().st_mode & 0o007) for p in tree)
        assert all(not ((cache / d).lstat().st_mode & 0o007) for d in ("refs", "locks", "pins", "staging"))


def test_planted_staging_symlink_is_refused(tmp_path, cache_dir):
    uri = _local_model(tmp_path)
    key = json.loads(run_cli("warm", uri, "--json", check=True).stdout)["results"][0]["key"]
    run_cli("rm", key, check=True)
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    (attacker / "w.bin").write_bytes(b"evil")
    os.symlink(attacker, cache_dir / "staging" / f"{key}.deadbeef")
    assert_clean_error(run_cli("warm", uri), 2, f"{key}.deadbeef")
    assert not (cache_dir / "objects" / key).exists() and not os.path.lexists(cache_dir / "objects" / key)
    assert sorted(p.name for p in attacker.iterdir()) == ["w.bin"] and (attacker / "w.bin").read_bytes() == b"evil"


def test_planted_object_symlink_is_not_served(tmp_path, cache_dir):
    uri = _local_model(tmp_path)
    key = json.loads(run_cli("warm", uri, "--json", check=True).stdout)["results"][0]["key"]
    real = cache_dir / "objects" / key
    os.rename(real, tmp_path / "moved-object")
    os.symlink(tmp_path / "moved-object", real)
    assert_clean_error(run_cli("warm", uri), 2, key)


def test_ref_dated_in_the_future_is_ignored(cache_dir):
    import fsspec
    import prefetch
    from prefetch.config import Settings

    mem = fsspec.filesystem("memory")
    mem.pipe("/trust/m/w.bin", b"a" * 100)
    first = prefetch.warm("memory://trust/m")
    mem.pipe("/trust/m/w.bin", b"b" * 100)
    (ref,) = (cache_dir / "refs").glob("*.json")
    doc = json.loads(ref.read_text())
    ref.write_text(json.dumps({**doc, "resolved_at": doc["resolved_at"] + 10 * 365 * 86400}))
    again = prefetch.warm("memory://trust/m", settings=Settings.load(ref_ttl=0))
    assert again.key != first.key and (again.path / "w.bin").read_bytes() == b"b" * 100


# -- 5. leases and in-flight records that expire -------------------------------------------------------------------
LEASE_TTL = 3.0
_OTHER_POD = """
import os, socket, sys, time
socket.sethostname("deleted-pod-7f9c")
from prefetch.store.lifecycle import Lease
lease = Lease.acquire(sys.argv[1], sys.argv[2], holder="replica on another pod")
print(lease.path, flush=True)
if sys.argv[3] == "exit":
    os._exit(0)            # dies holding it: no release, no more heartbeats
time.sleep(600)            # keeps running (and heartbeating) until the test stops or kills it
"""


def _other_pod(cache: Path, key: str, mode: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(["unshare", "--uts", sys.executable, "-c", _OTHER_POD, str(cache), key, mode],
                            stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PREFETCH_LEASE_TTL": str(LEASE_TTL), "PYTHONPATH": str(REPO)})
    path = Path(proc.stdout.readline().strip())
    assert path.name.startswith("deleted-pod-7f9c-"), path
    return proc, path


def _wait(predicate, seconds: float) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_lease_from_another_host_expires_after_its_ttl_and_gc_removes_it(cache_dir, monkeypatch):
    import time

    from prefetch.store import lifecycle
    from prefetch.config import Settings
    from prefetch.store import Store

    monkeypatch.setenv("PREFETCH_LEASE_TTL", str(LEASE_TTL))
    store = Store(cache_dir)
    dead_key, live_key = "dead-pod--0123456789abcdef", "live-pod--0123456789abcdef"
    dead, dead_path = _other_pod(cache_dir, dead_key, "exit")
    dead.wait(timeout=60)
    live, live_path = _other_pod(cache_dir, live_key, "sleep")
    try:
        # Written under another hostname: the pid cannot be checked from here; only the heartbeat can.
        assert json.loads(dead_path.read_text())["host"] == "deleted-pod-7f9c"
        assert _wait(lambda: not lifecycle.active_leases(store, dead_key), 4 * LEASE_TTL)
        time.sleep(2 * LEASE_TTL)            # well past the TTL: the running holder's heartbeat keeps it
        assert len(lifecycle.active_leases(store, live_key)) == 1
        actions = lifecycle.gc(store, Settings.load())
        assert [(a.kind, a.target) for a in actions if a.kind == "lease"] == [("lease", dead_key)]
        assert not dead_path.exists() and live_path.exists()
        # A holder that still runs but no longer heartbeats (frozen) expires too.
        live.send_signal(19)                 # SIGSTOP
        assert _wait(lambda: not lifecycle.active_leases(store, live_key), 4 * LEASE_TTL)
        lifecycle.gc(store, Settings.load())
        assert not live_path.exists()
    finally:
        live.kill()
        live.wait(timeout=30)


def test_no_bare_pid_checks():
    import time

    from prefetch.store import records
    from prefetch.store.lifecycle import pid_alive

    assert pid_alive(-1) is False and pid_alive(0) is False
    me = records.holder_fields(ttl=30)
    assert records.record_alive(me, now=time.time())
    assert not records.record_alive({**me, "pid_start": me["pid_start"] + 1})        # pid reused
    assert not records.record_alive({**me, "boot_id": "another-boot"})               # the host rebooted
    assert not records.record_alive({**me, "pid": -1}) and not records.record_alive({**me, "pid": 0})
    assert not records.record_alive({**me, "created_at": time.time() - 31})          # heartbeat too old
    assert records.record_alive({**me, "host": "elsewhere", "pid": 1 << 22})         # fresh, other host


def test_lease_ttl_setting_is_validated(cache_dir, tmp_path):
    assert_clean_error(run_cli("warm", _local_model(tmp_path), env={"PREFETCH_LEASE_TTL": "soon"}), 2,
                       "PREFETCH_LEASE_TTL")


# -- 6. a registry version is also what it was made from --------------------------------------------------------
def test_reregistered_model_is_not_served_the_old_version_from_cache(embedded, use_env, cache_dir):
    import prefetch
    from mlflow import MlflowClient
    from prefetch.config import Settings
    from prefetch.store import Store
    from prefetch.uri import recheck

    name = "reborn-model"
    use_env(embedded.env())
    first = harness.register_seed_versions(embedded.env(), name=name, n_versions=1)
    old = prefetch.warm(f"models:/{name}/1")
    assert old.resolved.run_id == first["versions"][0]["run_id"]
    # A pinned hit makes no registry call: it does not even import mlflow.
    probe = ("import sys, prefetch; w = prefetch.warm('models:/%s/1'); "
             "print(w.from_cache, w.key, 'mlflow' in sys.modules)" % name)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ}, check=True).stdout.split()
    assert out == ["True", old.key, "False"]

    MlflowClient().delete_registered_model(name)
    second = harness.register_seed_versions(embedded.env(), name=name, n_versions=1)
    assert second["versions"][0]["version"] == 1 and second["versions"][0]["run_id"] != old.resolved.run_id
    # Resolving a mutable URI asks the registry: the new v1 is a new key, downloaded, not the old object.
    new = prefetch.warm(f"models:/{name}/latest", settings=Settings.load(ref_ttl=0))
    assert new.resolved.version == "1" and new.key != old.key and not new.from_cache
    assert new.resolved.run_id == second["versions"][0]["run_id"]
    assert Store(cache_dir).lookup(new.key).identity["run_id"] == second["versions"][0]["run_id"]
    # ... and the pinned form follows it (the version's ref was updated), still with no registry call.
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ}, check=True).stdout.split()
    assert out == ["True", new.key, "False"]

    # The daemon's interval re-check of a pinned version (uri.recheck) notices a third registration.
    MlflowClient().delete_registered_model(name)
    third = harness.register_seed_versions(embedded.env(), name=name, n_versions=1)
    key3 = recheck(f"models:/{name}/1", Settings.load(), Store(cache_dir))
    assert key3 not in (old.key, new.key)
    w3 = prefetch.warm(f"models:/{name}/1")
    assert w3.key == key3 and w3.resolved.run_id == third["versions"][0]["run_id"] and not w3.from_cache


# -- 8. a missing extra is one line naming the pip command -------------------------------------------------------
def test_missing_convert_extra_is_one_line_naming_pip_install(seed_embedded, use_env, cache_dir):
    """`import skl2onnx` is made to fail in the CLI's process (sys.modules['skl2onnx'] = None): a stand-in for
    "the convert extra is not installed", since the shared test environment has it installed."""
    use_env(seed_embedded["env"])
    uri = f"models:/{seed_embedded['name']}/1"
    code = ("import sys; sys.modules['skl2onnx'] = None; sys.argv = ['prefetch', 'warm', %r, '--format', 'onnx']; "
            "from prefetch.cli import main; main()" % uri)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ))
    assert_clean_error(proc, 2, "skl2onnx", "pip install 'ray-model-prefetch[convert]'")
    assert not list((cache_dir / "derived").glob("*/*"))
    # The same command with the package importable converts (the check is what failed above, nothing else).
    ok = run_cli("warm", uri, "--format", "onnx", "--json", timeout=600)
    assert ok.returncode == 0, ok.stderr
    assert list((cache_dir / "derived").glob("*/onnx-*"))


def test_onnxruntime_is_a_core_dependency_and_converters_are_extras():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for d in project["dependencies"]}
    assert "onnxruntime" in core and not core & {"onnx", "skl2onnx", "onnxscript", "torch"}
    extras = project["optional-dependencies"]
    assert {"onnx", "skl2onnx", "onnxscript"} <= {d.split(">")[0] for d in extras["convert"]}
    assert any(d.startswith("torch") for d in extras["torch"])


def test_replica_status_shows_uri_version_and_error_without_credentials(seed_embedded, use_env, cache_dir):
    """RegistryModel.status() is what GET <route>/-/model answers and what a replica publishes: the model URI,
    version and error text with credentials stripped, and nothing else from user_config."""
    from serving.deployment import RegistryModel

    use_env(seed_embedded["env"])
    replica = RegistryModel()
    replica._apply({"model_uri": f"models:/{seed_embedded['name']}/1", "api_secret": PASSWORD})
    dead = harness.free_port()
    bad = f"http://alice:{PASSWORD}@127.0.0.1:{dead}/api/2.0/mlflow-artifacts/artifacts/x?token={TOKEN}"
    replica._apply({"model_uri": bad, "session_options": {"password": OTHER_PASSWORD}})
    status = replica.status()
    text = json.dumps(status)
    _secret_free(text, PASSWORD, OTHER_PASSWORD, TOKEN)
    assert status["version"] == "1" and status["error"]["uri"].startswith(f"http://127.0.0.1:{dead}/")
    assert status["error"]["message"]
    assert set(status["config"]) == {"model_uri", "format"}
    answer = replica.answer([1.0], replica.model)
    _secret_free(json.dumps(answer), PASSWORD, TOKEN)
    replica.model.release()


def test_shared_group_reader_may_use_a_cache_another_user_keeps(tmp_path):
    """With PREFETCH_SHARED_GROUP, a cache owned by another user and that group (not writable by it) is read;
    without it, the same cache is refused."""
    uri = _local_model(tmp_path)
    cache = tmp_path / "kept-by-another"
    env = {"PREFETCH_CACHE_DIR": str(cache), "PREFETCH_SHARED_GROUP": "0"}
    assert run_cli("warm", uri, env=env).returncode == 0
    for p in [cache, *cache.rglob("*")]:
        os.lchown(p, 65534, 0)
    listing = run_cli("ls", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    assert len(json.loads(listing.stdout)["objects"]) == 1
    assert_clean_error(run_cli("ls", env={"PREFETCH_CACHE_DIR": str(cache)}), 2, "owned by uid 65534")


def test_inflight_record_and_status_rows_hold_no_credentials(proxied_server, cache_dir):
    """While a download runs, its in-flight record (read by `status`) names the URI without credentials and
    says who holds it; the node's status rows built from it are clean too."""
    import time

    from prefetch.store.lifecycle import inflight_downloads
    from prefetch.store import Store

    server = proxied_server["server"]
    art = proxied_server["seed"]["versions"][0]["artifact_location"].split(":", 1)[1].lstrip("/")
    fast = f"http://127.0.0.1:{server.port}/api/2.0/mlflow-artifacts/artifacts/{art}"
    size = json.loads(run_cli("resolve", fast, "--json", check=True).stdout)["bytes"]
    slow = harness.LinkProxy("127.0.0.1", server.port, rate_bytes_per_s=max(4096, size / 2)).start()
    url = (f"http://alice:{PASSWORD}@127.0.0.1:{slow.port}/api/2.0/mlflow-artifacts/artifacts/{art}"
           f"?token={TOKEN}")
    env = {**os.environ, "PREFETCH_MAX_CONCURRENCY": "1", "PREFETCH_CACHE_DIR": str(cache_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "prefetch.cli", "warm", url, "--json"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        records = []
        deadline = time.monotonic() + 120
        while not records and proc.poll() is None and time.monotonic() < deadline:
            records = list((cache_dir / "staging").glob("*/.inflight.json"))
            time.sleep(0.05)
        assert records, "the download finished before its in-flight record could be seen"
        doc = json.loads(records[0].read_text())
        _secret_free(json.dumps(doc), PASSWORD, TOKEN)
        assert {"host", "boot_id", "pid", "pid_start", "ttl"} <= set(doc) and doc["pid"] == proc.pid
        rows = inflight_downloads(Store(cache_dir))
        assert rows and rows[0]["alive"] is True
        _secret_free(json.dumps(rows), PASSWORD, TOKEN)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        slow.stop()
    assert proc.returncode == 0, err
    _secret_free(out + err, PASSWORD, TOKEN)
    _grep_tree(cache_dir, PASSWORD, TOKEN)


def test_markup_in_a_uri_is_printed_as_typed(tmp_path, cache_dir):
    """Human output is text, never rich markup: a path holding `[/x]` warms, resolves and lists."""
    src = tmp_path / "m[" / "x]"
    src.mkdir(parents=True)
    (src / "w.bin").write_bytes(b"w" * 10)
    for argv in (["warm", str(src)], ["resolve", str(src)], ["ls"]):
        proc = run_cli(*argv, env={"COLUMNS": "400"})
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "m[/x]" in proc.stderr, proc.stderr


def test_reregistered_version_evicted_meanwhile_lands_under_its_new_key(embedded, use_env, cache_dir):
    """The pinned form's ref names the old v1; once that object is gone, a warm asks the registry (a miss needs
    it anyway) and the new v1's bytes are committed under the new v1's key, never under the old one."""
    import prefetch
    from mlflow import MlflowClient
    from prefetch.store import Store

    name = "reborn-evicted"
    use_env(embedded.env())
    harness.register_seed_versions(embedded.env(), name=name, n_versions=1)
    old = prefetch.warm(f"models:/{name}/1")
    prefetch.api.remove(old.key)
    MlflowClient().delete_registered_model(name)
    second = harness.register_seed_versions(embedded.env(), name=name, n_versions=1)
    new = prefetch.warm(f"models:/{name}/1")
    assert new.key != old.key and not new.from_cache
    assert Store(cache_dir).lookup(new.key).identity["run_id"] == second["versions"][0]["run_id"]
