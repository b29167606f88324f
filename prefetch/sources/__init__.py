"""Origins of artifact bytes. Each module implements one tiny protocol (in the manner of fsspec's
`open`/`ls`/`info`): list the tree under a root, and read a byte range of one file.

`open_source(storage_uri)` picks the implementation from the URI's scheme.
"""
from __future__ import annotations

from typing import Iterator, Protocol

from ..config import Settings
from ..errors import PrefetchError
from ..store import FileEntry


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


def open_source(storage_uri: str, settings: Settings, tracking_uri: str | None = None) -> Source:
    from urllib.parse import urlparse

    scheme = urlparse(storage_uri).scheme
    if scheme in ("s3", "s3a", "s3n"):
        if settings.transport == "native":
            from .s3_native import NativeS3Source

            return NativeS3Source(storage_uri, settings)
        from .s3 import S3Source

        return S3Source(storage_uri, settings)
    if scheme in ("mlflow-artifacts", "http", "https") and (
        scheme == "mlflow-artifacts" or "/api/2.0/mlflow-artifacts/artifacts" in storage_uri
    ):
        # Through requests whatever PREFETCH_TRANSPORT says: `mlflow server` answers artifact GETs chunked, without
        # Content-Length, and ignores Range, and obstore's HTTP client refuses both (NOTES-i-native.md).
        from .mlflow_proxy import MlflowProxySource

        return MlflowProxySource(storage_uri, settings, tracking_uri)
    if scheme in ("", "file") or (len(scheme) == 1 and storage_uri[1:3] == ":\\"):
        from .local import LocalSource

        return LocalSource(storage_uri)
    from .fsspec_source import FsspecSource

    return FsspecSource(storage_uri, settings)


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
