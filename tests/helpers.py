"""Small helpers shared by test modules (no fixtures here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def objects_in(cache: Path) -> list[str]:
    d = Path(cache) / "objects"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
