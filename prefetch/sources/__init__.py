"""Origins of artifact bytes. Each module implements one tiny protocol (in the manner of fsspec's
`open`/`ls`/`info`): list the tree under a root, and read a byte range of one file.

`open_source(storage_uri)` picks the implementation from the URI's scheme; what they share is in base.py.
"""
from __future__ import annotations

from ..config import Settings
from .base import FileEntry, Source, TransientError, read_blocks, safe_relpath

__all__ = ["FileEntry", "Source", "TransientError", "open_source", "read_blocks", "safe_relpath"]


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
    # `local:` is ours, not fsspec's: fsspec's local filesystem follows symlinks out of the root.
    if scheme in ("", "file", "local") or (len(scheme) == 1 and storage_uri[1:3] == ":\\"):
        from .local import LocalSource

        return LocalSource(storage_uri)
    from .fsspec_source import FsspecSource

    return FsspecSource(storage_uri, settings)

