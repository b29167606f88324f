"""Start server processes in their own process group and make sure none outlives the harness.

Every process started here is:
- in a new session (its own process group), so stop() kills the whole tree (mlflow's uvicorn
  workers, etc.) with one killpg;
- registered for an atexit sweep, so an exception, a failed test or Ctrl-C still stops it;
- when started from the main thread, given PR_SET_PDEATHSIG=SIGTERM, so even a SIGKILL of the
  Python process does not leave it running. (PDEATHSIG fires when the *thread* that forked exits,
  which is why it is only set for the main thread.)
"""
from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Mapping, Sequence

_live: "set[ManagedProcess]" = set()  # strong refs: a dropped handle must still be swept
_live_lock = threading.Lock()

_PR_SET_PDEATHSIG = 1


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


class ManagedProcess:
    """A child process with its own process group, its output in a log file."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: str | os.PathLike,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        name: str | None = None,
    ):
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = str(cwd) if cwd is not None else None
        self.name = name or Path(self.argv[0]).name
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab", buffering=0)
        in_main = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_set_pdeathsig if in_main else None,
        )
        with _live_lock:
            _live.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, n_lines: int = 60) -> str:
        try:
            data = self.log_path.read_bytes()[-64 * 1024 :]
        except OSError:
            return "(no log)"
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-n_lines:])

    def _killpg(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # pgid == pid: start_new_session=True
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(self) -> None:
        """SIGTERM the group without waiting (stop() afterwards waits and sweeps)."""
        if self.proc is not None and self.proc.poll() is None:
            self._killpg(signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the whole group, wait, then SIGKILL the group (stragglers included)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._killpg(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # Kill anything left in the group even if the leader exited (e.g. orphaned workers).
        self._killpg(signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if self._log is not None:
            try:
                self._log.close()
            except OSError:
                pass
            self._log = None
        with _live_lock:
            _live.discard(self)


def stop_all() -> None:
    with _live_lock:
        procs = list(_live)
    for p in procs:
        try:
            p.stop(timeout=5)
        except Exception:
            pass


atexit.register(stop_all)
