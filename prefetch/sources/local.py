"""A local directory (or file): `file://...` and plain paths. The embedded MLflow default stores here."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

from ..errors import IntegrityError, NotFound
from .base import FileEntry, read_blocks, safe_relpath


def local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme in ("file", "local"):
        return Path(unquote(parsed.path))
    return Path(uri).expanduser()


class LocalSource:
    supports_ranges = True

    def __init__(self, uri: str):
        self.uri = uri
        self.root = local_path(uri).absolute()

    def identity(self) -> dict:
        return {"origin": "local", "path": str(self.root)}

    def list(self) -> list[FileEntry]:
        try:
            return self._list()
        except OSError as e:
            if e.errno == errno.ELOOP:   # a symlink loop is a broken artifact tree, not a local disk error
                raise IntegrityError(f"a symlink loop in the artifact dir ({e.filename or self.root})",
                                     self.uri) from None
            raise

    def _list(self) -> list[FileEntry]:
        if not self.root.exists() and not self.root.is_symlink():
            raise NotFound(f"no such file or directory {self.root}", self.uri)
        real_root = os.path.realpath(self.root)
        if self.root.is_file():
            st = self.root.stat()
            return [FileEntry(self.root.name, st.st_size, f"{st.st_size}-{st.st_mtime_ns}")]
        entries = []
        seen: set[str] = set()
        for dirpath, dirs, files in os.walk(self.root, followlinks=True, onerror=_raise):
            real_dir = os.path.realpath(dirpath)
            if not _inside(real_dir, real_root):
                raise IntegrityError(f"a symlink points outside the artifact dir ({dirpath})", self.uri)
            if real_dir in seen:    # a directory symlink back up the tree: os.walk would go round forever
                raise IntegrityError(f"a symlink loop in the artifact dir ({dirpath})", self.uri)
            seen.add(real_dir)
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(dirpath, name)
                if not _inside(os.path.realpath(full), real_root):
                    rel = os.path.relpath(full, self.root)
                    raise IntegrityError(f"symlink {rel!r} points outside the artifact dir", self.uri)
                rel = safe_relpath(os.path.relpath(full, self.root).replace(os.sep, "/"), self.uri)
                st = os.stat(full)
                entries.append(FileEntry(rel, st.st_size, f"{st.st_size}-{st.st_mtime_ns}"))
        return entries

    def read(self, path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        target = self.root if self.root.is_file() else self.root / path
        # Checked again at read time: a symlink swapped in after the listing must not leak a file from elsewhere.
        if not self.root.is_file() and not _inside(os.path.realpath(target), os.path.realpath(self.root)):
            raise IntegrityError(f"symlink {path!r} points outside the artifact dir", self.uri)
        with open(target, "rb") as f:
            yield from read_blocks(f, start, end)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _raise(error: OSError) -> None:
    raise error
