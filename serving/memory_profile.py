"""What a model load costs in RAM, split into what every replica pays and what a node pays once.

Measured from the kernel's own accounting, `/proc/self/smaps_rollup` before and after the load (and
`/proc/self/smaps` for the model's own files):
- private: the growth of `Anonymous` memory. Copies of weights, prepacked kernels, Python objects, arenas:
  nothing another process can share. Copy-on-write pages of a private file mapping count here too.
- shared: the model's files mapped into the process (`Rss - Anonymous` of the mappings under the model's
  directories). Page-cache pages that every process mapping the same file shares; a node holds them once.
  The node-level figure is the mapped files' size (all of it can become resident), recorded beside what was
  resident right after the load.
`Pss`, `Shared_Clean`, `Private_Clean`, `Private_Dirty` are kept too, as the kernel reported them.

The profile is recorded per object and format at `profile_path()` (objects/ is read-only), written atomically,
and read back by serving.memory to plan K replicas: K x private + one shared copy per node.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

ROLLUP_FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty", "Anonymous")
PROFILE_VERSION = 1


def profile_path(cache_dir: Path, key: str, format: str) -> Path:
    """Where the memory profile of object `key` loaded as `format` lives: the one place this path is built."""
    from prefetch.store.paths import StorePaths

    return StorePaths(Path(cache_dir)).profile(key, format)


def read_rollup(pid: int | str = "self") -> dict[str, int]:
    """/proc/<pid>/smaps_rollup as bytes per field (the kernel reports kB)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def pss(pid: int | str = "self") -> int:
    return read_rollup(pid)["Pss"]


def mapped_files(dirs: Iterable[Path], pid: int | str = "self") -> dict[str, dict[str, int]]:
    """Per file under `dirs` that the process maps: its smaps fields summed over its mappings (bytes)."""
    roots = [str(Path(d).resolve()) + os.sep for d in dirs if d]
    files: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if not parts[0].endswith(":"):        # a mapping's header: "start-end perms offset dev inode path"
                path = parts[5] if len(parts) > 5 else ""
                current = files.setdefault(path, {}) if any(path.startswith(r) for r in roots) else None
            elif current is not None and len(parts) == 3 and parts[2] == "kB":
                name = parts[0][:-1]
                current[name] = current.get(name, 0) + int(parts[1]) * 1024
    return files


@dataclasses.dataclass(frozen=True)
class Snapshot:
    rollup: dict[str, int]
    at: float


def snapshot(pid: int | str = "self") -> Snapshot:
    return Snapshot(read_rollup(pid), time.time())


def measure_load(before: Snapshot, model_dirs: Iterable[Path], *, key: str, format: str,
                 shared_weights: bool, model_bytes: int) -> dict:
    """The profile of the load that happened since `before` (call right after the load, in the same process)."""
    after = snapshot()
    maps = mapped_files(model_dirs)
    resident = sum(max(0, m.get("Rss", 0) - m.get("Anonymous", 0)) for m in maps.values())
    file_bytes = sum(_size(p) for p in maps)
    delta = {k: after.rollup.get(k, 0) - before.rollup.get(k, 0) for k in ROLLUP_FIELDS}
    return {
        "version": PROFILE_VERSION, "key": key, "format": format, "shared_weights": shared_weights,
        "model_bytes": model_bytes,
        "private_bytes": max(0, delta["Anonymous"]),
        "shared_bytes": file_bytes,                  # one copy per node: the mapped files, whole
        "shared_resident_bytes": resident,           # of which resident right after the load
        "mapped_files": sorted(Path(p).name for p in maps),
        "delta": delta, "before": _fields(before.rollup), "after": _fields(after.rollup),
        "measured_at": after.at, "pid": os.getpid(),
    }


def record(cache_dir: Path, key: str, format: str, profile: dict) -> Path:
    """Write the profile atomically (a reader sees the old one or the new one, never half of one)."""
    target = profile_path(cache_dir, key, format)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(profile, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_profile(cache_dir: Path, key: str, format: str) -> dict | None:
    """The recorded profile, or None when nothing was measured (or the file is not a profile we wrote)."""
    try:
        doc = json.loads(profile_path(cache_dir, key, format).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != PROFILE_VERSION or "private_bytes" not in doc:
        return None
    return doc


def _fields(rollup: dict[str, int]) -> dict[str, int]:
    return {k: rollup.get(k, 0) for k in ROLLUP_FIELDS}


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
