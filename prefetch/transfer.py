"""Parallel chunked copy from a Source into a staging dir (the shape of s3transfer: a config object holding
every knob, a manager that runs the work on a pool of workers, progress sent to subscribers).

- Every file is cut into a grid of `chunk_bytes` chunks. Files at least `multipart_threshold` big get one GET per
  chunk, fetched in parallel; smaller files are one GET streaming through their chunks. All files and chunks share
  one pool of `max_concurrency` workers (concurrency across files is what wins on a far link with many files).
- Bounded memory: a worker writes each block to its offset (pwrite) as it arrives, from the buffer the source
  returned (a memoryview of it, never a copy), and hashes it into its chunk's sha256; nothing waits in memory for
  an earlier range. The chunk sha256s are the file's record (the manifest's, what peers and resumes check): a
  file of several chunks gets no second, whole-file sha256 pass, which would cost as much CPU as the first.
- The origin's check (prefetch/integrity.py) is over parts or over the whole file. Over parts (a multipart ETag,
  a COMPOSITE checksum) whose parts are the chunks, each part's MD5 or CRC is taken by the worker beside the
  chunk's sha256 (in parallel, in any order), and nothing is read back. Over the whole file (a single-part MD5
  ETag, a FULL_OBJECT checksum, parts that are not the chunks) the bytes go through it in file order, in one
  pass: the worker whose span starts where a file's in-order pass stands (a small file's one stream, a big file's
  first chunk) feeds it from the blocks it holds; the chunks other workers wrote are read back from the page
  cache, one 4 MiB block at a time, into one reused buffer. So at any moment this process holds at most
  `max_concurrency` read blocks (<= 1 MiB each) plus one hashing block: below `(max_concurrency + 2) x
  chunk_bytes` whatever the completion order or the model size (s3transfer bounds the same thing with its
  SlidingWindowSemaphore).
- The origin's facts about each file (what its bytes are checked against: an ETag, a stored checksum) are asked
  once, before the first GET, all files at once; a multipart upload's part sizes are guessed (integrity.py), and
  asked (one HEAD per part) only when a check over the guess fails: then the file on disk is checked again with
  the real sizes, and fetched again only if that fails too.
- Durable progress: a chunk is recorded done in the journal (prefetch/store/journal.py) only after its bytes are
  fdatasynced (group-committed every FLUSH_EVERY seconds by one thread, so workers never wait on the disk); a
  resume skips recorded chunks and re-hashes them from disk against their recorded sha256.
- A retryable failure (5xx, timeout, reset, a connection slower than `min_rate` over `min_rate_window`) is
  retried from the byte where it stopped, with exponential backoff and jitter, up to `max_attempts` per range.
- A file whose bytes fail the origin's check is fetched again from scratch, into a new file (ranges of the last
  fetch still in flight write into the replaced one and are not counted), up to `max_attempts` times, then exit
  5; an object that changed at the origin mid-download (HTTP 412 on If-Match) stops the transfer with
  OriginChanged, and the caller lists again and resumes (the journal drops the changed files).
- Cancellation (^C, an error elsewhere): workers are daemon threads that stop at their next block; queued ranges
  are never started, and the staging dir with its journal stays for a resume.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import queue
import random
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from .config import Settings
from .errors import IntegrityError, NoSpace, PrefetchError, Unreachable
from .integrity import Checker, OriginChanged, OriginFacts, with_guessed_parts
from .store.journal import Journal, layout_of
from .sources.base import FileEntry, Source, TransientError
from .store.staging import data_dir, refuse_impossible_names

# Called from worker threads with a number of bytes now present, and whether they came from the origin just now
# (False: found on disk from an earlier, interrupted run).
ProgressCallback = Callable[[int, bool], None]
HASH_BLOCK = 4 << 20
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
FLUSH_EVERY = 0.5     # seconds between group commits of the journal


def _no_follow(path: str, flags: int) -> int:
    """open() that never writes through a symlink planted in the staging tree (the store never follows links)."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    max_concurrency: int = 16
    chunk_bytes: int = 8 << 20
    multipart_threshold: int = 16 << 20
    max_attempts: int = 5
    backoff_base: float = 0.2
    backoff_max: float = 5.0
    min_rate: float = 64 << 10          # bytes/s a connection must sustain over min_rate_window
    min_rate_window: float = 30.0

    @classmethod
    def from_settings(cls, s: Settings) -> "TransferConfig":
        return cls(max_concurrency=s.max_concurrency, chunk_bytes=s.chunk_bytes,
                   multipart_threshold=s.multipart_threshold, max_attempts=s.max_attempts,
                   min_rate=s.min_rate, min_rate_window=s.min_rate_window)

    def memory_bound(self) -> int:
        """Most bytes of file data this transfer holds in memory at once (the documented bound)."""
        return (self.max_concurrency + 2) * self.chunk_bytes


