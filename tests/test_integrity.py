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
import tarfile
import threading
import time
from pathlib import Path

import pytest

import prefetch
from prefetch.store import sha256_file
from tests import harness
from tests.helpers import PREFETCH, REPO, cli_json, objects_in, run_cli

MiB = 1 << 20
# The last commit before this transfer: its behaviour is what the memory test compares against.
BASELINE_COMMIT = "a0c7105b17729aadcd3737619062a408f48b154a"


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


def wait_rusage(proc: subprocess.Popen, timeout: float) -> tuple[int, int]:
    """(exit code, peak RSS in bytes) of a child, from the kernel's own accounting (wait4 ru_maxrss, KiB)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss * 1024
        assert time.monotonic() < deadline, "warm did not finish"
        time.sleep(0.1)


# -- A. bounded memory ---------------------------------------------------------------------------------------------
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
    s3.client(endpoint=s3.direct_endpoint).put_object(Bucket="models", Key="mem-noop/tiny.bin", Body=b"x" * 1000)
    env = {**s3.env(proxy.url), "PREFETCH_MAX_CONCURRENCY": str(concurrency), "PREFETCH_CHUNK_BYTES": str(chunk),
           "PREFETCH_MULTIPART_THRESHOLD": str(16 * MiB), "PREFETCH_READ_TIMEOUT": "300"}

    def peak(tree: Path, cache: Path, uri: str, stall: bool) -> int:
        cache.mkdir()
        fault = proxy.add_fault("stall", b"mem/weights.bin", range_start=0, seconds=300) if stall else None
        proc = warm_process(uri, {**env, "PREFETCH_CACHE_DIR": str(cache)}, pythonpath=tree)
        if fault is not None:
            # Release the first range only once every other range is on disk (or held in memory).
            wait_until(lambda: staged_bytes(cache) >= size - chunk, 600, "all ranges but the first")
            fault.release()
        code, rss = wait_rusage(proc, 600)
        assert code == 0, proc.stderr.read()
        return rss

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
