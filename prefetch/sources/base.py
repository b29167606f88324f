"""What every origin of artifact bytes shares: the Source protocol, the listing entry, the listing's path rules,
the retryable error and a block reader.

The origin layer stands below the store: nothing here imports prefetch.store (the store imports FileEntry and
MANIFEST from here).
"""
from __future__ import annotations

import dataclasses
import posixpath
from typing import Iterator, Protocol

from ..errors import IntegrityError, PrefetchError

# The store writes each artifact's manifest at this path inside the artifact dir, so no listing may hold it.
# Defined here, with the listing rules that reserve it; prefetch.store.paths re-exports it.
MANIFEST = ".prefetch.json"


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file of an artifact tree: a path relative to the artifact root, its size, and what the origin
    says identifies its content (etag, mtime...), used only to compute keys for mutable origins."""

    path: str
    size: int
    etag: str | None = None
    sha256: str | None = None
    version_id: str | None = None     # the origin's version of the object, when it has versions
    origin_check: str | None = None   # what tied the bytes to the origin: md5 | sha256 | crc32c | crc32 | none
    chunks: dict | None = None        # {"size": chunk bytes, "sha256": [one per chunk]} (peers verify with these)


def safe_relpath(path: str, uri: str | None = None) -> str:
    """A listing's path, checked to stay inside its artifact dir: no absolute paths, no `..`, no NUL."""
    if not path or "\x00" in path or path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        raise IntegrityError(f"artifact listing has an unsafe path {path!r} (absolute or empty)", uri)
    parts = path.replace("\\", "/").split("/")
    if any(p == ".." for p in parts):
        raise IntegrityError(f"artifact listing has an unsafe path {path!r} (contains '..')", uri)
    norm = posixpath.normpath(path.replace("\\", "/"))
    if norm in (".", "") or norm.startswith("../"):
        raise IntegrityError(f"artifact listing has an unsafe path {path!r}", uri)
    if norm == MANIFEST:
        raise IntegrityError(f"artifact listing has a reserved path {path!r}", uri)
    return norm


class TransientError(PrefetchError):
    """A failure worth retrying (5xx, timeout, reset connection). The transfer retries it with backoff."""

    exit_code = 4


class Source(Protocol):
    uri: str                 # the storage URI of the artifact root
    supports_ranges: bool    # read(path, start>0) is cheap (no bytes before start are sent)

    def list(self) -> list[FileEntry]:
        """Every file under the root, paths relative to it (already checked by safe_relpath)."""

    def read(self, path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes [start, end) of one file, in blocks. Raises TransientError for retryable failures."""

    def identity(self) -> dict:
        """What identifies the origin itself (endpoint, bucket...), for cache keys."""


def read_blocks(stream, start: int, end: int | None, block: int = 1 << 20) -> Iterator[bytes]:
    """Blocks from a seekable file object, [start, end)."""
    stream.seek(start)
    remaining = None if end is None else end - start
    while remaining is None or remaining > 0:
        data = stream.read(block if remaining is None else min(block, remaining))
        if not data:
            return
        if remaining is not None:
            remaining -= len(data)
        yield data
