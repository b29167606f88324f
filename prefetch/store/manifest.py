"""The manifest of a committed object (objects/<key>/.prefetch.json) and the file hash it records."""
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
