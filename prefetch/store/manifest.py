"""The manifest of a committed object (objects/<key>/.prefetch.json) and the file hashes it records."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..sources.base import FileEntry

HASH_BLOCK = 4 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def chunk_sha256s(path: Path, chunk_bytes: int) -> list[str]:
    """The sha256 of each `chunk_bytes` chunk of a file, in order (the grid a transfer recorded)."""
    out = []
    with open(path, "rb") as f:
        while True:
            h, left = hashlib.sha256(), chunk_bytes
            while left and (block := f.read(min(HASH_BLOCK, left))):
                h.update(block)
                left -= len(block)
            if left == chunk_bytes:
                return out
            out.append(h.hexdigest())


def file_matches(path: Path, entry: FileEntry) -> bool:
    """Whether the file at path holds the bytes its manifest entry records: its size, then its chunks' sha256s
    (what a transfer records for every file), or the whole file's sha256 (an entry without chunks)."""
    if not path.is_file() or path.is_symlink() or path.stat().st_size != entry.size:
        return False
    if entry.chunks and entry.size:
        return chunk_sha256s(path, entry.chunks["size"]) == entry.chunks["sha256"]
    return not entry.sha256 or sha256_file(path) == entry.sha256


@dataclasses.dataclass
class Manifest:
    key: str
    uri: str                      # what the user asked for, first time
    source: str                   # the immutable storage location the bytes came from
    identity: dict                # what the key is a hash of
    resolved: dict                # name / version / run_id / model_id ...
    files: list[FileEntry]
    created_at: float
    version: int = 1

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        from ..redact import redact_obj

        d = redact_obj(dataclasses.asdict(self))   # no credentials at rest (DESIGN.md: manifest)
        d["files"] = [{k: v for k, v in dataclasses.asdict(f).items() if v is not None} for f in self.files]
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        d = json.loads(text)
        d["files"] = [FileEntry(**f) for f in d["files"]]
        return cls(**d)
