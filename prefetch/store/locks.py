"""Waiting for another process's download of the same key: bounded, and saying who holds the lock.

A waiter polls the key's file lock once a second. The first time it finds the lock taken it prints one line on
stderr naming the holder (pid, host, bytes so far, from the holder's in-flight record in its staging dir); after
`lock_timeout` seconds it gives up with exit 4 and the same description, instead of waiting forever.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Iterator

from ..errors import Unreachable
from .paths import INFLIGHT
from .store import Store


class LockTimeout(Unreachable):
    """Another process kept the key's lock longer than PREFETCH_LOCK_TIMEOUT (exit 4)."""


def holder(store: Store, key: str) -> str:
    """'pid 123 on host h, 40.0 MiB of 512.0 MiB staged' from the key's in-flight record, or 'unknown'."""
    from ..config import human_bytes

    root = store.paths.staging_root()
    for staging in sorted(root.glob(f"{key}.*")) if root.is_dir() else []:
        try:
            doc = json.loads((staging / INFLIGHT).read_text())
        except (OSError, ValueError):
            continue
        staged = 0
        for dirpath, _d, files in os.walk(staging / "data"):
            for name in files:
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except OSError:
                    continue
                staged += min(st.st_size, st.st_blocks * 512)
        return (f"pid {doc.get('pid')} on host {doc.get('host', '?')}, {human_bytes(staged)} of "
                f"{human_bytes(doc.get('bytes'))} staged")
    return "a process with no in-flight record"


@contextlib.contextmanager
def key_lock(store: Store, key: str, timeout: float, uri: str | None = None) -> Iterator[None]:
    """Hold the key's lock; wait for it at most `timeout` seconds (negative: forever)."""
    from filelock import Timeout

    lock = store.lock(key)
    deadline = None if timeout < 0 else time.monotonic() + timeout
    told = False
    while True:
        try:
            wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
            lock.acquire(timeout=wait if told else 0)
            break
        except Timeout:
            if not told:
                sys.stderr.write(f"{uri or key}: waiting for another download of this model "
                                 f"({holder(store, key)})\n")
                sys.stderr.flush()
                told = True
            if deadline is not None and time.monotonic() >= deadline:
                raise LockTimeout(f"gave up waiting {timeout:.0f}s for the download lock held by "
                                  f"{holder(store, key)} (PREFETCH_LOCK_TIMEOUT)", uri) from None
    try:
        yield
    finally:
        lock.release()
