"""The store keeps its promises under faults (issue H): bounded memory, a resume journal tied to what it
describes, ranged reads pinned to one version, origin-anchored checks, deadlines, temporary files outside the
artifact namespace. Real SeaweedFS behind the project's fault proxy (tests/harness/proxy.py); the warms run as
real `prefetch` processes where a kill, a signal or a peak RSS is what is tested."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import prefetch
from prefetch.store import sha256_file
from tests import harness
from tests.helpers import (PREFETCH, REPO, Background, assert_clean_error, sha256_per_chunk, cli_json, objects_in,
                           run_cli)

MiB = 1 << 20
# The last commit before this transfer: its behaviour is what the memory test compares against.
BASELINE_COMMIT = "a0c7105b17729aadcd3737619062a408f48b154a"


@pytest.fixture(autouse=True, params=["native", "boto3"])
def transport(request, monkeypatch, isolated_env):
    """Every test here runs through both S3 transports: native (obstore, the default) and boto3. The warms they
    start (processes included) inherit PREFETCH_TRANSPORT."""
    monkeypatch.setenv("PREFETCH_TRANSPORT", request.param)
    return request.param


@pytest.fixture
def proxy(s3):
    p = harness.LinkProxy("127.0.0.1", s3.s3_port).start()
    yield p
    p.clear_faults()
    p.stop()


def upload(s3, tmp_path: Path, key: str, size: int, seed: int) -> Path:
    blob = tmp_path / f"upload-{seed}-{size}"
    harness.write_random_file(blob, size, seed=seed)
    s3.client(endpoint=s3.direct_endpoint).upload_file(str(blob), "models", key)
    return blob


def staged_bytes(cache: Path) -> int:
    """Bytes really written into staging (sparse files count what they hold)."""
    total = 0
    for p in (cache / "staging").rglob("*") if (cache / "staging").exists() else []:
        if p.is_file():
            total += min(p.stat().st_size, p.stat().st_blocks * 512)
    return total


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def warm_process(uri: str, env: dict, pythonpath: Path = REPO, json_out: bool = False) -> subprocess.Popen:
    full = {**os.environ, **env, "PYTHONPATH": str(pythonpath)}
    return subprocess.Popen([*PREFETCH, "warm", uri, *(["--json"] if json_out else [])], env=full, cwd=pythonpath,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- A. bounded memory ---------------------------------------------------------------------------------------------
# The warming process reports its own peak RSS (VmHWM of its address space) at exit. Not wait4's ru_maxrss: Linux
# carries the parent's high-water mark across fork + exec into the child's, so a big pytest process would hide
# the child's own figure.
_PEAK_LAUNCHER = """
import atexit, os, runpy, sys


def _report():
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.environ["PEAK_RSS_FILE"], "w") as out:
        out.write(str(kib * 1024))