class _File:
    """One file being assembled in data/<path>: its chunk grid, the durable chunks, the in-order hasher."""

    def __init__(self, entry: FileEntry, path: Path, chunk_bytes: int, facts: OriginFacts):
        self.entry = entry
        self.path = path
        self.chunk_bytes = chunk_bytes
        self.n = -(-entry.size // chunk_bytes) if entry.size else 0
        self.facts = facts
        self.lock = threading.Lock()
        self.attempts = 0
        self.generation = 0               # one per fetch of the file: a restart makes the workers' earlier spans stale
        self.reset({})

    def reset(self, done: dict[int, str]) -> None:
        self.generation += 1
        self.done = dict(done)            # chunk index -> sha256, written (the journal makes it durable)
        self.resumed = set(done)          # done by an earlier run: re-hashed from disk and compared
        self.hashed = 0                   # chunks before this index have been through the in-order check
        self.hashing = False              # one thread at a time feeds the in-order check
        self.checker = Checker(self.facts, self.entry.size)
        # A check over parts (a multipart ETag, a COMPOSITE checksum) whose parts are exactly this file's chunks
        # (8 MiB parts, 8 MiB chunks: the common case): each part's MD5 or CRC is taken by the worker that has its
        # bytes, in parallel, not in the in-order pass.
        sizes = self.checker.part_sizes
        self.parts_apart = bool(sizes) and len(sizes) == self.n and all(
            size == self.bounds(i)[1] - self.bounds(i)[0] for i, size in enumerate(sizes))
        if self.parts_apart:
            self.checker.take_parts_apart()
        self.finished = False             # every chunk in, and the origin check passed

    def whole_file(self, data) -> None:
        """Feed the next bytes in file order to the in-order check."""
        self.checker.update(data)

    @property
    def needs_bytes(self) -> bool:
        """Whether the in-order pass needs the bytes at all: only for an origin check over the whole file's bytes
        (not over parts the workers hashed, not for a file with no check)."""
        return self.checker.in_order

    def file_sha256(self) -> str | None:
        """The whole file's sha256 where no extra pass is needed: a one-chunk file's is its chunk's, an origin
        sha256 check computed it. A file of several chunks is otherwise identified by its chunks' sha256s alone:
        a second sha256 over the same bytes would cost as much CPU as the first (DESIGN.md, store contract)."""
        if self.n == 0:
            return EMPTY_SHA256
        return self.checker.sha256_hex() or (self.done[0] if self.n == 1 else None)

    def bounds(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_bytes
        return start, min(start + self.chunk_bytes, self.entry.size)


class TransferManager:
    def __init__(self, source: Source, config: TransferConfig, progress: Sequence[ProgressCallback] = ()):
        self.source = source
        self.config = config
        self.progress = list(progress)
        self.restarted: list[str] = []    # files fetched again (origin check failed, or changed at the origin)
        # A source that routes each chunk on its own (prefetch/cluster/peers.py: a peer, or the origin) gets one
        # read per chunk, in random order (nodes warming one key together start on different chunks), and hears
        # of every chunk written (`chunk_done`) and every file started over (`file_restarted`).
        self.per_chunk = bool(getattr(source, "per_chunk", False))

    def _hook(self, name: str, *args) -> None:
        hook = getattr(self.source, name, None)
        if hook is not None:
            hook(*args)

    def _report(self, n: int, fetched: bool = True) -> None:
        for cb in self.progress:
            cb(n, fetched)

    def download(self, files: Sequence[FileEntry], staging: Path) -> list[FileEntry]:
        """Fetch every file into staging/data (resuming what the journal vouches for); returns entries with
        sha256, per-chunk sha256s and the origin check that was made."""
        c = self.config
        data = data_dir(staging)
        refuse_impossible_names([f.path for f in files], data, self.source.uri)
        facts = self._all_facts(files)
        layouts = {f.path: layout_of(f.size, facts[f.path].etag, facts[f.path].version_id, c.chunk_bytes)
                   for f in files}
        journal = Journal(staging, data, layouts, c.chunk_bytes, c.multipart_threshold)
        self.restarted += journal.restarted
        states = []
        for entry in sorted(files, key=lambda f: -f.size):   # big files first; small ones fill the gaps
            state = _File(entry, data / entry.path, c.chunk_bytes, facts[entry.path])
            state.reset({i: s for i, s in journal.done(entry.path).items() if i < state.n})
            states.append(state)
        try:
            _Run(self, journal).run(states, self._put_in_place)
        finally:
            journal.close()
        return [dataclasses.replace(s.entry, sha256=s.file_sha256(), origin_check=s.checker.check,
                                    version_id=s.facts.version_id,
                                    chunks={"size": c.chunk_bytes, "sha256": [s.done[i] for i in range(s.n)]})
                for s in states]

    def _put_in_place(self, state: _File) -> None:
        """Create the file at its full size, keeping what the journal vouches for, and count its durable chunks."""
        state.path.parent.mkdir(parents=True, exist_ok=True)
        with open(state.path, "ab", opener=_no_follow) as f:
            if f.tell() != state.entry.size:
                f.truncate(state.entry.size)
        for i in state.done:
            self._report(state.bounds(i)[1] - state.bounds(i)[0], fetched=False)

    def _all_facts(self, files: Sequence[FileEntry]) -> dict[str, OriginFacts]:
        """The origin's facts for every file, asked all together (a file may need one HEAD: in parallel, not one by
        one); a multipart upload's part sizes guessed from the chunk grid (integrity.guess_part_sizes)."""
        origin_facts = getattr(self.source, "origin_facts", None)
        if origin_facts is None:
            return {f.path: OriginFacts() for f in files}
        learn = getattr(self.source, "part_sizes", None)

        def facts_of(entry: FileEntry) -> OriginFacts:
            facts = with_guessed_parts(origin_facts(entry), entry.size, self.config.chunk_bytes)
            parts = facts.multipart_parts
            if parts and facts.part_sizes is None and learn is not None:
                # No common part size gives this many parts: each part's size is asked (one HEAD per part).
                facts = dataclasses.replace(facts, part_sizes=learn(entry, parts))
            return facts

        if len(files) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(len(files), 8), thread_name_prefix="prefetch-facts") as pool:
                return dict(zip((f.path for f in files), pool.map(facts_of, files)))
        return {f.path: facts_of(f) for f in files}

    def tasks_for(self, state: _File) -> list[tuple[int, int]]:
        """Chunk spans [lo, hi) to fetch, one GET each: one per chunk for a big file, one stream for a small one."""
        missing = [i for i in range(state.n) if i not in state.done]
        if not missing:
            return []
        if self.per_chunk or (state.entry.size >= self.config.multipart_threshold and self.source.supports_ranges):
            return [(i, i + 1) for i in missing]
        return [(missing[0], state.n)] if self.source.supports_ranges else [(0, state.n)]


class _Run:
    """One download's workers: daemon threads pulling chunk spans off a queue; the first error stops them all."""

    def __init__(self, manager: TransferManager, journal: Journal):
        self.m = manager
        self.config = manager.config
        self.journal = journal
        self.queue: queue.Queue = _ShuffledQueue() if manager.per_chunk else queue.Queue()
        self.cancelled = threading.Event()
        self.changed = threading.Condition()
        self.error: BaseException | None = None
        self.threads: list[threading.Thread] = []

    def enqueue_file(self, state: _File) -> None:
        tasks = self.m.tasks_for(state)
        if not tasks:
            self._advance(state)      # everything was on disk: hash it (and check it) now
            return
        for lo, hi in tasks:
            self.queue.put((state, lo, hi))

    def _flusher(self) -> None:
        while not self.cancelled.wait(FLUSH_EVERY):
            self.journal.flush()

    def _start_workers(self, spans: int) -> None:
        t = threading.Thread(target=self._flusher, name="prefetch-journal", daemon=True)
        self.threads.append(t)
        t.start()
        for _ in range(max(1, min(self.config.max_concurrency, spans))):
            t = threading.Thread(target=self._worker, name="prefetch-get", daemon=True)
            self.threads.append(t)
            t.start()

    def run(self, states: list[_File], put_in_place: Callable[[_File], None]) -> None:
        """Start the workers, then put each file in place and queue its spans (the workers are on the first, big
        files while the small ones are still being created: hundreds of creates are not a serial prelude), then
        wait until every file is hashed and checked, or the first error. Never blocks ^C for long: the wait
        wakes every 0.2 s, and on the way out queued spans are dropped and workers stop at their next block."""
        self._start_workers(sum(len(self.m.tasks_for(s)) for s in states))
        try:
            for state in states:
                if self.cancelled.is_set():
                    break             # a worker failed: its error is raised below
                put_in_place(state)
                self.enqueue_file(state)
            with self.changed:
                while self.error is None and not all(s.finished for s in states):
                    self.changed.wait(0.2)
            if self.error is not None:
                raise self.error
        except BaseException as e:
            self.cancelled.set()
            self._drain()
            if not isinstance(e, KeyboardInterrupt):
                # Let workers reach their next block. One stuck in a read past this only writes bytes of an
                # unchanged object to their own offsets, or into the unlinked inode of a file that starts over.
                deadline = time.monotonic() + 5
                for t in self.threads:
                    t.join(max(0.0, deadline - time.monotonic()))
            raise
        finally:
            self.cancelled.set()      # the workers idle on the queue; this lets them go
            self.journal.flush()      # what is written now is what a resume starts from

    def _drain(self) -> None:
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                return

    def _fail(self, error: BaseException) -> None:
        with self.changed:
            if self.error is None:
                self.error = error
            self.cancelled.set()
            self.changed.notify_all()

    def _worker(self) -> None:
        # Workers stay until the run ends: a file fetched again after a failed origin check re-queues its chunks.
        while not self.cancelled.is_set():
            try:
                state, lo, hi = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._fetch_span(state, lo, hi)
            except BaseException as e:   # noqa: BLE001 - handed to the waiting thread
                self._fail(e)
                return

    # -- one GET ---------------------------------------------------------------------------------------
    def _fetch_span(self, state: _File, lo: int, hi: int) -> None:
        while lo < hi and lo in state.done:
            lo += 1
        if lo >= hi:
            return
        # A span that starts where the file's in-order hashing stands (a small file's one stream, a big file's
        # first chunk) feeds the in-order check from the blocks it holds: those bytes are never read back.
        with state.lock:
            generation = state.generation
            feeding = state.needs_bytes and not state.hashing and state.hashed == lo
            if feeding:
                state.hashing = True
        fd = os.open(state.path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            finished = self._stream_span(state, lo, hi, fd, feeding, generation)
        finally:
            os.close(fd)
            if feeding:
                with state.lock:
                    state.hashing = False
        if feeding and finished:
            self._advance(state)      # finish the file, or go on with chunks other workers wrote meanwhile

    def _stream_span(self, state: _File, lo: int, hi: int, fd: int, feeding: bool, generation: int) -> bool:
        """GET chunks [lo, hi) into fd, retrying from the byte reached; False when cancelled, or when the file was
        started over meanwhile (its chunks are queued again; this span's bytes went to the replaced file)."""
        c = self.config
        path = state.entry.path
        start, end = state.bounds(lo)[0], state.bounds(hi - 1)[1]
        offset, chunk = start, lo
        chunk_end = state.bounds(chunk)[1]
        hasher = hashlib.sha256()
        part = state.checker.part_hasher() if state.parts_apart else None
        attempt = 0
        while True:
            if self.cancelled.is_set():
                return False
            # The rate window opens at the first byte: time to it is read_timeout's (the socket's), and a
            # source that routes chunks (peers) may wait for another node's fetch before its first byte.
            window_start, window_bytes = None, 0
            try:
                for block in self.m.source.read(path, offset, end):
                    if offset + len(block) > end:
                        raise PrefetchError(f"{path}: origin sent more bytes than its listing said "
                                            f"({state.entry.size})", self.m.source.uri)
                    view = memoryview(block)
                    while view:
                        piece = view[:chunk_end - offset]
                        _pwrite_all(fd, piece, offset)
                        hasher.update(piece)
                        if part is not None:
                            part.update(piece)
                        if feeding:
                            state.whole_file(piece)
                        offset += len(piece)
                        view = view[len(piece):]
                        if offset == chunk_end:
                            sha = hasher.hexdigest()
                            if state.generation != generation:
                                return False     # the file started over: these bytes went to the replaced file
                            if part is not None:
                                state.checker.add_part(chunk, part.digest())
                                part = state.checker.part_hasher()
                            # Journaled (by the flusher, once durable) only for files of several chunks: a
                            # one-chunk file lost in a crash costs one small GET; the commit fsyncs it.
                            if state.n > 1:
                                self.journal.add(path, chunk, sha)
                            if feeding:
                                self._chunk_hashed(state, chunk, sha)
                            elif not self._chunk_done(state, chunk, sha, generation):
                                return False
                            chunk += 1
                            chunk_end = state.bounds(chunk)[1] if chunk < state.n else end
                            hasher = hashlib.sha256()
                    self.m._report(len(block))
                    if self.cancelled.is_set():
                        return False
                    if window_start is None:
                        window_start = time.monotonic()
                    else:
                        window_bytes += len(block)
                    elapsed = time.monotonic() - window_start
                    if offset < end and elapsed >= c.min_rate_window:   # all here: never "too slow"
                        if window_bytes / elapsed < c.min_rate:
                            raise TransientError(f"{path}: {window_bytes / elapsed / 1024:.1f} KiB/s over "
                                                 f"{elapsed:.0f}s, under the floor of {c.min_rate / 1024:.0f} "
                                                 f"KiB/s", self.m.source.uri)
                        window_start, window_bytes = time.monotonic(), 0
                if offset != end:
                    raise TransientError(f"{path}: stream ended at byte {offset} of {end}", self.m.source.uri)
                return True
            except TransientError as e:
                attempt += 1
                if attempt >= c.max_attempts:
                    raise Unreachable(f"giving up on {path} after {attempt} attempts: {e}",
                                      self.m.source.uri) from None
                delay = min(c.backoff_max, c.backoff_base * 2 ** (attempt - 1))
                if self.cancelled.wait(delay * (0.5 + random.random())):
                    return False
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise NoSpace(f"disk full while writing {path}", self.m.source.uri) from None
                raise

    # -- in-order hashing ------------------------------------------------------------------------------
    def _chunk_done(self, state: _File, index: int, sha: str, generation: int) -> bool:
        """A chunk written by a worker that does not feed the in-order check; False (and not recorded) when the
        file was started over since the worker's span began."""
        with state.lock:
            if state.generation != generation:
                return False
            state.done[index] = sha
        self.m._hook("chunk_done", state.entry, index, sha)
        self._advance(state)
        return True

    def _chunk_hashed(self, state: _File, index: int, sha: str) -> None:
        """A chunk written by the worker that fed it to the in-order check: done, and already checked."""
        with state.lock:
            state.done[index] = sha
            state.hashed = index + 1
        self.m._hook("chunk_done", state.entry, index, sha)

    def _advance(self, state: _File) -> None:
        """Hash the contiguous durable prefix from disk (one thread at a time per file); finish the file when the
        last chunk is in: compare with the origin's check, or fetch the file again."""
        with state.lock:
            if state.hashing:
                return
            state.hashing = True
        try:
            while True:
                with state.lock:
                    if state.hashed not in state.done:
                        if state.hashed < state.n:
                            state.hashing = False
                            return
                        break
                    index = state.hashed
                if not self._hash_chunk(state, index):
                    self._restart(state, f"chunk {index} on disk differs from its journal record")
                    return
                with state.lock:
                    state.hashed += 1
            self._finish(state)
        finally:
            with state.lock:
                state.hashing = False
        # A chunk that landed while we were finishing would have found `hashing` set and left it to us.
        with state.lock:
            more = not state.finished and state.hashed in state.done
        if more:
            self._advance(state)

    def _hash_chunk(self, state: _File, index: int) -> bool:
        """Read one written chunk back (from the page cache) into the in-order check; a chunk of an earlier
        run is also hashed on its own and compared with its journal record."""
        again = hashlib.sha256() if index in state.resumed else None
        if again is None and not state.needs_bytes:
            return True               # nothing to check in order: the chunk's sha256 was taken as it arrived
        # (the journal has no part digests: a resumed chunk that is a part is hashed for it here)
        part = state.checker.part_hasher() if again is not None and state.parts_apart else None
        start, end = state.bounds(index)
        remaining = end - start
        for block in _read_back(state.path, start, end):
            state.whole_file(block)
            if again is not None:
                again.update(block)
            if part is not None:
                part.update(block)
            remaining -= len(block)
        if part is not None:
            state.checker.add_part(index, part.digest())
        return not remaining and (again is None or again.hexdigest() == state.done[index])

    def _finish(self, state: _File) -> None:
        bad = state.checker.mismatch()
        if bad is not None and state.facts.parts_guessed:
            bad = self._check_real_parts(state, bad)
        if bad is None:
            with self.changed:
                state.finished = True
                self.changed.notify_all()
            return
        self._restart(state, bad)

    def _check_real_parts(self, state: _File, bad: str) -> str | None:
        """A check over guessed part sizes failed: learn the real ones (one HEAD per part). The same sizes: the
        bytes are corrupt. Others: the guess was wrong, and the file on disk is checked again with them. Either way
        the file's facts now hold the real sizes, for a fetch again."""
        learn = getattr(self.m.source, "part_sizes", None)
        if learn is None:
            return bad
        sizes = learn(state.entry, len(state.facts.part_sizes))
        if sizes is None:
            return bad
        guessed = state.facts.part_sizes
        state.facts = dataclasses.replace(state.facts, part_sizes=sizes, parts_guessed=False)
        if sizes == guessed:
            return bad
        checker = Checker(state.facts, state.entry.size)
        for block in _read_back(state.path, 0, state.entry.size):
            checker.update(block)
        bad = checker.mismatch()
        if bad is None:
            state.checker = checker
        return bad

    def _restart(self, state: _File, why: str) -> None:
        """Bytes corrupted on the way (a whole-file check cannot tell which chunk): the file again, from scratch."""
        state.attempts += 1
        if state.attempts >= self.config.max_attempts:
            raise IntegrityError(f"{state.entry.path}: the bytes received do not match the origin's checksum "
                                 f"after {state.attempts} attempts ({why})", self.m.source.uri)
        self.m.restarted.append(state.entry.path)
        self.m._hook("file_restarted", state.entry)
        self.journal.restart(state.entry.path)
        # A new inode, not the old one truncated: a worker still writing a span of the last fetch writes into the
        # replaced file, and its chunks are not counted (generation). Made beside the journal, outside the data
        # tree (no listed name can clash), and renamed over the file in one step: every open finds a file.
        fresh = self.journal.path.parent / f"restart-{os.getpid()}-{random.getrandbits(48):x}"
        with open(fresh, "xb", opener=_no_follow) as f:
            f.truncate(state.entry.size)
        os.replace(fresh, state.path)
        with state.lock:
            state.reset({})
            state.hashing = True      # released by _advance's finally
        self.enqueue_file(state)


class _ShuffledQueue(queue.Queue):
    """A work queue handing out its items in random order."""

    def _put(self, item) -> None:
        self.queue.insert(random.randrange(len(self.queue) + 1), item)


_buffers = threading.local()


def _read_back(path: Path, start: int, end: int):
    """Bytes [start, end) of a file we wrote (from the page cache), in HASH_BLOCK views of one buffer per thread:
    no fresh allocation per block (each would be page-faulted in again: ~0.2 CPU-s per GiB read back)."""
    buffer = getattr(_buffers, "block", None)
    if buffer is None:
        buffer = _buffers.block = memoryview(bytearray(HASH_BLOCK))
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while start < end:
            n = os.preadv(fd, [buffer[:min(HASH_BLOCK, end - start)]], start)
            if not n:
                return
            yield buffer[:n]
            start += n
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
