"""The inside of one staging dir, and the names it can hold.

  staging/<key>.<random>/
    data/<artifact path>     the artifact's bytes at their final names (no temporary suffix anywhere)
    journal.jsonl            layout + durable chunks (prefetch/store/journal.py)
    .inflight.json           who is downloading (read by `status` and by lock waiters)
Temporary state lives beside data/, never inside it, so any name the origin allows can be cached: an artifact
`model.partition.pkl`, `weights.part-00001.bin`, `x.part` beside `x`, or a root-level `.inflight.json`.
The commit renames data/ to objects/<key>.

`refuse_impossible_names` runs before the first byte: names this filesystem cannot hold (a file and a dir of the
same name, a component longer than NAME_MAX, two names equal but for case on a case-insensitive filesystem, two
listing keys that normalise to one path) fail with exit 5 naming the path, instead of a late, half-written error.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterable

from ..errors import IntegrityError

DATA = "data"


def data_dir(staging: Path) -> Path:
    return staging / DATA


def name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def case_insensitive(directory: Path) -> bool:
    """True when `directory`'s filesystem folds case (a probe file, looked up under another case)."""
    probe = directory / f".case-probe-{uuid.uuid4().hex[:8]}"
    probe.touch()
    try:
        return Path(str(directory / probe.name.upper())).exists()
    finally:
        probe.unlink()


def refuse_impossible_names(paths: Iterable[str], directory: Path, uri: str | None) -> None:
    """Raise IntegrityError (exit 5) naming the first path that cannot exist below `directory`."""
    paths = list(paths)
    limit = name_max(directory)
    seen: set[str] = set()
    for p in paths:
        if p in seen:
            raise IntegrityError(f"artifact listing names {p!r} twice (keys that differ only in '//', './' or "
                                 f"'\\' are one path here)", uri)
        seen.add(p)
        for part in p.split("/"):
            if len(os.fsencode(part)) > limit:
                raise IntegrityError(f"artifact path {p!r} has a name longer than this filesystem allows "
                                     f"({limit} bytes)", uri)
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in seen:
                raise IntegrityError(f"artifact listing has both a file {parent!r} and a directory of that name "
                                     f"(for {p!r})", uri)
    directory.mkdir(parents=True, exist_ok=True)
    if case_insensitive(directory):
        folded: dict[str, str] = {}
        for p in paths:
            other = folded.setdefault(p.casefold(), p)
            if other != p:
                raise IntegrityError(f"artifact paths {other!r} and {p!r} differ only in case, and this "
                                     f"filesystem does not tell them apart", uri)