atexit.register(_report)
sys.argv = ["prefetch", *sys.argv[1:]]
runpy.run_module("prefetch.cli", run_name="__main__", alter_sys=True)
"""


def _baseline_tree(tmp_path: Path) -> Path:
    """The package as it was before this issue (git archive of BASELINE_COMMIT), to run the old behaviour."""
    out = tmp_path / "baseline"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BASELINE_COMMIT, "prefetch"], check=True,
                             capture_output=True).stdout
    archive_path = tmp_path / "baseline.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as t:
        t.extractall(out)
    return out


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_window_not_the_model(s3, proxy, cache_dir, tmp_path):
    """512 MiB single-file model, its FIRST range stalled until every other range has landed: the warming
    process's peak RSS stays under (max_concurrency + 2) x chunk_bytes above the runtime's own baseline; the
    previous transfer (ranges held in memory until hashed in order) goes far past it on the same run."""
    size, chunk, concurrency = 512 * MiB, 8 * MiB, 4
    upload(s3, tmp_path, "mem/weights.bin", size, seed=11)
    # The no-op baseline is a small multipart object (S3's smallest: a 5 MiB part and a tiny one, one stream): its
    # warm loads everything the big one's does (the part HEADs of a multipart ETag go through boto3 with either
    # transport), so what differs is the data window.
    client = s3.client(endpoint=s3.direct_endpoint)
    upload_id = client.create_multipart_upload(Bucket="models", Key="mem-noop/tiny.bin")["UploadId"]
    parts = [{"PartNumber": n, "ETag": client.upload_part(Bucket="models", Key="mem-noop/tiny.bin", PartNumber=n,
                                                          UploadId=upload_id, Body=body)["ETag"]}
             for n, body in ((1, b"x" * (5 * MiB)), (2, b"y" * 1000))]
    client.complete_multipart_upload(Bucket="models", Key="mem-noop/tiny.bin", UploadId=upload_id,
                                     MultipartUpload={"Parts": parts})
    env = {**s3.env(proxy.url), "PREFETCH_MAX_CONCURRENCY": str(concurrency), "PREFETCH_CHUNK_BYTES": str(chunk),
           "PREFETCH_MULTIPART_THRESHOLD": str(16 * MiB), "PREFETCH_READ_TIMEOUT": "300"}

    def peak(tree: Path, cache: Path, uri: str, stall: bool) -> int:
        cache.mkdir()
        peak_file = cache.parent / f"{cache.name}.peak"
        fault = proxy.add_fault("stall", b"mem/weights.bin", range_start=0, seconds=300) if stall else None
        proc = subprocess.Popen([sys.executable, "-c", _PEAK_LAUNCHER, "warm", uri], cwd=tree,
                                env={**os.environ, **env, "PREFETCH_CACHE_DIR": str(cache), "PYTHONPATH": str(tree),
                                     "PEAK_RSS_FILE": str(peak_file)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if fault is not None:
            # Release the first range only once every other range is on disk (or held in memory).
            wait_until(lambda: staged_bytes(cache) >= size - chunk, 600, "all ranges but the first")
            fault.release()
        _out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        return int(peak_file.read_text())

    baseline = peak(REPO, tmp_path / "c0", "s3://models/mem-noop", stall=False)
    bound = baseline + (concurrency + 2) * chunk
    new = peak(REPO, tmp_path / "c1", "s3://models/mem/weights.bin", stall=True)
    old = peak(_baseline_tree(tmp_path), tmp_path / "c2", "s3://models/mem/weights.bin", stall=True)
    print(f"\npeak RSS: no-op {baseline / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB, "
          f"this transfer {new / MiB:.0f} MiB, previous transfer {old / MiB:.0f} MiB")
    assert new < bound
    assert old > bound + 128 * MiB
    committed = next((tmp_path / "c1" / "objects").iterdir()) / "weights.bin"
    assert sha256_file(committed) == sha256_file(tmp_path / f"upload-11-{size}")


# -- B. a resume journal tied to what it describes -----------------------------------------------------------------
class PartialReader(Background):
    """Polls objects/ from a thread: any committed tree must be whole (manifest + every file at its size)."""

    join_timeout = 10.0

    def __init__(self, cache: Path):
        self.cache, self.seen, self.partial = cache, 0, []
        super().__init__()

    def _run(self) -> None:
        while not self._stop.is_set():
            objects = self.cache / "objects"
            for d in objects.iterdir() if objects.is_dir() else []:
                self.seen += 1
                try:
                    manifest = json.loads((d / ".prefetch.json").read_text())
                    bad = [f["path"] for f in manifest["files"] if (d / f["path"]).stat().st_size != f["size"]]
                except (OSError, ValueError) as e:
                    bad = [repr(e)]
                if bad:
                    self.partial.append((d.name, bad))
            time.sleep(0.01)


def _model(s3, tmp_path: Path, prefix: str, sizes: dict[str, int], seed: int) -> dict[str, str]:
    """Upload files under prefix; returns {path: sha256}."""
    out = {}
    for i, (path, size) in enumerate(sizes.items()):
        out[path] = sha256_file(upload(s3, tmp_path, f"{prefix}/{path}", size, seed=seed + i))
    return out


def _committed(result: dict) -> dict[str, str]:
    root = Path(result["path"])
    manifest = json.loads((root / ".prefetch.json").read_text())
    return {f["path"]: sha256_file(root / f["path"]) for f in manifest["files"]}


def test_sigkill_at_random_points_repeated_never_shows_a_partial_object(s3, cache_dir, tmp_path):
    sizes = {"weights.bin": 24 * MiB, "shard-1.bin": 6 * MiB, "shard-2.bin": 6 * MiB, "conf.json": 3000,
             "sub/tok.model": 500_000}
    expected = _model(s3, tmp_path, "crash", sizes, seed=20)
    slow = harness.LinkProxy("127.0.0.1", s3.s3_port, rate_bytes_per_s=6 * MiB).start()
    env = {**s3.env(slow.url), "PREFETCH_MAX_CONCURRENCY": "3", "PREFETCH_CHUNK_BYTES": str(1 * MiB),
           "PREFETCH_MULTIPART_THRESHOLD": str(4 * MiB)}
    rng = random.Random(7)
    try:
        with PartialReader(cache_dir) as reader:
            for round_ in range(5):
                proc = warm_process("s3://models/crash", env)
                time.sleep(rng.uniform(0.3, 2.5))
                proc.send_signal(signal.SIGKILL)
                proc.wait(60)
            slow.reset()
            result = cli_json("warm", "s3://models/crash", env=env)["results"][0]
            time.sleep(0.2)
    finally:
        slow.stop()
    assert reader.partial == [] and reader.seen > 0
    assert _committed(result) == expected
    manifest = json.loads((Path(result["path"]) / ".prefetch.json").read_text())
    weights = next(f for f in manifest["files"] if f["path"] == "weights.bin")
    blob = (tmp_path / f"upload-20-{24 * MiB}").read_bytes()
    # Per-chunk hashes in the manifest (peers verify chunks with them) are the hashes of the uploaded bytes.
    assert weights["chunks"] == {"size": MiB, "sha256": [hashlib.sha256(blob[i:i + MiB]).hexdigest()
                                                          for i in range(0, len(blob), MiB)]}
    assert not list((cache_dir / "staging").iterdir())


def _journaled_chunks(cache: Path) -> int:
    journals = (cache / "staging").glob("*/journal.jsonl")
    return sum(line.count('"i"') for j in journals for line in j.read_text().splitlines())


def _kill_midway(uri: str, env: dict, cache: Path, size: int, journaled: int = 0) -> None:
    """SIGKILL a warm once 30% of the bytes are staged (and at least `journaled` chunks are durable)."""
    proc = warm_process(uri, env)
    wait_until(lambda: (staged_bytes(cache) > size * 0.3 and _journaled_chunks(cache) >= journaled)
               or proc.poll() is not None, 120, "a partial download")
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "the warm finished before the kill: slow the link down"
    assert objects_in(cache) == []


@pytest.mark.parametrize("changed", ["PREFETCH_CHUNK_BYTES", "PREFETCH_MULTIPART_THRESHOLD"])
def test_resume_after_a_changed_layout_commits_the_right_bytes(changed, s3, cache_dir, tmp_path):
    size = 32 * MiB
    expected = _model(s3, tmp_path, f"layout-{changed}", {"w.bin": size}, seed=30)
    slow = harness.LinkProxy("127.0.0.1", s3.s3_port, rate_bytes_per_s=4 * MiB).start()
    env = {**s3.env(slow.url), "PREFETCH_MAX_CONCURRENCY": "2", "PREFETCH_CHUNK_BYTES": str(2 * MiB),
           "PREFETCH_MULTIPART_THRESHOLD": str(4 * MiB)}
    uri = f"s3://models/layout-{changed}"
    try:
        # Killed once 6 of the 16 chunks are durable, whatever the load: the durable ones are what a resume keeps.
        _kill_midway(uri, env, cache_dir, size, journaled=6)
        after = {**env, changed: str(3 * MiB) if changed == "PREFETCH_CHUNK_BYTES" else str(1 << 30)}
        slow.reset()
        result = cli_json("warm", uri, env=after)["results"][0]
        fetched = slow.stats()["bytes_out"]
    finally:
        slow.stop()
    assert _committed(result) == expected
    if changed == "PREFETCH_CHUNK_BYTES":
        assert fetched >= size        # another chunk grid: the file started over
    else:
        assert fetched < size * 0.8   # the threshold only groups chunks into GETs: durable chunks were kept


def test_a_staged_chunk_damaged_on_disk_is_not_trusted_on_resume(s3, cache_dir, tmp_path):
    """The journal vouches for a chunk's sha256, not just for its presence: a resumed chunk is hashed again, and a
    damaged one starts the file over (once)."""
    size = 32 * MiB
    expected = _model(s3, tmp_path, "damaged", {"w.bin": size}, seed=45)
    slow = harness.LinkProxy("127.0.0.1", s3.s3_port, rate_bytes_per_s=4 * MiB).start()
    env = {**s3.env(slow.url), "PREFETCH_MAX_CONCURRENCY": "2", "PREFETCH_CHUNK_BYTES": str(2 * MiB),
           "PREFETCH_MULTIPART_THRESHOLD": str(4 * MiB)}
    try:
        _kill_midway("s3://models/damaged", env, cache_dir, size)
        journal = next((cache_dir / "staging").glob("*/journal.jsonl"))
        recorded = [json.loads(line) for line in journal.read_text().splitlines()[1:] if '"i"' in line]
        assert recorded, "no chunk was journaled before the kill"
        with open(journal.parent / "data" / "w.bin", "r+b") as f:   # one byte of a journaled chunk
            f.seek(recorded[0]["i"] * 2 * MiB + 100)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        slow.reset()
        result = cli_json("warm", "s3://models/damaged", env=env)["results"][0]
        fetched = slow.stats()["bytes_out"]
    finally:
        slow.stop()
    assert _committed(result) == expected
    assert "w.bin" in result["note"]
    # Started over once, from scratch: chunks still in flight from before the restart neither count as done in
    # the new fetch nor write into its file (which would fail its check and cost yet another fetch).
    assert fetched < 1.5 * size, fetched


def test_a_resumed_file_checked_by_its_parts_keeps_its_durable_chunks(s3, cache_dir, tmp_path):
    """Parts = chunks, killed midway: the journal records sha256s only, so the resumed chunks' MD5s are taken again
    from disk; the resume keeps them and the ETag still matches (no start over from scratch)."""
    size, part = 40 * MiB, 5 * MiB
    blob = _upload_in_parts(s3, tmp_path, "parts-resume/w.bin", size, part, seed=47, checksums=False)
    slow = harness.LinkProxy("127.0.0.1", s3.s3_port, rate_bytes_per_s=4 * MiB).start()
    env = {**s3.env(slow.url), "PREFETCH_MAX_CONCURRENCY": "2", "PREFETCH_CHUNK_BYTES": str(part),
           "PREFETCH_MULTIPART_THRESHOLD": str(part)}
    try:
        _kill_midway("s3://models/parts-resume", env, cache_dir, size, journaled=3)
        slow.reset()
        result = cli_json("warm", "s3://models/parts-resume", env=env)["results"][0]
        fetched = slow.stats()["bytes_out"]
    finally:
        slow.stop()
    assert _committed(result) == {"w.bin": sha256_file(blob)}
    assert _manifest_files(result)["w.bin"]["origin_check"] == "md5"
    assert fetched < size * 0.8 and "w.bin" not in (result["note"] or ""), (fetched, result["note"])


def _registered(mlflow_direct, s3, use_env, name: str, size: int) -> tuple[str, str]:
    """A registry version (its key does not depend on the bytes) with one big file; (models:/ URI, its S3 key)."""
    use_env(mlflow_direct.env())
    rec = harness.register_large_model(mlflow_direct.env(), name, large_files=[("weights.bin", size)], n_small=2,
                                       seed=50)
    uri = f"models:/{name}/{rec['version']}"
    storage = prefetch.resolve(uri).storage_uri
    bucket_key = storage.split("://", 1)[1].split("/", 1)[1].rstrip("/") + "/artifacts/weights.bin"
    return uri, bucket_key


def test_object_changed_at_the_origin_between_attempts_is_not_committed_as_a_mix(mlflow_direct, s3, use_env,
                                                                                  cache_dir, tmp_path):
    size = 32 * MiB
    uri, key = _registered(mlflow_direct, s3, use_env, "between-attempts", size)
    slow = harness.LinkProxy("127.0.0.1", s3.s3_port, rate_bytes_per_s=4 * MiB).start()
    env = {"MLFLOW_S3_ENDPOINT_URL": slow.url, "AWS_ENDPOINT_URL_S3": slow.url, "PREFETCH_MAX_CONCURRENCY": "2",
           "PREFETCH_CHUNK_BYTES": str(2 * MiB), "PREFETCH_MULTIPART_THRESHOLD": str(4 * MiB)}
    try:
        _kill_midway(uri, env, cache_dir, size)
        new = sha256_file(upload(s3, tmp_path, key, size, seed=51))   # same size, other bytes, same version
        result = cli_json("warm", uri, env=env)["results"][0]
    finally:
        slow.stop()
    assert _committed(result)["artifacts/weights.bin"] == new


# -- C. ranged reads pinned to one version -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["s3-listing", "registry-version"])
def test_object_overwritten_mid_download_commits_the_new_bytes(kind, mlflow_direct, s3, use_env, proxy, cache_dir,
                                                               tmp_path):
    """The first range is held in the proxy, the object is overwritten behind it, then the range goes on: with
    If-Match it is answered 412 and the file restarts; without, the first 2 MiB would come from the new object
    and the rest from the old one (a torn file of the right size)."""
    size = 16 * MiB
    if kind == "s3-listing":
        key = "overwrite/w.bin"
        upload(s3, tmp_path, key, size, seed=60)
        uri, env = "s3://models/overwrite", s3.env(proxy.url)
    else:
        uri, key = _registered(mlflow_direct, s3, use_env, "overwritten-mid-download", size)
        env = {"MLFLOW_S3_ENDPOINT_URL": proxy.url, "AWS_ENDPOINT_URL_S3": proxy.url}
    env |= {"PREFETCH_MAX_CONCURRENCY": "4", "PREFETCH_CHUNK_BYTES": str(2 * MiB),
            "PREFETCH_MULTIPART_THRESHOLD": str(4 * MiB)}
    fault = proxy.add_fault("stall", key.encode(), range_start=0, seconds=120)
    proc = warm_process(uri, env, json_out=True)
    wait_until(fault.reached.is_set, 120, "the first range to reach the proxy")
    wait_until(lambda: staged_bytes(cache_dir) >= size - 2 * MiB, 120, "the other ranges")
    new = sha256_file(upload(s3, tmp_path, key, size, seed=61))
    fault.release()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    result = json.loads(out)["results"][0]
    committed = _committed(result)
    assert committed[key.rsplit("/", 1)[-1] if kind == "s3-listing" else "artifacts/weights.bin"] == new
    assert "fetched again" in result["note"] or "origin changed" in result["note"], result["note"]


# -- D. origin-anchored integrity ----------------------------------------------------------------------------------
def _manifest_files(result: dict) -> dict[str, dict]:
    manifest = json.loads((Path(result["path"]) / ".prefetch.json").read_text())
    return {f["path"]: f for f in manifest["files"]}


def test_a_byte_flipped_in_transit_is_never_committed(s3, proxy, cache_dir, tmp_path):
    import boto3.s3.transfer

    single = upload(s3, tmp_path, "flip/single.bin", 3 * MiB, seed=70)       # one PUT: ETag = MD5 of the bytes
    multi = tmp_path / "multi.bin"
    harness.write_random_file(multi, 20 * MiB, seed=71)
    # no stored checksum: the ETag's MD5 of 6 MiB parts (guessed 5 MiB with 4 MiB chunks, then asked) checks it
    s3.client(endpoint=s3.direct_endpoint, checksums=False).upload_file(
        str(multi), "models", "flip/multi.bin",
        Config=boto3.s3.transfer.TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=6 * MiB))
    env = {**s3.env(proxy.url), "PREFETCH_CHUNK_BYTES": str(4 * MiB), "PREFETCH_MULTIPART_THRESHOLD": str(8 * MiB)}
    # Once each: the file is fetched again and the second copy is right.
    proxy.add_fault("flip", b"flip/single.bin", after=12345)
    proxy.add_fault("flip", b"flip/multi.bin", range_start=8 * MiB, after=777)
    result = cli_json("warm", "s3://models/flip", env=env)["results"][0]
    assert proxy.stats()["faults_served"] == 2
    files = _manifest_files(result)
    assert _committed(result) == {"single.bin": sha256_file(single), "multi.bin": sha256_file(multi)}
    assert files["single.bin"]["origin_check"] == "md5"
    assert files["multi.bin"]["origin_check"] == "md5" and files["multi.bin"]["etag"].endswith("-4")
    assert "single.bin" in result["note"] and "multi.bin" in result["note"]

    # Every time: exit 5 after the retries, nothing committed, nothing left in staging.
    proxy.clear_faults()
    s3.client(endpoint=s3.direct_endpoint).put_object(Bucket="models", Key="flip-always/w.bin",
                                                      Body=os.urandom(MiB))
    proxy.add_fault("flip", b"flip-always/w.bin", after=10, count=1000)
    proc = run_cli("warm", "s3://models/flip-always", env={**env, "PREFETCH_MAX_ATTEMPTS": "3"})
    assert proc.returncode == 5, proc.stderr
    assert "w.bin" in proc.stderr and "checksum" in proc.stderr and "Traceback" not in proc.stderr
    assert objects_in(cache_dir) == [Path(result["path"]).name]
    assert not list((cache_dir / "staging").iterdir())


def test_a_byte_flipped_on_disk_in_a_big_file_is_found_by_its_chunk_and_repaired(s3, cache_dir, tmp_path):
    """A file of several chunks is recorded by its chunks' sha256s (no whole-file sha256: that second pass over the
    bytes is what the store contract no longer pays for). `verify` re-hashes the chunks: one byte flipped in place,
    the size unchanged, is found, named, and repaired from the origin."""
    blob = upload(s3, tmp_path, "ondisk/w.bin", 20 * MiB + 3, seed=90)
    small = upload(s3, tmp_path, "ondisk/conf.json", 1000, seed=91)
    env = {**s3.env(), "PREFETCH_CHUNK_BYTES": str(8 * MiB)}
    result = cli_json("warm", "s3://models/ondisk", env=env)["results"][0]
    files, data = _manifest_files(result), blob.read_bytes()
    assert "sha256" not in files["w.bin"]
    assert files["w.bin"]["chunks"] == {"size": 8 * MiB, "sha256": sha256_per_chunk(data, 8 * MiB)}
    assert files["conf.json"]["sha256"] == hashlib.sha256(small.read_bytes()).hexdigest()   # one chunk: free

    victim = Path(result["path"]) / "w.bin"
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as f:          # one bit of the second chunk, in place
        f.seek(12 * MiB + 5)
        byte = f.read(1)
        f.seek(12 * MiB + 5)
        f.write(bytes([byte[0] ^ 1]))
    assert victim.stat().st_size == len(data)
    proc = run_cli("verify", result["key"], "--no-repair", "--json", env=env)
    assert proc.returncode == 5, proc.stderr
    assert json.loads(proc.stdout)["objects"][0]["bad"] == ["w.bin"]
    fixed = cli_json("verify", result["key"], env=env)
    assert fixed["ok"] and fixed["objects"][0]["repaired"]
    assert victim.read_bytes() == data
    assert run_cli("verify", result["key"], "--no-repair", env=env).returncode == 0


def _upload_full_object_checksum(client, key: str, data: bytes, algorithm: str) -> None:
    """A multipart upload (5 MiB parts) whose stored checksum covers the whole object (ChecksumType=FULL_OBJECT).
    Each part carries its own checksum; the full-object value is left for the server to combine, so what the
    warm checks against is computed by SeaweedFS, not by the test."""
    import base64
    import zlib

    import google_crc32c

    crc = {"CRC32C": google_crc32c.value, "CRC32": zlib.crc32}[algorithm]
    upload = client.create_multipart_upload(Bucket="models", Key=key, ChecksumAlgorithm=algorithm,
                                            ChecksumType="FULL_OBJECT")
    parts = []
    for n, start in enumerate(range(0, len(data), 5 * MiB), start=1):
        body = data[start:start + 5 * MiB]
        value = base64.b64encode(crc(body).to_bytes(4, "big")).decode()
        answer = client.upload_part(Bucket="models", Key=key, UploadId=upload["UploadId"], PartNumber=n, Body=body,
                                    **{f"Checksum{algorithm}": value})
        parts.append({"PartNumber": n, "ETag": answer["ETag"], f"Checksum{algorithm}": value})
    done = client.complete_multipart_upload(Bucket="models", Key=key, UploadId=upload["UploadId"],
                                            MultipartUpload={"Parts": parts})
    assert done.get("ChecksumType") == "FULL_OBJECT", done


def test_a_stored_checksum_is_the_check_before_the_etag(s3, proxy, cache_dir, tmp_path):
    """The checksum an object was stored with (one HEAD, ChecksumMode=ENABLED) is checked instead of the ETag's
    MD5: FULL_OBJECT CRC32C and CRC32 uploads over their bytes, so a byte flipped in transit is fetched again, or
    ends in exit 5; a COMPOSITE CRC32 ("<crc>-N", of the parts' CRCs) over its parts, whose sizes (5 MiB, with
    4 MiB chunks) the guess gets wrong and one HEAD per part then gives."""
    import io

    import boto3.s3.transfer

    client = s3.client(endpoint=s3.direct_endpoint)
    blobs = {name: os.urandom(10 * MiB + 1000) for name in ("c.bin", "z.bin", "composite.bin")}
    _upload_full_object_checksum(client, "stored/c.bin", blobs["c.bin"], "CRC32C")
    _upload_full_object_checksum(client, "stored/z.bin", blobs["z.bin"], "CRC32")
    client.upload_fileobj(io.BytesIO(blobs["composite.bin"]), "models", "stored/composite.bin",
                          ExtraArgs={"ChecksumAlgorithm": "CRC32"},
                          Config=boto3.s3.transfer.TransferConfig(multipart_threshold=5 * MiB,
                                                                  multipart_chunksize=5 * MiB))
    env = {**s3.env(proxy.url), "PREFETCH_CHUNK_BYTES": str(4 * MiB), "PREFETCH_MULTIPART_THRESHOLD": str(8 * MiB)}
    proxy.add_fault("flip", b"stored/c.bin", range_start=4 * MiB, after=777)
    proxy.add_fault("flip", b"stored/z.bin", range_start=8 * MiB, after=4321)
    result = cli_json("warm", "s3://models/stored", env=env)["results"][0]
    assert proxy.stats()["faults_served"] == 2
    files = _manifest_files(result)
    assert {p: f["origin_check"] for p, f in files.items()} == {"c.bin": "crc32c", "z.bin": "crc32",
                                                                "composite.bin": "crc32"}
    assert all(f["etag"].endswith("-3") for f in files.values())
    root = Path(result["path"])
    assert [p for p, blob in blobs.items() if (root / p).read_bytes() != blob] == []
    assert "c.bin" in result["note"] and "z.bin" in result["note"] and "composite.bin" not in result["note"]

    # Every time: exit 5 after the retries, nothing committed, nothing left in staging.
    proxy.clear_faults()
    _upload_full_object_checksum(client, "stored-always/w.bin", os.urandom(10 * MiB + 1000), "CRC32C")
    proxy.add_fault("flip", b"stored-always/w.bin", after=10, count=1000)
    proc = run_cli("warm", "s3://models/stored-always", env={**env, "PREFETCH_MAX_ATTEMPTS": "3"})
    assert proc.returncode == 5, proc.stderr
    assert "w.bin" in proc.stderr and "crc32c" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert objects_in(cache_dir) == [root.name]
    assert not list((cache_dir / "staging").iterdir())


def _upload_in_parts(s3, tmp_path: Path, key: str, size: int, part: int, seed: int, checksums: bool = True) -> Path:
    """A multipart upload by boto3: with its default COMPOSITE CRC32, or (checksums=False) with the ETag only."""
    import boto3.s3.transfer

    blob = tmp_path / f"parts-{seed}"
    harness.write_random_file(blob, size, seed=seed)
    s3.client(endpoint=s3.direct_endpoint, checksums=checksums).upload_file(
        str(blob), "models", key,
        Config=boto3.s3.transfer.TransferConfig(multipart_threshold=part, multipart_chunksize=part))
    return blob


def test_parts_that_are_the_chunks_are_checked_apart_and_a_flip_is_caught(s3, proxy, use_env, cache_dir, tmp_path,
                                                                          monkeypatch):
    """A multipart object whose parts are the transfer's chunks: each part's CRC32 (boto3's COMPOSITE checksum) is
    taken beside the chunk's sha256 (Checker.add_part, once per part), and a byte flipped in one of them still
    fails the check: fetched again."""
    from prefetch.integrity import Checker
    from prefetch.store import Store

    size, part = 20 * MiB + 5, 5 * MiB
    blob = _upload_in_parts(s3, tmp_path, "apart/w.bin", size, part, seed=72)
    use_env({**s3.env(proxy.url), "PREFETCH_CHUNK_BYTES": str(part), "PREFETCH_MULTIPART_THRESHOLD": str(part)})
    proxy.add_fault("flip", b"apart/w.bin", range_start=2 * part, after=999)
    handed = []
    real_add = Checker.add_part
    monkeypatch.setattr(Checker, "add_part", lambda self, i, d: (handed.append(i), real_add(self, i, d)))
    w = prefetch.warm("s3://models/apart")
    assert proxy.stats()["faults_served"] == 1
    assert sha256_file(w.path / "w.bin") == sha256_file(blob)
    assert {f.path: f.origin_check for f in Store(cache_dir).lookup(w.key).files} == {"w.bin": "crc32"}
    assert sorted(set(handed)) == [0, 1, 2, 3, 4] and len(handed) == 10      # 5 parts, fetched twice
    assert "w.bin" in (w.resolved.note or "")


def test_resets_truncated_bodies_and_5xx_bursts_are_retried_from_where_they_stopped(s3, proxy, cache_dir, tmp_path):
    size = 12 * MiB
    blob = upload(s3, tmp_path, "bumpy/w.bin", size, seed=75)
    env = {**s3.env(proxy.url), "PREFETCH_CHUNK_BYTES": str(4 * MiB), "PREFETCH_MULTIPART_THRESHOLD": str(4 * MiB),
           "PREFETCH_MAX_CONCURRENCY": "2"}
    proxy.add_fault("reset", b"bumpy/w.bin", range_start=0, after=MiB)
    proxy.add_fault("truncate", b"bumpy/w.bin", range_start=4 * MiB, after=2 * MiB)
    proxy.add_fault("503", b"bumpy/w.bin", range_start=8 * MiB, count=3)
    result = cli_json("warm", "s3://models/bumpy", env=env)["results"][0]
    assert proxy.stats()["faults_served"] == 5
    assert _committed(result) == {"w.bin": sha256_file(blob)}
    assert proxy.stats()["bytes_out"] < size * 1.3      # resumed from the byte reached, not from the range start


# -- E. deadlines --------------------------------------------------------------------------------------------------
def test_trickle_and_stall_are_abandoned_and_retried(s3, proxy, cache_dir, tmp_path):
    blob = upload(s3, tmp_path, "slowpoke/w.bin", 2 * MiB, seed=80)
    env = {**s3.env(proxy.url), "PREFETCH_MIN_RATE": "64KiB", "PREFETCH_MIN_RATE_WINDOW": "1",
           "PREFETCH_READ_TIMEOUT": "1", "PREFETCH_MAX_ATTEMPTS": "3"}
    trickle = proxy.add_fault("trickle", b"slowpoke/w.bin", rate=4096)
    stall = proxy.add_fault("stall", b"slowpoke/w.bin", seconds=20)
    result = cli_json("warm", "s3://models/slowpoke", env=env, timeout=120)["results"][0]
    assert trickle.served == 1 and stall.served == 1
    assert _committed(result) == {"w.bin": sha256_file(blob)}
    # A link that only ever trickles: the retries run out, exit 4, no hang, nothing committed.
    proxy.add_fault("trickle", b"slowpoke2/w.bin", rate=4096, count=1000)
    upload(s3, tmp_path, "slowpoke2/w.bin", 2 * MiB, seed=81)
    proc = run_cli("warm", "s3://models/slowpoke2", env=env, timeout=120)
    assert proc.returncode == 4 and "KiB/s" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert objects_in(cache_dir) == [Path(result["path"]).name]


def test_lock_waiter_names_the_holder_and_gives_up_with_exit_4(s3, use_env, cache_dir, tmp_path):
    import socket

    from prefetch.store import Store

    upload(s3, tmp_path, "locked/w.bin", MiB, seed=90)
    use_env(s3.env())
    key = prefetch.resolve("s3://models/locked").key
    store = Store(cache_dir)
    staging = store.paths.new_staging(key)
    staging.mkdir(parents=True)
    (staging / ".inflight.json").write_text(json.dumps({"uri": "s3://models/locked", "key": key, "bytes": MiB,
                                                        "pid": os.getpid(), "host": socket.gethostname()}))
    with store.lock(key):
        proc = run_cli("warm", "s3://models/locked", env={"PREFETCH_LOCK_TIMEOUT": "2"}, timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in proc.stderr
    assert "PREFETCH_LOCK_TIMEOUT" in proc.stderr and "Traceback" not in proc.stderr
    assert objects_in(cache_dir) == []


def test_sigint_stops_promptly_and_keeps_the_staging_for_resume(s3, cache_dir, tmp_path):
    size = 32 * MiB
    blob = upload(s3, tmp_path, "interrupted/w.bin", size, seed=95)
    slow = harness.LinkProxy("127.0.0.1", s3.s3_port, rate_bytes_per_s=2 * MiB).start()
    env = {**s3.env(slow.url), "PREFETCH_MAX_CONCURRENCY": "4", "PREFETCH_CHUNK_BYTES": str(MiB),
           "PREFETCH_MULTIPART_THRESHOLD": str(4 * MiB)}
    try:
        proc = warm_process("s3://models/interrupted", env)
        wait_until(lambda: staged_bytes(cache_dir) > size * 0.3, 120, "a partial download")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)        # generous: the point is that it ends without waiting for the queued ranges
        assert proc.returncode == 130, proc.stderr.read()
        assert objects_in(cache_dir) == []
        assert list((cache_dir / "staging").glob("*/journal.jsonl"))
        slow.reset()
        result = cli_json("warm", "s3://models/interrupted", env=env)["results"][0]
        resumed = slow.stats()["bytes_out"]
    finally:
        slow.stop()
    assert _committed(result) == {"w.bin": sha256_file(blob)}
    assert resumed < size * 0.8, resumed


# -- F. temporary files outside the artifact namespace -------------------------------------------------------------
def test_names_that_used_to_clash_with_temporary_files_are_cached(s3, proxy, cache_dir):
    names = ["model.partition.pkl", "weights.part-00001.bin", "x", "x.part", "x.part.chunks", ".inflight.json",
             "journal.jsonl", "data/data", "sub/.inflight.json"]
    client = s3.client(endpoint=s3.direct_endpoint)
    bodies = {n: os.urandom(1000 + i) for i, n in enumerate(names)}
    for n, body in bodies.items():
        client.put_object(Bucket="models", Key=f"oddnames/{n}", Body=body)
    result = cli_json("warm", "s3://models/oddnames", env=s3.env(proxy.url))["results"][0]
    root = Path(result["path"])
    assert {n: (root / n).read_bytes() for n in names} == bodies
    assert run_cli("verify", result["key"]).returncode == 0


def _rewrite_listing(proxy, prefix: str, change) -> None:
    """From now on, rewrite every ListObjectsV2 answer for prefix: change(xml text) -> xml text (a server whose
    listing says so: a client that lists again, as the native transport does through boto3 when obstore cannot
    name a key, sees the same)."""
    proxy.clear_faults()
    proxy.add_fault("rewrite", b"list-type=2", rewrite=lambda body: change(body.decode()).encode(), count=1000)


def _contents(key: str, size: int) -> str:
    return (f"<Contents><Key>{key}</Key><LastModified>2026-12-01T00:00:00.000Z</LastModified><Size>{size}</Size>"
            f"<ETag>&#34;{'0' * 32}&#34;</ETag></Contents>")


def test_listing_keys_are_fetched_exactly_and_impossible_names_refused(s3, proxy, cache_dir):
    """Listings rewritten in the proxy (SeaweedFS normalises '//' and refuses './' and '..' in the keys it
    stores, so such listings are made on the wire): two keys that are one path here, a key with '//', a file and
    a dir of one name, a name longer than NAME_MAX."""
    client = s3.client(endpoint=s3.direct_endpoint)
    client.put_object(Bucket="models", Key="exact/sub/w.bin", Body=b"single slash")
    env = s3.env(proxy.url)

    def object_gets() -> list[str]:
        return [r[1] for r in proxy.request_log() if r[0] == "GET" and "list-type" not in r[1]]

    _rewrite_listing(proxy, "exact/", lambda xml: xml.replace("<Contents>", _contents("exact/sub/./w.bin", 12)
                                                               + "<Contents>", 1))
    proc = run_cli("warm", "s3://models/exact", env=env)
    assert proc.returncode == 5 and "exact/sub/./w.bin" in proc.stderr and "exact/sub/w.bin" in proc.stderr, \
        proc.stderr
    assert "Traceback" not in proc.stderr and object_gets() == []

    # One key with '//': that exact key is what is asked for, not the normalised exact/sub/w.bin.
    proxy.reset()
    _rewrite_listing(proxy, "exact/", lambda xml: xml.replace("exact/sub/w.bin", "exact/sub//w.bin"))
    run_cli("warm", "s3://models/exact", env=env)
    assert object_gets() and all(t == "/models/exact/sub//w.bin" for t in object_gets()), object_gets()

    client.put_object(Bucket="models", Key="clash/a/b.bin", Body=b"b")
    for extra, needle in [(_contents("clash/a", 1), "'a'"), (_contents("clash/" + "n" * 300, 1), "n" * 300)]:
        proxy.reset()
        _rewrite_listing(proxy, "clash/", lambda xml, extra=extra: xml.replace("<Contents>", extra + "<Contents>", 1))
        proc = run_cli("warm", "s3://models/clash", env=env)
        assert proc.returncode == 5 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert object_gets() == []
    assert not [k for k in objects_in(cache_dir) if "clash" in k]


# No case-insensitive filesystem can be made on the machines these tests run on (the kernel has no CONFIG_UNICODE,
# so ext4 and tmpfs refuse `casefold`; there is no vfat, no FUSE, no mkfs.xfs), so this CLI run replaces the store's
# probe (`case_insensitive`, a file looked up under another case) with one that answers True. Everything else is
# real: the listing from SeaweedFS, the CLI, its exit code and its line. The control below keeps the real probe.
_CASE_FOLDING = """
import runpy, sys
import prefetch.store.staging
prefetch.store.staging.case_insensitive = lambda directory: True
sys.argv = ["prefetch", *sys.argv[1:]]
runpy.run_module("prefetch.cli", run_name="__main__", alter_sys=True)
"""


def test_names_equal_but_for_case_are_refused_where_the_filesystem_folds_case(s3, proxy, cache_dir):
    from prefetch.store.staging import case_insensitive

    client = s3.client(endpoint=s3.direct_endpoint)
    bodies = {"sub/Model.pkl": b"upper case M" * 100, "sub/model.pkl": b"lower case m" * 90, "conf.json": b"{}"}
    for path, body in bodies.items():
        client.put_object(Bucket="models", Key=f"cased/{path}", Body=body)
    env = s3.env(proxy.url)
    proc = subprocess.run([sys.executable, "-c", _CASE_FOLDING, "warm", "s3://models/cased"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env}, cwd=REPO)
    assert_clean_error(proc, 5, "'sub/Model.pkl'", "'sub/model.pkl'", "case")
    assert [r for r in proxy.request_log() if r[0] == "GET" and "list-type" not in r[1]] == []   # before any byte
    assert objects_in(cache_dir) == [] and list((cache_dir / "staging").iterdir()) == []

    # Control, the real probe: this filesystem tells the two names apart, and both files are cached.
    assert not case_insensitive(cache_dir)
    result = cli_json("warm", "s3://models/cased", env=env)["results"][0]
    assert {p: (Path(result["path"]) / p).read_bytes() for p in bodies} == bodies
