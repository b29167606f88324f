"""Issue A: `prefetch warm` resolves every URI form, in every registry set-up, and caches once, atomically."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import prefetch
from prefetch.store import Store, sha256_file
from tests import harness
from tests.helpers import PREFETCH, REPO, assert_clean_error, sha256_per_chunk, cli_json, objects_in, run_cli

NAME = harness.SEED_MODEL_NAME


def _load_and_predict(path: Path, X) -> np.ndarray:
    import mlflow

    return np.asarray(mlflow.pyfunc.load_model(str(path)).predict(X))


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (size, sha256)} of every file under root (our manifest left out)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, sha256_file(p))
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".prefetch.json"}


def _mlflow_tree(seed: dict, version: int, tmp_path: Path) -> dict[str, tuple[int, str]]:
    """What MLflow's own client downloads for a registered version (the independent expectation)."""
    import mlflow

    dest = tmp_path / f"mlflow-v{version}"
    if not dest.exists():
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}/{version}", dst_path=str(dest))
    tree = _tree(dest)
    tree.pop("registered_model_meta", None)   # written by MLflow's client on a models:/ download, not stored
    return tree


def _uri_forms(seed: dict) -> dict[str, int]:
    """Every registry URI form for the seed model -> the version it must resolve to."""
    v1, v2 = seed["versions"][0], seed["versions"][-1]
    return {
        f"models:/{NAME}/1": 1,
        f"models:/{NAME}/latest": v2["version"],
        f"models:/{NAME}/Production": 1,
        f"models:/{NAME}/production": 1,
        f"models:/{NAME}@champion": v2["version"],
        f"models:/{NAME}@stable": 1,
        f"models:/{v1['model_id']}": 1,
        f"runs:/{v1['run_id']}/sklearn-model": 1,
    }


@pytest.mark.parametrize("setup", ["direct", "proxied", "embedded"])
def test_every_registry_uri_form_in_every_setup(setup, request, use_env, cache_dir, s3, tmp_path):
    seed = request.getfixturevalue(f"seed_{setup}")
    use_env(seed["env"])
    key_of: dict[str, str] = {}
    for uri, version in _uri_forms(seed).items():
        w = prefetch.warm(uri)
        assert w.path.is_dir() and (w.path / "MLmodel").is_file(), uri
        assert w.path.parent == cache_dir / "objects"
        key_of[uri] = w.key
        if uri.startswith("models:/") and "m-" not in uri:
            assert w.resolved.version == str(version), uri
        # The cached tree is byte for byte what MLflow's own client downloads for that version (computed
        # by MLflow, not by us), and the manifest describes exactly those files.
        expected = _mlflow_tree(seed, version, tmp_path)
        assert _tree(w.path) == expected, uri
        manifest = json.loads((w.path / ".prefetch.json").read_text())
        assert {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]} == expected, uri
        assert w.bytes == sum(size for size, _ in expected.values()), uri
    # The same registry version asked for in four spellings (number, stage in two cases, alias) is one key.
    # (m-<id> and runs:/ name the logged model, a key of their own; their bytes were checked above.)
    registry_spellings = [f"models:/{NAME}/1", f"models:/{NAME}/Production", f"models:/{NAME}/production",
                          f"models:/{NAME}@stable"]
    assert len({key_of[u] for u in registry_spellings}) == 1, {u: key_of[u] for u in registry_spellings}
    # latest and @champion name the newest version the test registered: one key, not version 1's.
    newest = [f"models:/{NAME}/latest", f"models:/{NAME}@champion"]
    assert len({key_of[u] for u in newest}) == 1 and key_of[newest[0]] != key_of[registry_spellings[0]]
    # What is cached is the model itself: it loads from the local path and predicts like the registry's.
    w1 = prefetch.warm(f"models:/{NAME}/1")
    np.testing.assert_allclose(_load_and_predict(w1.path, seed["X_test"]), seed["expected"][1])
    w2 = prefetch.warm(f"models:/{NAME}@champion")
    newest_version = seed["versions"][-1]["version"]        # what the test registered last
    np.testing.assert_allclose(_load_and_predict(w2.path, seed["X_test"]), seed["expected"][newest_version])


