"""Parallel chunked copy from a Source into a staging dir (the shape of s3transfer: a config object holding
every knob, a manager that runs the work on a thread pool, progress sent to subscribers).

- Files at least `multipart_threshold` big are split into `chunk_bytes` ranges fetched in parallel; all
  files and ranges share one pool of `max_concurrency` workers (concurrency across files is what wins on
  a far link with many small files).
- A retryable failure (5xx, timeout, reset) is retried from the byte where it stopped, with exponential
  backoff and jitter, up to `max_attempts` per range.
- Resume after a crash: a file in flight is `<path>.part`; a ranged file also has `<path>.part.chunks`
  listing its finished ranges. A new run in the same staging dir skips what is already there.
- sha256 is computed while the bytes arrive: each file's hasher follows its contiguous finished prefix.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Sequence

from .config import Settings
from .errors import NoSpace, PrefetchError, Unreachable
from .sources.base import FileEntry, Source, TransientError

# Called from worker threads with a number of bytes now present, and whether they came from the origin just now
# (False: found on disk from an earlier, interrupted run).
ProgressCallback = Callable[[int, bool], None]


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    max_concurrency: int = 16
    chunk_bytes: int = 8 << 20
    multipart_threshold: int = 16 << 20
    max_attempts: int = 5
    backoff_base: float = 0.2
    backoff_max: float = 5.0

    @classmethod
    def from_settings(cls, s: Settings) -> "TransferConfig":
        return cls(max_concurrency=s.max_concurrency, chunk_bytes=s.chunk_bytes,
                   multipart_threshold=s.multipart_threshold, max_attempts=s.max_attempts)


class _FileState:
    """One file being assembled in `<path>.part`: which ranges are done, and the in-order hasher."""

    def __init__(self, entry: FileEntry, final: Path, ranges: list[tuple[int, int]]):
        self.entry = entry
        self.final = final
        self.part = final.with_name(final.name + ".part")
        self.chunks_log = final.with_name(final.name + ".part.chunks")
        self.ranges = ranges
        self.lock = threading.Lock()
        self.hasher = hashlib.sha256()
        self.cursor = 0           # ranges before this index are hashed
        self.done: set[int] = set()
        self.pending: dict[int, list[bytes]] = {}  # finished out of order, waiting to be hashed
        self.sha256: str | None = None

    def resumable_done(self) -> set[int]:
        """Ranges finished by an earlier, killed run (only trusted if the .part file is still there)."""
        if len(self.ranges) == 1 or not self.part.exists() or not self.chunks_log.exists():
            return set()
        return {int(x) for x in self.chunks_log.read_text().split() if x.isdigit() and int(x) < len(self.ranges)}

    def range_finished(self, index: int, blocks: list[bytes] | None = None) -> bool:
        """Record a finished range and hash whatever prefix is now contiguous; True when the file is complete.

        `blocks` are the range's bytes when the caller still holds them (hashed from memory); ranges finished
        by an earlier run, and single-stream files, are hashed from the .part file."""
        with self.lock:
            self.done.add(index)
            if blocks is not None:
                self.pending[index] = blocks
            if len(self.ranges) > 1:
                with open(self.chunks_log, "a") as log:
                    log.write(f"{index}\n")
            while self.cursor in self.done:
                held = self.pending.pop(self.cursor, None)
                if held is not None:
                    for block in held:
                        self.hasher.update(block)
                else:
                    self._hash_from_disk(*self.ranges[self.cursor])
                self.cursor += 1
            if len(self.done) < len(self.ranges):
                return False
            self.sha256 = self.hasher.hexdigest()
            # Flush now, on this worker, while other files are still arriving: the commit's fsync then
            # finds clean pages instead of flushing the whole artifact at the end.
            fd = os.open(self.part, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.part, self.final)
            if self.chunks_log.exists():
                self.chunks_log.unlink()
            return True

    def _hash_from_disk(self, start: int, end: int) -> None:
        with open(self.part, "rb") as f:
            f.seek(start)
            remaining = end - start
            while remaining:
                block = f.read(min(4 << 20, remaining))
                if not block:
                    break
                self.hasher.update(block)
                remaining -= len(block)


class TransferManager:
    def __init__(self, source: Source, config: TransferConfig, progress: Sequence[ProgressCallback] = ()):
        self.source = source
        self.config = config
        self.progress = list(progress)

    def _report(self, n: int, fetched: bool = True) -> None:
        for cb in self.progress:
            cb(n, fetched)

    def _ranges(self, size: int) -> list[tuple[int, int]]:
        c = self.config
        if size < c.multipart_threshold or not self.source.supports_ranges:
            return [(0, size)]
        return [(s, min(s + c.chunk_bytes, size)) for s in range(0, size, c.chunk_bytes)]

    def download(self, files: Sequence[FileEntry], dest: Path) -> list[FileEntry]:
        """Fetch every file into dest (resuming what an earlier run left there); returns entries with sha256."""
        states: list[_FileState] = []
        work: list[tuple[_FileState, int]] = []
        for entry in sorted(files, key=lambda f: -f.size):  # big files first; small ones fill the gaps
            final = dest / entry.path
            final.parent.mkdir(parents=True, exist_ok=True)
            state = _FileState(entry, final, self._ranges(entry.size))
            states.append(state)
            if final.exists() and final.stat().st_size == entry.size:
                state.sha256 = _sha256(final)     # finished by an earlier run
                self._report(entry.size, fetched=False)
                continue
            previously = state.resumable_done()
            if not previously and state.part.exists() and len(state.ranges) > 1:
                state.part.unlink()               # no record of which ranges are good: start over
            with open(state.part, "ab") as f:     # create, keep what is there
                if len(state.ranges) > 1:
                    f.truncate(entry.size)
            for i in range(len(state.ranges)):
                if i in previously:
                    self._report(state.ranges[i][1] - state.ranges[i][0], fetched=False)
                    if state.range_finished(i):
                        break
                else:
                    work.append((state, i))
        if work:
            self._run(work)
        return [dataclasses.replace(s.entry, sha256=s.sha256) for s in states]

    def _run(self, work: list[tuple[_FileState, int]]) -> None:
        cancelled = threading.Event()
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency, thread_name_prefix="prefetch-get") as pool:
            futures = [pool.submit(self._fetch_range, state, i, cancelled) for state, i in work]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in done if f.exception() is not None]
            if errors:
                cancelled.set()
                for f in pending:
                    f.cancel()
                wait(pending)
                raise errors[0]

    def _fetch_range(self, state: _FileState, index: int, cancelled: threading.Event) -> None:
        start, end = self.state_range(state, index)
        if start > state.ranges[index][0]:
            self._report(start - state.ranges[index][0], fetched=False)   # resumed from a .part on disk
        path = state.entry.path
        attempt = 0
        # Ranged files keep their range's bytes until hashed in order (bounded by the pool: ranges are
        # submitted in order); a single-stream file may be huge, so it is hashed from disk.
        blocks: list[bytes] | None = [] if len(state.ranges) > 1 else None
        fd = os.open(state.part, os.O_WRONLY)
        try:
            offset = start
            while True:
                if cancelled.is_set():
                    return
                try:
                    for block in self.source.read(path, offset, end):
                        if offset + len(block) > end:
                            raise PrefetchError(f"{path}: origin sent more bytes than its listing said ({state.entry.size})",
                                                self.source.uri)
                        _pwrite_all(fd, block, offset)
                        if blocks is not None:
                            blocks.append(block)
                        offset += len(block)
                        self._report(len(block))
                        if cancelled.is_set():
                            return
                    if offset != end:
                        raise TransientError(f"{path}: stream ended at byte {offset} of {end}", self.source.uri)
                    break
                except TransientError as e:
                    attempt += 1
                    if attempt >= self.config.max_attempts:
                        raise Unreachable(f"giving up on {path} after {attempt} attempts: {e}", self.source.uri) from None
                    delay = min(self.config.backoff_max, self.config.backoff_base * 2 ** (attempt - 1))
                    time.sleep(delay * (0.5 + random.random()))
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        raise NoSpace(f"disk full while writing {path}", self.source.uri) from None
                    raise
        finally:
            os.close(fd)
        state.range_finished(index, blocks)

    @staticmethod
    def state_range(state: _FileState, index: int) -> tuple[int, int]:
        start, end = state.ranges[index]
        if len(state.ranges) == 1 and state.part.exists():
            start = state.part.stat().st_size   # single-range file: resume from what is on disk (HF-style)
            if start > end:
                state.part.unlink()
                open(state.part, "wb").close()
                start = 0
        return start, end


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _sha256(path: Path) -> str:
    from .store import sha256_file

    return sha256_file(path)
