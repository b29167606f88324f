"""Holder records that expire: leases (leases/<key>/...) and in-flight downloads (staging/<dir>/.inflight.json).

A record says who holds something: host, boot id, pid and the process's start time, plus a TTL. Its holder
renews it while it lives: a daemon thread of the holder's process touches the record's mtime every TTL/4
(the mtime is the heartbeat: one utime, never a torn JSON write). Liveness, wherever the record was written:

- heartbeat older than the TTL -> dead. This is what makes a lease written by a deleted pod (another hostname
  on a shared hostPath cache) or a frozen process expire; nothing else can be checked from another host;
- same host, other boot id -> dead (the machine rebooted: no process of that boot survives);
- same host and boot -> the pid must exist, not be a zombie, and have the recorded start time (pid reuse);
  pid <= 0 is never alive (`kill(0)` / `kill(-1)` would signal process groups, not a process).

TTL: `PREFETCH_LEASE_TTL` seconds (default 60). A record without a TTL (an older writer) gets the default.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

from ..config import DEFAULT_LEASE_TTL as DEFAULT_TTL, lease_ttl  # noqa: F401  (read where records are written)


def hostname() -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", socket.gethostname()) or "host"


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from /proc, or None where there is no such pid."""
    if pid <= 0:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()   # the command name may hold spaces and parentheses
    return fields[0], int(fields[19])


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True if pid is a live process on this host (and, given its recorded start time, the same process)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                     # exists, owned by someone else
    except OverflowError:
        return False
    stat = proc_stat(pid)
    if stat is None:
        return True                              # no /proc entry to read: the kill(0) answer is all we have
    state, started = stat
    if state in ("Z", "X"):                      # killed, not yet reaped by its parent: it holds nothing
        return False
    return start is None or started == start


def holder_fields(ttl: float | None = None) -> dict:
    """What a new record says about the process writing it."""
    pid = os.getpid()
    stat = proc_stat(pid)
    return {"host": hostname(), "boot_id": boot_id(), "pid": pid, "pid_start": stat[1] if stat else None,
            "ttl": lease_ttl() if ttl is None else ttl, "created_at": time.time()}


def record_alive(doc: dict, path: Path | str | None = None, now: float | None = None) -> bool:
    """Is the holder of this record (a lease, an in-flight download) alive? See the module docstring."""
    now = time.time() if now is None else now
    try:
        ttl = float(doc.get("ttl") or lease_ttl())
    except (TypeError, ValueError):
        ttl = DEFAULT_TTL
    beat = doc.get("heartbeat_at") or doc.get("created_at")
    if path is not None:
        try:
            beat = os.stat(path).st_mtime    # the heartbeat: renewed by the holder's thread
        except OSError:
            return False                     # released (or removed) while we looked
    if not isinstance(beat, (int, float)) or now - beat > ttl:
        return False
    if doc.get("host") != hostname():
        return True                          # fresh heartbeat from another host: nothing more to check
    if doc.get("boot_id") and boot_id() and doc["boot_id"] != boot_id():
        return False
    try:
        pid = int(doc.get("pid", -1))
    except (TypeError, ValueError):
        return False
    start = doc.get("pid_start")
    return pid_alive(pid, int(start) if isinstance(start, int) else None)


class _Heartbeat:
    """One daemon thread per process touching every record this process holds, every min(TTL)/4 seconds."""

    def __init__(self) -> None:
        self._paths: dict[str, float] = {}   # path -> ttl
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def add(self, path: Path | str, ttl: float) -> None:
        with self._lock:
            if self._pid != os.getpid():         # forked: the parent's thread and records are not ours
                self._paths, self._thread, self._pid = {}, None, os.getpid()
            self._paths[str(path)] = ttl
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="prefetch-heartbeat", daemon=True)
                self._thread.start()
        self._wake.set()

    def remove(self, path: Path | str) -> None:
        with self._lock:
            self._paths.pop(str(path), None)

    def _run(self) -> None:
        while True:
            with self._lock:
                paths = dict(self._paths)
            if not paths:
                interval = 5.0
            else:
                interval = max(0.05, min(paths.values()) / 4)
                for p in paths:
                    try:
                        os.utime(p)
                    except FileNotFoundError:
                        self.remove(p)           # released or removed by gc: nothing to renew
                    except OSError:
                        pass
            self._wake.wait(interval)
            self._wake.clear()


_heartbeat = _Heartbeat()


def keep_alive(path: Path | str, ttl: float | None = None) -> None:
    """Renew the record at path from this process until release(path) (or the process ends)."""
    _heartbeat.add(path, lease_ttl() if ttl is None else ttl)


def release(path: Path | str) -> None:
    """Stop renewing path (the caller removes the file)."""
    _heartbeat.remove(path)
