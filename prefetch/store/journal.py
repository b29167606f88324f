"""The resume journal of one staging dir: what the staged bytes are (the layout and the origin's identity of each
file) and which chunks of them are durable, with each chunk's sha256.

File format (`journal.jsonl`, JSON lines, in the staging dir beside `data/`, never in the artifact namespace):
  line 1   {"v": 1, "chunk_bytes": C, "multipart_threshold": T, "files": {path: layout}}
  then     {"p": path, "i": chunk index, "s": sha256 of the chunk} per durable chunk
A layout is {"size", "etag", "version_id", "chunk_bytes"}: the chunk grid of a file is fixed by its size and the
chunk size, so a chunk index means the same bytes only while both are unchanged. The multipart threshold only
decides how chunks are grouped into GETs (one stream or one GET per chunk), never where chunks start, so a
changed threshold keeps every durable chunk.

Ordering is what makes a record trustworthy: a chunk's line is appended (and the journal fsynced) only after its
bytes are fdatasynced. A crash between the two loses the record, never the other way round. A record torn by a
crash (the last line cut short) is ignored. Records are group-committed: workers `add()` finished chunks, and
`flush()` (every half second, from one thread) fdatasyncs each file that has new chunks once, then appends all
their lines with one fsync, so no worker ever waits on the disk and a crash loses at most the last half second.

On open, a file whose layout or origin identity differs from the one recorded (a new chunk size, a new size,
another ETag or version id: the object changed at the origin) starts over: its records are dropped and its data
file is removed, so a resume never mixes two versions of an object or two chunk grids.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from .store import fsync_dir

JOURNAL = "journal.jsonl"
FORMAT_VERSION = 1


def layout_of(size: int, etag: str | None, version_id: str | None, chunk_bytes: int) -> dict:
    return {"size": int(size), "etag": etag or None, "version_id": version_id or None, "chunk_bytes": int(chunk_bytes)}


class Journal:
    """Open (or start) the journal of `staging` for the files described by `layouts` ({path: layout_of(...)}).

    `data_dir` holds the files' bytes at their artifact paths; a file that starts over loses its data file here.
    `restarted` lists the files whose earlier staged bytes were dropped (their identity or layout changed).
    """

    def __init__(self, staging: Path, data_dir: Path, layouts: dict[str, dict], chunk_bytes: int,
                 multipart_threshold: int):
        self.path = staging / JOURNAL
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._closed = False
        self._pending: dict[str, dict[int, str]] = {}
        old_layouts, old_records = self._read()
        self.restarted: list[str] = []
        self._done: dict[str, dict[int, str]] = {p: {} for p in layouts}
        for path, layout in layouts.items():
            if old_layouts.get(path) == layout:
                self._done[path] = old_records.get(path, {})
            elif path in old_layouts:
                self.restarted.append(path)
                self._drop_data(path)
            else:
                # Never journaled: whatever a crashed run may have left at this path is unaccounted for.
                self._drop_data(path)
        header = {"v": FORMAT_VERSION, "chunk_bytes": chunk_bytes, "multipart_threshold": multipart_threshold,
                  "files": layouts}
        lines = [json.dumps(header, sort_keys=True)]
        for path, chunks in self._done.items():
            lines += [json.dumps({"p": path, "i": i, "s": s}) for i, s in sorted(chunks.items())]
        # Rewritten whole (tmp + fsync + rename): a crash here leaves the old journal or the new one.
        tmp = self.path.with_name(JOURNAL + ".tmp")
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def _read(self) -> tuple[dict, dict[str, dict[int, str]]]:
        try:
            text = self.path.read_text()
        except (FileNotFoundError, UnicodeDecodeError):
            return {}, {}
        lines = text.split("\n")
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            return {}, {}
        if not isinstance(header, dict) or header.get("v") != FORMAT_VERSION:
            return {}, {}
        layouts = header.get("files") or {}
        records: dict[str, dict[int, str]] = {}
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                if rec.get("restart"):
                    records.pop(rec["p"], None)
                    continue
                path, index, sha = rec["p"], int(rec["i"]), str(rec["s"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue   # the torn last line of a killed run
            if path in layouts:
                records.setdefault(path, {})[index] = sha
        return layouts, records

    def _drop_data(self, path: str) -> None:
        try:
            (self.data_dir / path).unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            pass

    def done(self, path: str) -> dict[int, str]:
        """{chunk index: sha256} of the chunks of `path` already durable in data/."""
        return dict(self._done.get(path, {}))

    def add(self, path: str, index: int, sha256: str) -> None:
        """A chunk whose bytes are written (not yet durable): recorded by the next flush()."""
        with self._lock:
            if not self._closed:
                self._pending.setdefault(path, {})[index] = sha256

    def flush(self) -> None:
        """Make the added chunks durable: fdatasync each of their files once, then one journal append + fsync."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        lines = []
        for path, chunks in pending.items():
            try:
                fd = os.open(self.data_dir / path, os.O_RDONLY)
            except FileNotFoundError:
                continue   # started over meanwhile: nothing of it to vouch for
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            lines += [json.dumps({"p": path, "i": i, "s": s}) for i, s in sorted(chunks.items())]
        with self._lock:
            if self._closed or not lines:
                return
            os.write(self._fd, ("\n".join(lines) + "\n").encode())
            os.fsync(self._fd)
            for path, chunks in pending.items():
                self._done.setdefault(path, {}).update(chunks)

    def record(self, path: str, index: int, sha256: str) -> bool:
        """Mark a chunk durable. Call only after its bytes are fdatasynced. False once the journal is closed
        (a cancelled worker finishing late must not vouch for bytes a restart has already dropped)."""
        line = (json.dumps({"p": path, "i": index, "s": sha256}) + "\n").encode()
        with self._lock:
            if self._closed:
                return False
            os.write(self._fd, line)
            os.fsync(self._fd)
            self._done.setdefault(path, {})[index] = sha256
        return True

    def restart(self, path: str) -> None:
        """Forget every chunk of one file (its bytes failed the origin's check, or the origin changed it)."""
        with self._lock:
            self._done[path] = {}
            self._pending.pop(path, None)
            line = (json.dumps({"p": path, "restart": True}) + "\n").encode()
            if not self._closed:
                os.write(self._fd, line)
                os.fsync(self._fd)
        self._drop_data(path)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)
