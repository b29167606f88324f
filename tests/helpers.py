"""Small helpers shared by test modules (no fixtures here)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
PREFETCH = [sys.executable, "-m", "prefetch.cli"]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real `prefetch` CLI in a subprocess with the current os.environ (plus env)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([*PREFETCH, *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"prefetch {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_json(*args: str, env: dict | None = None, timeout: float = 300) -> dict:
    proc = run_cli(*args, "--json", env=env, timeout=timeout, check=True)
    return json.loads(proc.stdout)


def assert_clean_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """One clear line naming what was wrong, the right exit code, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == code, f"exit {proc.returncode} != {code}\nstderr: {err}\nstdout: {proc.stdout}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def sha256_per_chunk(data: bytes, chunk: int) -> list[str]:
    """Each `chunk`-byte chunk's sha256 of these bytes, computed here with hashlib (what a manifest must record),
    not by the code under test."""
    return [hashlib.sha256(data[i:i + chunk]).hexdigest() for i in range(0, len(data), chunk)]


def objects_in(cache: Path) -> list[str]:
    d = Path(cache) / "objects"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


class Background:
    """A `with` block that runs self._run() in a daemon thread meanwhile, told to stop (self._stop) at the end."""

    join_timeout = 60.0

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(self.join_timeout)


class RequestLoop(Background):
    """A bounded loop of HTTP requests from a thread: every answer (or failure) recorded with its send time."""

    def __init__(self, url: str, body: dict, max_requests: int, pause: float):
        self.url, self.body, self.max_requests, self.pause = url, body, max_requests, pause
        self.results: list[tuple[float, int, str | None, str | None]] = []   # (sent_at, status, version, error)
        super().__init__()

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set() and len(self.results) < self.max_requests:
            sent = time.monotonic()
            try:
                r = session.post(self.url, json=self.body, timeout=30)
                doc = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                self.results.append((sent, r.status_code, doc.get("version"), None if r.ok else r.text[:200]))
            except Exception as e:
                self.results.append((sent, -1, None, repr(e)[:200]))
            time.sleep(self.pause)

    def failures(self) -> list:
        return [r for r in self.results if r[1] != 200]

    def versions(self, after: float | None = None, before: float | None = None) -> set:
        return {r[2] for r in self.results if (after is None or r[0] > after) and (before is None or r[0] < before)}
