"""Anything fsspec can open (gcs://, az://, hf://, memory://, http(s) listings...), when its backend is installed.

Only S3 has a dedicated module (boto3): that is the one origin we test against a real server; other clouds
are reached through their fsspec backends and tested here with fsspec's in-memory filesystem.
"""
from __future__ import annotations

from typing import Iterator

from ..config import Settings
from ..errors import BadURI, NotFound, Unreachable
from .base import FileEntry, TransientError, read_blocks, safe_relpath

_ETAG_FIELDS = ("ETag", "etag", "md5Hash", "md5", "content_md5", "generation", "mtime", "LastModified", "created")


class FsspecSource:
    supports_ranges = True

    def __init__(self, uri: str, settings: Settings):
        import fsspec

        self.uri = uri
        try:
            self.fs, self.root = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as e:
            scheme = uri.split(":", 1)[0]
            raise BadURI(f"no fsspec implementation is installed for '{scheme}://' ({e})", uri) from None
        self.root = self.root.rstrip("/")

    def identity(self) -> dict:
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return {"origin": "fsspec", "protocol": protocol, "root": self.root}

    def list(self) -> list[FileEntry]:
        try:
            if self.fs.isfile(self.root):
                info = self.fs.info(self.root)
                return [FileEntry(self.root.rsplit("/", 1)[-1], int(info["size"]), _etag(info))]
            found = self.fs.find(self.root, detail=True, withdirs=False)
        except FileNotFoundError:
            raise NotFound("no such object or prefix", self.uri) from None
        except (ConnectionError, TimeoutError, OSError) as e:
            raise Unreachable(f"cannot list ({e})", self.uri) from None
        if not found:
            raise NotFound("no such object or prefix", self.uri)
        entries = []
        prefix = self.root + "/"
        for full, info in sorted(found.items()):
            rel = full[len(prefix):] if full.startswith(prefix) else full.lstrip("/")
            entries.append(FileEntry(safe_relpath(rel, self.uri), int(info["size"]), _etag(info)))
        return entries

    def read(self, path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        full = self.root if self.fs.isfile(self.root) else f"{self.root}/{path}"
        try:
            with self.fs.open(full, "rb") as f:
                yield from read_blocks(f, start, end)
        except (ConnectionError, TimeoutError) as e:
            raise TransientError(f"read of {path} failed ({e})", self.uri) from None


def _etag(info: dict) -> str | None:
    for field in _ETAG_FIELDS:
        if info.get(field) is not None:
            return str(info[field])
    return None