def test_storage_uris_s3_and_mlflow_artifacts(seed_direct, seed_proxied, use_env, s3):
    # s3:// straight at the version's storage, as the direct-mode server recorded it.
    use_env(seed_direct["env"])
    loc = seed_direct["versions"][0]["artifact_location"]
    assert loc.startswith("s3://")
    w = prefetch.warm(loc)
    np.testing.assert_allclose(_load_and_predict(w.path, seed_direct["X_test"]), seed_direct["expected"][1])
    assert w.resolved.kind == "s3"
    # mlflow-artifacts:/ through the proxying server, no S3 credentials on the client side.
    use_env(seed_proxied["env"])
    loc = seed_proxied["versions"][0]["artifact_location"]
    assert loc.startswith("mlflow-artifacts:")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        os.environ.pop(var, None)
    w = prefetch.warm(loc)
    np.testing.assert_allclose(_load_and_predict(w.path, seed_proxied["X_test"]), seed_proxied["expected"][1])


def test_local_paths_file_uris_and_fsspec(tmp_path):
    import fsspec

    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(100_000))
    (src / "sub" / "b.txt").write_text("hello")
    for uri in (str(src), src.as_uri()):
        w = prefetch.warm(uri)
        assert (w.path / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
        assert (w.path / "sub" / "b.txt").read_text() == "hello"
    # Any fsspec URL: the in-memory filesystem stands in for clouds other than S3 (they cannot exist here).
    mem = fsspec.filesystem("memory")
    mem.pipe("/bucket/m/weights.bin", b"w" * 5000)
    mem.pipe("/bucket/m/conf/c.json", b"{}")
    w = prefetch.warm("memory://bucket/m")
    assert (w.path / "weights.bin").read_bytes() == b"w" * 5000
    assert (w.path / "conf" / "c.json").read_bytes() == b"{}"
    # New content under the same mutable URI is a new key, never an overwrite.
    mem.pipe("/bucket/m/weights.bin", b"v" * 5000)
    w2 = prefetch.warm("memory://bucket/m", settings=prefetch.Settings.load(ref_ttl=0))
    assert w2.key != w.key and (w.path / "weights.bin").read_bytes() == b"w" * 5000


def test_second_warm_moves_no_artifact_bytes_and_loads_offline(seed_direct, use_env, s3, cache_dir):
    use_env(seed_direct["env"])
    first = prefetch.warm(f"models:/{NAME}/1")
    s3.reset_stats()
    again = prefetch.warm(f"models:/{NAME}/1")
    assert again.from_cache and again.path == first.path
    assert s3.stats()["requests"] == 0, s3.stats()
    latest = prefetch.warm(f"models:/{NAME}/latest")   # one registry call, no artifact bytes once cached
    s3.reset_stats()
    again_latest = prefetch.warm(f"models:/{NAME}/latest", settings=prefetch.Settings.load(ref_ttl=0))
    assert again_latest.key == latest.key and again_latest.from_cache
    assert s3.stats()["requests"] == 0
    # No network at all: registry and S3 pointed at closed ports; the cached copy still loads.
    use_env({"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9"})
    np.testing.assert_allclose(_load_and_predict(first.path, seed_direct["X_test"]), seed_direct["expected"][1])


def test_unreachable_registry_falls_back_to_last_ref(mlflow_direct, seed_direct, use_env, cache_dir):
    host, port = mlflow_direct.tracking_uri.split("//")[1].split(":")
    proxy = harness.LinkProxy(host, int(port)).start()
    try:
        use_env({**seed_direct["env"], "MLFLOW_TRACKING_URI": proxy.url})
        live = prefetch.warm(f"models:/{NAME}@champion")
        assert not live.resolved.offline
    finally:
        proxy.stop()
    stale = prefetch.warm(f"models:/{NAME}@champion", settings=prefetch.Settings.load(ref_ttl=0))
    assert stale.resolved.offline and stale.key == live.key and stale.from_cache
    assert "unreachable" in stale.resolved.note
    proc = run_cli("warm", f"models:/{NAME}@champion", env={"PREFETCH_REF_TTL": "0"})
    assert proc.returncode == 0 and "unreachable" in proc.stderr and "last known" in proc.stderr
    # A mutable URI never resolved before has no fallback: a clean exit 4.
    assert_clean_error(run_cli("warm", f"models:/{NAME}/latest"), 4, f"models:/{NAME}/latest", "reach")


# -- bad input: one line, distinct exit code, no traceback, nothing under objects/ -----------------------------
BAD_SYNTAX = ["models:/", f"models:/{NAME}", f"models:/{NAME}/1/extra", f"models:/{NAME}@", f"models:/{NAME}/Prod",
              "runs:/", "s3://", "nosuchscheme://x/y", "mlflow-artifacts:/"]


@pytest.mark.parametrize("uri", BAD_SYNTAX)
def test_malformed_uri(uri, cache_dir):
    assert_clean_error(run_cli("warm", uri), 2, uri)
    assert objects_in(cache_dir) == []


def test_registry_bad_inputs(seed_direct, use_env, cache_dir):
    use_env(seed_direct["env"])
    cases = {
        "models:/no-such-model/1": (3, "no-such-model"),
        f"models:/{NAME}/999": (3, "999"),
        f"models:/{NAME}/Staging": (3, "Staging"),
        f"models:/{NAME}@no-such-alias": (3, "no-such-alias"),
        "models:/m-0123456789abcdef0123456789abcdef": (3, "m-0123"),
        "runs:/0123456789abcdef0123456789abcdef/model": (3, "runs:/"),
    }
    for uri, (code, needle) in cases.items():
        assert_clean_error(run_cli("warm", uri), code, uri, needle)
    assert objects_in(cache_dir) == []
    # JSON mode reports the error in the document, same exit code.
    proc = run_cli("warm", f"models:/{NAME}/999", "--json")
    assert proc.returncode == 3 and json.loads(proc.stdout)["results"][0]["exit_code"] == 3


def test_unreachable_and_refused_origins(seed_direct, s3, use_env, cache_dir):
    use_env(seed_direct["env"])
    uri = f"models:/{NAME}/1"
    dead = "http://127.0.0.1:9"
    assert_clean_error(run_cli("warm", uri, env={"MLFLOW_TRACKING_URI": dead, "MLFLOW_REGISTRY_URI": dead}), 4, uri,
                       "tracking server")
    assert_clean_error(run_cli("warm", uri, env={"MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9"}), 4, uri, "S3")
    assert_clean_error(run_cli("warm", uri, env={"AWS_SECRET_ACCESS_KEY": "wrong-secret"}), 4, uri, "credentials")
    assert_clean_error(run_cli("warm", "s3://no-such-bucket/model"), 3, "no-such-bucket", "bucket")
    assert_clean_error(run_cli("warm", "s3://models/no/such/prefix"), 3, "s3://models/no/such/prefix")
    assert objects_in(cache_dir) == []
    assert not list((cache_dir / "staging").glob("*/*")) if (cache_dir / "staging").exists() else True


def test_listing_that_escapes_the_artifact_dir_is_refused(tmp_path, cache_dir):
    """A listing is checked before any byte moves. S3 servers (SeaweedFS included) normalise `..` and `//` out of
    keys, so the hostile listings come from fsspec's in-memory backend, whose keys are stored verbatim."""
    import fsspec
    from fsspec.implementations.memory import MemoryFile

    mem = fsspec.filesystem("memory")
    hostile = {"dots": "/hostile-dots/../../outside.txt", "abs": "/hostile-abs//etc/passwd"}
    for name, key in hostile.items():
        mem.pipe(f"/hostile-{name}/ok.txt", b"ok")
        mem.store[key] = MemoryFile(mem, key, b"x")
    with pytest.raises(prefetch.IntegrityError, match=r"unsafe path '\.\./\.\./outside.txt' \(contains '\.\.'\)") as e:
        prefetch.warm("memory://hostile-dots")
    assert e.value.exit_code == 5 and "memory://hostile-dots" in str(e.value)
    with pytest.raises(prefetch.IntegrityError, match=r"unsafe path '/etc/passwd' \(absolute"):
        prefetch.warm("memory://hostile-abs")
    assert objects_in(cache_dir) == [] and not list((cache_dir / "staging").glob("*"))
    # Symlinks out of a local artifact dir.
    art = tmp_path / "art"
    art.mkdir()
    (art / "model.bin").write_bytes(b"m")
    secret = tmp_path / "secret.txt"
    secret.write_text("s")
    (art / "link").symlink_to(secret)
    assert_clean_error(run_cli("warm", str(art)), 5, "symlink", "outside")
    (art / "link").unlink()
    (art / "dirlink").symlink_to(tmp_path)
    assert_clean_error(run_cli("warm", str(art)), 5, "outside")
    (art / "dirlink").unlink()
    (art / "inner").symlink_to(art / "model.bin")      # a symlink inside the tree is fine
    assert run_cli("warm", str(art)).returncode == 0
    assert len(objects_in(cache_dir)) == 1


@pytest.mark.parametrize("evil", ["evil-dots/a/../../../escape.txt", "evil-dots//etc/escape.txt"],
                         ids=["dotdot", "absolute"])
def test_an_s3_listing_that_escapes_its_prefix_is_refused(evil, s3, use_env, cache_dir):
    """SeaweedFS normalises `..` and `//` in the keys it stores, so the hostile listing is made on the wire: the
    proxy adds the key to the real server's ListObjectsV2 answer. The refusal branch must run: exit 5, nothing
    fetched, nothing written outside the cache, nothing committed."""
    proxy = harness.LinkProxy("127.0.0.1", s3.s3_port).start()
    try:
        client = s3.client(endpoint=s3.direct_endpoint)
        client.put_object(Bucket="models", Key="evil-dots/ok.txt", Body=b"ok")
        entry = f"<Contents><Key>{evil}</Key><Size>1</Size><ETag>&#34;{'0' * 32}&#34;</ETag></Contents>"
        # Every listing answer (a client that lists again, as the native transport does through boto3 when
        # obstore cannot parse a listing, meets the same hostile server).
        proxy.add_fault("rewrite", b"list-type=2", count=1000,
                        rewrite=lambda body: body.decode().replace("<Contents>", entry + "<Contents>", 1).encode())
        proc = run_cli("warm", "s3://models/evil-dots", env=s3.env(proxy.url))
        assert_clean_error(proc, 5, "unsafe path")
        gets = [r[1] for r in proxy.request_log() if r[0] == "GET" and "list-type" not in r[1]]
        assert gets == [], gets
    finally:
        proxy.stop()
    assert not (cache_dir / "escape.txt").exists() and not (cache_dir.parent / "escape.txt").exists()
    assert objects_in(cache_dir) == []


# -- crash + resume ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ranged", [True, False], ids=["ranged", "single-stream"])
def test_sigkill_mid_download_then_resume(ranged, s3, use_env, cache_dir, tmp_path):
    size = 48 << 20
    client = s3.client()
    prefix = f"resume-{'ranged' if ranged else 'single'}"
    blob = tmp_path / "weights.bin"
    harness.write_random_file(blob, size, seed=3)
    client.upload_file(str(blob), "models", f"{prefix}/weights.bin")
    # Slow link so the kill lands mid-way: 2 connections at 4 MiB/s each.
    slow = harness.LinkProxy("127.0.0.1", s3.s3_port, rate_bytes_per_s=4 << 20).start()
    env = {**s3.env(), "MLFLOW_S3_ENDPOINT_URL": slow.url, "PREFETCH_MAX_CONCURRENCY": "2",
           "PREFETCH_MULTIPART_THRESHOLD": str(8 << 20) if ranged else str(1 << 30), "PREFETCH_CHUNK_BYTES": str(4 << 20)}
    use_env(env)
    try:
        proc = subprocess.Popen([*PREFETCH, "warm", f"s3://models/{prefix}"], env=dict(os.environ), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        staged = 0
        while time.time() < deadline and staged < size * 0.4:
            time.sleep(0.2)
            staged = sum(p.stat().st_blocks * 512 for p in (cache_dir / "staging").glob("*/data/**/*") if p.is_file()) \
                if (cache_dir / "staging").exists() else 0
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert size * 0.3 < staged < size, staged
        assert objects_in(cache_dir) == []                 # a reader never sees a partial tree
        slow.reset()
        result = cli_json("warm", f"s3://models/{prefix}")["results"][0]
        resumed_bytes = slow.stats()["bytes_out"]
    finally:
        slow.stop()
    assert result["ok"] and not result["from_cache"]
    assert resumed_bytes < size * 0.75, f"resume fetched {resumed_bytes} of {size}"
    # What the warm says it fetched agrees with the origin's count (headers aside), not with the file size.
    assert size * 0.2 < result["origin_bytes"] <= resumed_bytes
    cached = Path(result["path"]) / "weights.bin"
    assert sha256_file(cached) == sha256_file(blob)
    manifest = json.loads((Path(result["path"]) / ".prefetch.json").read_text())
    data = blob.read_bytes()       # the record of a file of several chunks: each chunk's sha256 (4 MiB grid here)
    assert manifest["files"][0]["chunks"] == {"size": 4 << 20, "sha256": sha256_per_chunk(data, 4 << 20)}
    assert not list((cache_dir / "staging").iterdir())


# -- single flight ------------------------------------------------------------------------------------------------
def test_eight_processes_one_download(seed_direct, s3, use_env, cache_dir):
    use_env(seed_direct["env"])
    uri = f"models:/{NAME}/2"
    # The expectation comes from the S3 server's own listing of the version's storage, not from our resolver.
    location = seed_direct["versions"][1]["artifact_location"]
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    listed = [o for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
              for o in page.get("Contents", [])]
    n_files, n_bytes = len(listed), sum(o["Size"] for o in listed)
    assert n_files > 1 and n_bytes > 0
    s3.reset_stats()
    procs = [subprocess.Popen([*PREFETCH, "warm", uri, "--json"], env=dict(os.environ), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    results = [json.loads(o[0])["results"][0] for o in outs]
    stats = s3.stats()
    print(f"\n8 processes: origin served {stats['bytes_out']} bytes in {stats['get_requests']} GETs "
          f"for a {n_bytes}-byte model of {n_files} files")
    assert len({r["path"] for r in results}) == 1
    assert sum(not r["from_cache"] for r in results) == 1
    # One listing (ListObjectsV2 is a GET) by the one downloader, then every file exactly once.
    assert stats["get_requests"] == n_files + 1
    assert n_bytes <= stats["bytes_out"] < n_bytes * 1.2


# -- CLI: resolve, ls, verify, rm ----------------------------------------------------------------------------------
def test_cli_resolve_ls_verify_rm(seed_embedded, use_env, cache_dir):
    use_env(seed_embedded["env"])
    uri = f"models:/{NAME}@champion"
    r = cli_json("resolve", uri)
    assert r["version"] == str(seed_embedded["versions"][-1]["version"]) and r["files"] and r["storage_uri"]
    assert objects_in(cache_dir) == []                       # resolve moves no bytes
    w = cli_json("warm", uri)["results"][0]
    listing = cli_json("ls")
    assert [o["key"] for o in listing["objects"]] == [w["key"]] and listing["bytes"] == w["bytes"]
    # Corrupt one file: verify reports it, --no-repair exits 5, default repairs from the origin.
    victim = Path(w["path"]) / "MLmodel"
    good = victim.read_bytes()
    os.chmod(victim, 0o644)
    victim.write_bytes(b"corrupted")
    proc = run_cli("verify", w["key"][:12], "--no-repair", "--json")
    assert proc.returncode == 5 and json.loads(proc.stdout)["objects"][0]["bad"] == ["MLmodel"]
    fixed = cli_json("verify")
    assert fixed["ok"] and fixed["objects"][0]["repaired"]
    assert victim.read_bytes() == good
    assert Store(cache_dir).verify(w["key"]) == []
    gone = cli_json("rm", w["key"])
    assert gone["freed_bytes"] >= w["bytes"] and objects_in(cache_dir) == []
    assert_clean_error(run_cli("rm", "no-such-key"), 3, "no-such-key")


def test_verify_does_not_repair_from_an_origin_that_changed_since(tmp_path, cache_dir):
    """A damaged file is fetched again for repair, and the fresh bytes are checked against the record the object was
    committed with (its chunks' sha256s: a file of several chunks has no whole-file sha256). A local origin has no
    ETag to stop the read; the record is what refuses bytes the origin changed since: exit 5, one line, the damaged
    copy left as it was (not replaced by other bytes under the same key)."""
    src = tmp_path / "model"
    src.mkdir()
    size = 9 << 20                                   # 3 chunks of 4 MiB
    (src / "w.bin").write_bytes(os.urandom(size))
    env = {"PREFETCH_CHUNK_BYTES": str(4 << 20)}
    w = cli_json("warm", str(src), env=env)["results"][0]
    victim = Path(w["path"]) / "w.bin"
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as f:
        f.seek(5 << 20)
        f.write(b"\0" * 16)
    damaged = victim.read_bytes()
    (src / "w.bin").write_bytes(os.urandom(size))   # the origin now holds other bytes of the same size
    proc = run_cli("verify", w["key"], env=env)
    assert_clean_error(proc, 5, "w.bin", "origin now serves different bytes")
    assert victim.read_bytes() == damaged
    assert not list((cache_dir / "staging").iterdir())


# -- retries ----------------------------------------------------------------------------------------------------
def test_retries_503_and_resets_mid_stream(s3, use_env, cache_dir, tmp_path):
    """A flaky link in front of the real S3 server: GETs answered 503, connections reset mid-response."""
    size = 24 << 20
    blob = tmp_path / "w.bin"
    harness.write_random_file(blob, size, seed=5)
    s3.client().upload_file(str(blob), "models", "flaky/w.bin")
    s3.client().put_object(Bucket="models", Key="flaky/conf.json", Body=b"{}")
    flaky = harness.LinkProxy("127.0.0.1", s3.s3_port).start()
    try:
        use_env({**s3.env(flaky.url), "PREFETCH_MAX_CONCURRENCY": "2", "PREFETCH_CHUNK_BYTES": str(4 << 20),
                 "PREFETCH_MULTIPART_THRESHOLD": str(8 << 20)})
        flaky.inject_faults(answer_503=3, cut=3, cut_after_bytes=1 << 20, match=b"w.bin")
        w = prefetch.warm("s3://models/flaky")
        stats = flaky.stats()
    finally:
        flaky.stop()
    assert sha256_file(w.path / "w.bin") == sha256_file(blob)
    assert Store(cache_dir).verify(w.key) == []
    # Every fault was met and survived: the 503s retried, the resets resumed from the byte they reached.
    assert stats["faults_served"] == 6, stats
    ranges = size // (4 << 20)
    assert stats["get_requests"] >= ranges + 2 + 3, stats       # ranges + conf + listing + 3 resumed after a reset
    assert stats["bytes_out"] < size * 1.3, stats


def test_gives_up_cleanly_when_the_origin_keeps_failing(s3, use_env, cache_dir):
    s3.client().put_object(Bucket="models", Key="down/w.bin", Body=b"x" * 1000)
    flaky = harness.LinkProxy("127.0.0.1", s3.s3_port).start()
    try:
        use_env({**s3.env(flaky.url), "PREFETCH_MAX_ATTEMPTS": "2"})
        flaky.inject_faults(answer_503=1000, match=b"w.bin")
        proc = run_cli("warm", "s3://models/down")
    finally:
        flaky.stop()
    assert_clean_error(proc, 4, "s3://models/down")
    assert objects_in(cache_dir) == []


def test_progress_bar_on_a_terminal(tmp_path, cache_dir):
    """On a TTY, stderr shows a rich progress bar; piped (as in every other test) it stays quiet."""
    import pty

    src = tmp_path / "m"
    src.mkdir()
    (src / "w.bin").write_bytes(os.urandom(3 << 20))
    master, slave = pty.openpty()
    proc = subprocess.Popen([*PREFETCH, "warm", str(src)], stdout=subprocess.DEVNULL, stderr=slave, cwd=REPO,
                            env={**os.environ, "COLUMNS": "120"})
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(master)
    text = out.decode(errors="replace")
    assert proc.returncode == 0
    assert "warming" in text and "MiB" in text, text
