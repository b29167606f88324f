"""The node-local store (DESIGN.md: "Node-local store"): the contract every other part relies on.

Shape borrowed from huggingface_hub's file_download: `StorePaths` computes every path and does no I/O;
`Store` does the I/O. A reader only ever sees complete trees: downloads land in staging/ and are renamed
into objects/ after their sizes are checked and their manifest is written and fsynced.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import posixpath
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

from .errors import IntegrityError, NotFound

MANIFEST = ".prefetch.json"
HASH_BLOCK = 4 << 20
REF_CLOCK_SKEW = 60.0   # seconds a ref may be dated ahead of this clock before it is ignored


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file of an artifact tree: a path relative to the artifact root, its size, and what the origin
    says identifies its content (etag, mtime...), used only to compute keys for mutable origins."""

    path: str
    size: int
    etag: str | None = None
    sha256: str | None = None


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
        from .redact import redact_obj

        d = redact_obj(dataclasses.asdict(self))   # no credentials at rest (DESIGN.md: manifest)
        d["files"] = [{k: v for k, v in dataclasses.asdict(f).items() if v is not None} for f in self.files]
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        d = json.loads(text)
        d["files"] = [FileEntry(**f) for f in d["files"]]
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class StorePaths:
    """Path arithmetic for the store, in one place. No I/O."""

    root: Path

    def object_dir(self, key: str) -> Path:
        return self.root / "objects" / key

    def manifest(self, key: str) -> Path:
        return self.object_dir(key) / MANIFEST

    def derived_dir(self, key: str, format_id: str) -> Path:
        return self.root / "derived" / key / format_id

    def ref(self, ref_id: str) -> Path:
        return self.root / "refs" / f"{ref_id}.json"

    def staging_root(self) -> Path:
        return self.root / "staging"

    def new_staging(self, key: str) -> Path:
        return self.staging_root() / f"{key}.{uuid.uuid4().hex[:8]}"

    def lock(self, key: str) -> Path:
        return self.root / "locks" / f"{key}.lock"

    def trash(self) -> Path:
        return self.root / "trash"


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below root, so a rename publishes durable bytes."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """I/O on the node-local store. Safe to use from many processes at once."""

    def __init__(self, root: Path | str):
        self.paths = StorePaths(Path(root).expanduser())
        self.root = self.paths.root
        from . import trust

        trust.prepare(self.root)   # refuse a cache dir others could write into (exit 2), before any read

    # -- reading -----------------------------------------------------------------------------------
    def lookup(self, key: str, touch: bool = True) -> Manifest | None:
        """The committed object's manifest, or None. A hit marks the object as used (for LRU)."""
        from .quarantine import ManifestError, parse_manifest, quarantine

        from .trust import check_not_symlink

        check_not_symlink(self.paths.object_dir(key), "cached object")   # never serve through a planted link
        path = self.paths.manifest(key)
        try:
            manifest = parse_manifest(path.read_bytes().decode("utf-8", "replace"), Manifest)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except ManifestError as e:
            # One broken manifest must not break the node: move the object aside; the key is a miss again.
            quarantine(self, key, str(e))
            return None
        if touch:
            self.touch(key)
        return manifest

    def touch(self, key: str) -> None:
        try:
            os.utime(self.paths.manifest(key))
        except FileNotFoundError:
            pass

    def last_used(self, key: str) -> float:
        try:
            return self.paths.manifest(key).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def keys(self) -> list[str]:
        objects = self.root / "objects"
        if not objects.is_dir():
            return []
        return sorted(p.name for p in objects.iterdir() if (p / MANIFEST).is_file())

    def manifests(self) -> list[Manifest]:
        return [m for k in self.keys() if (m := self.lookup(k, touch=False)) is not None]

    def resolve_key(self, prefix: str) -> str:
        """A full key from a unique prefix (what `prefetch rm`/`verify` accept)."""
        keys = self.keys()
        if prefix in keys:
            return prefix
        matches = [k for k in keys if k.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFound("no cached object with this key", prefix)
        raise NotFound(f"key prefix is ambiguous ({len(matches)} objects match)", prefix)

    def used_bytes(self) -> int:
        total = 0
        for sub in ("objects", "derived", "staging"):
            base = self.root / sub
            if base.is_dir():
                for dirpath, _d, files in os.walk(base):
                    total += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in files)
        return total

    # -- writing -----------------------------------------------------------------------------------
    def lock(self, key: str, timeout: float = -1):
        """Cross-process single flight: one download per key per node; everyone else waits."""
        from filelock import FileLock  # imported here: a cache hit never needs it

        path = self.paths.lock(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path), timeout=timeout)

    def staging_for(self, key: str) -> Path:
        """Staging dir for key. Call with the key's lock held. Reuses a dir left by a killed process,
        so its .part files resume; extra leftovers are removed."""
        root = self.paths.staging_root()
        root.mkdir(parents=True, exist_ok=True)
        from .trust import check_not_symlink

        leftovers = list(root.glob(f"{key}.*"))
        for p in leftovers:
            check_not_symlink(p, "staging dir")   # a planted staging/<key>.x symlink is refused, never written into
        leftovers.sort(key=lambda p: p.lstat().st_mtime, reverse=True)
        for extra in leftovers[1:]:
            shutil.rmtree(extra, ignore_errors=True)
        if leftovers:
            return leftovers[0]
        path = self.paths.new_staging(key)
        path.mkdir()
        return path

    def discard_staging(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, staging: Path, manifest: Manifest) -> Path:
        """Verify sizes (and sha256 when the manifest has them), fsync, write the manifest, rename into objects/.

        Call with the key's lock held. The staging dir is gone afterwards whatever happens."""
        from .trust import check_not_symlink, file_mode, symlinks_below

        check_not_symlink(staging, "staging dir")
        links = symlinks_below(staging)
        if links:
            shutil.rmtree(staging, ignore_errors=True)
            raise IntegrityError(f"staging holds a symlink ({links[0]}); refused, nothing committed", manifest.uri)
        try:
            for f in manifest.files:
                p = staging / f.path
                if not p.is_file() or p.is_symlink():
                    raise IntegrityError(f"file {f.path!r} missing after download", manifest.uri)
                size = p.stat().st_size
                if size != f.size:
                    raise IntegrityError(
                        f"file {f.path!r} has {size} bytes, the origin listed {f.size}", manifest.uri
                    )
            for stray in staging.rglob("*.part*"):
                stray.unlink()
            (staging / MANIFEST).write_text(manifest.to_json())
            fsync_tree(staging)
            for f in manifest.files:
                os.chmod(staging / f.path, file_mode())   # read-only, no world bits (trust.py)
            os.chmod(staging / MANIFEST, file_mode() | 0o200)   # lookup() touches it (LRU): owner-writable
            from .trust import dir_mode

            for dirpath, _dirs, _files in os.walk(staging):      # whatever the umask was when they were made
                os.chmod(dirpath, dir_mode())
            dest = self.paths.object_dir(manifest.key)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, dest)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # Someone committed the same key without our lock (e.g. a repair); theirs stands.
            fsync_dir(dest.parent)
            return dest
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def replace(self, key: str, staging: Path, manifest: Manifest) -> Path:
        """Swap a repaired tree in for an existing object (lock held). If the new tree fails its checks,
        the old one is put back."""
        old = self.paths.object_dir(key)
        trash = self.paths.trash() / f"{key}.{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        if old.exists():
            os.rename(old, trash)
        try:
            dest = self.commit(staging, manifest)
        except BaseException:
            if trash.exists() and not old.exists():
                os.rename(trash, old)
            raise
        shutil.rmtree(trash, ignore_errors=True)
        return dest

    def remove(self, key: str) -> int:
        """Remove an object and what was derived from it; returns bytes freed."""
        freed = 0
        with self.lock(key):
            for path in (self.paths.object_dir(key), self.root / "derived" / key):
                if path.exists():
                    freed += _tree_bytes(path)
                    trash = self.paths.trash() / f"{key}.{uuid.uuid4().hex[:8]}"
                    trash.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(path, trash)  # atomic disappearance, then the slow delete
                    shutil.rmtree(trash, ignore_errors=True)
        return freed

    # -- refs: last known resolution of a mutable URI ------------------------------------------------
    def read_ref(self, ref_id: str) -> dict | None:
        """The last resolution of a mutable URI, or None when there is none that can be trusted: a ref that is
        torn, lacks its key or time, or is dated in the future (a wrong clock, or planted to never expire)."""
        try:
            ref = json.loads(self.paths.ref(ref_id).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(ref, dict) or not isinstance(ref.get("key"), str) or not ref.get("kind"):
            return None
        at = ref.get("resolved_at")
        if isinstance(at, bool) or not isinstance(at, (int, float)) or at > time.time() + REF_CLOCK_SKEW:
            return None
        return ref

    def write_ref(self, ref_id: str, data: dict) -> None:
        path = self.paths.ref(ref_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
        from .redact import redact_obj

        tmp.write_text(json.dumps(redact_obj(data), sort_keys=True))   # no credentials at rest
        os.replace(tmp, path)

    # -- verification --------------------------------------------------------------------------------
    def verify(self, key: str) -> list[str]:
        """Re-hash an object against its manifest. Returns the paths that are missing or differ."""
        manifest = self.lookup(key, touch=False)
        if manifest is None:
            raise NotFound("no cached object with this key", key)
        bad = []
        base = self.paths.object_dir(key)
        for f in manifest.files:
            p = base / f.path
            if not p.is_file() or p.stat().st_size != f.size or (f.sha256 and sha256_file(p) != f.sha256):
                bad.append(f.path)
        return bad


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _d, files in os.walk(path):
        total += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in files)
    return total


def iter_files(root: Path) -> Iterator[Path]:
    for dirpath, _d, files in os.walk(root):
        for name in files:
            yield Path(dirpath) / name


def now() -> float:
    return time.time()
