"""The node-local store (DESIGN.md: "Node-local store"): the contract every other part relies on.

Shape borrowed from huggingface_hub's file_download: `StorePaths` (paths.py) computes every path and does no
I/O; `Store` does the I/O. A reader only ever sees complete trees: downloads land in staging/ and are renamed
into objects/ after their sizes are checked and their manifest is written and fsynced; conversions land in
staging/ too and are renamed into derived/ the same way (commit_derived).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

from ..errors import IntegrityError, NotFound
from .manifest import Manifest, file_matches
from .paths import StorePaths, manifest_in

REF_CLOCK_SKEW = 60.0   # seconds a ref may be dated ahead of this clock before it is ignored


# -- how many bytes a tree holds: two meanings, one helper each ---------------------------------------------------
def apparent_bytes(path: Path) -> int:
    """The sum of the files' sizes below path (what a listing says; what `rm` reports as freed)."""
    total = 0
    for dirpath, _d, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                continue
    return total


def allocated_bytes(path: Path, skip: Iterable[str] = ()) -> int:
    """Bytes really written below path: a ranged download truncates its .part files to their final size up front,
    so a sparse file counts only the blocks it holds (never more than its size). Files named in `skip` are left
    out (e.g. the in-flight record, when measuring a download's progress)."""
    skip = frozenset(skip)
    total = 0
    for dirpath, _d, files in os.walk(path):
        for f in files:
            if f in skip:
                continue
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except FileNotFoundError:
                continue
            total += min(st.st_size, st.st_blocks * 512)
    return total


# -- durability ------------------------------------------------------------------------------------------------
FSYNC_THREADS = 8


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below root, so a rename publishes durable bytes. Many files are fsynced from
    a few threads at once: the filesystem's journal then commits them together, not one commit (and one wait) per
    file, which for a model of hundreds of small files was most of the commit's time."""
    files, dirs = [], []
    for dirpath, _dirs, names in os.walk(root):
        dirs.append(Path(dirpath))
        files += [os.path.join(dirpath, name) for name in names]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(FSYNC_THREADS, len(files))), thread_name_prefix="prefetch-fsync") as pool:
        list(pool.map(_fsync_file, files))          # the first error is raised here
    for path in dirs:
        fsync_dir(path)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(staging: Path, dest: Path, manifest_text: str, files: Iterable[str],
             theirs_stands: Callable[[OSError], bool]) -> Path:
    """Write the manifest, make the files read-only, fsync, rename staging -> dest, fsync dest's parent.
    A rename refused because someone committed dest first is fine when theirs_stands(error) says so."""
    from .trust import dir_mode, file_mode

    manifest_in(staging).write_text(manifest_text)
    for rel in files:
        os.chmod(staging / rel, file_mode())              # read-only, no world bits (trust.py)
    os.chmod(manifest_in(staging), file_mode() | 0o200)   # lookup() touches it (LRU): owner-writable
    for dirpath, _dirs, _files in os.walk(staging):       # whatever the umask was when they were made
        os.chmod(dirpath, dir_mode())
    fsync_tree(staging)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staging, dest)
    except OSError as e:
        if not theirs_stands(e):
            raise
    fsync_dir(dest.parent)
    return dest


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
        objects = self.paths.objects_root()
        if not objects.is_dir():
            return []
        return sorted(p.name for p in objects.iterdir() if self.paths.manifest(p.name).is_file())

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
        """Apparent bytes of objects, derived artifacts and staging (what `status` shows as used)."""
        return sum(apparent_bytes(base) for base in
                   (self.paths.objects_root(), self.paths.derived_root(), self.paths.staging_root()))

    # -- writing -----------------------------------------------------------------------------------
    def lock(self, name: str, timeout: float = -1):
        """Cross-process single flight: one download per key (one conversion per key and format id) per node;
        everyone else waits."""
        from filelock import FileLock  # imported here: a cache hit never needs it

        path = self.paths.lock(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path), timeout=timeout)

    def try_lock(self, name: str):
        """The lock, held, if nobody else holds it; else None (eviction and quarantine skip a busy key)."""
        from filelock import Timeout

        lock = self.lock(name, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return None
        return lock

    def staging_for(self, key: str) -> Path:
        """Staging dir for key. Call with the key's lock held. Reuses a dir left by a killed process, so what its
        journal vouches for resumes (prefetch/store/journal.py); extra leftovers are removed."""
        root = self.paths.staging_root()
        root.mkdir(parents=True, exist_ok=True)
        from .trust import check_not_symlink

        leftovers = list(root.glob(self.paths.staging_glob(key)))
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

    def derived_staging_for(self, key: str, format_id: str) -> Path:
        """A fresh staging dir for converting key to format_id. Call with that conversion's lock held: the
        leftovers of a conversion killed midway are removed (nothing resumes them)."""
        root = self.paths.staging_root()
        for stale in root.glob(self.paths.derived_staging_glob(key, format_id)):
            shutil.rmtree(stale, ignore_errors=True)
        path = self.paths.new_derived_staging(key, format_id)
        path.mkdir(parents=True)
        return path

    def discard_staging(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, staging: Path, manifest: Manifest) -> Path:
        """Check sizes (the transfer verified the bytes), fsync, write the manifest, rename into objects/.

        Call with the key's lock held. The staging dir is gone afterwards whatever happens."""
        from .trust import check_not_symlink, symlinks_below

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
            # A rename refused because the key exists: someone committed it without our lock (e.g. a repair);
            # theirs stands.
            return _publish(staging, self.paths.object_dir(manifest.key), manifest.to_json(),
                            [f.path for f in manifest.files],
                            lambda e: e.errno in (errno.ENOTEMPTY, errno.EEXIST))
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def commit_derived(self, staging: Path, key: str, format_id: str, doc: dict) -> Path:
        """Publish a validated conversion: staging -> derived/<key>/<format_id>/, with doc as its manifest
        (doc["files"]: [{path, size, sha256}]). Same steps as commit; call with the conversion's lock held.
        The staging dir is gone afterwards whatever happens."""
        dest = self.paths.derived_dir(key, format_id)
        try:
            # A rename refused while dest holds a manifest: someone committed this conversion; theirs stands.
            return _publish(staging, dest, json.dumps(doc, indent=1, sort_keys=True),
                            [f["path"] for f in doc["files"]], lambda e: manifest_in(dest).is_file())
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def replace(self, key: str, staging: Path, manifest: Manifest) -> Path:
        """Swap a repaired tree in for an existing object (lock held). If the new tree fails its checks,
        the old one is put back."""
        old = self.paths.object_dir(key)
        trash = self.paths.new_trash(key)
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
        """Remove an object and what was derived from it; returns bytes freed (apparent)."""
        freed = 0
        with self.lock(key):
            for path in (self.paths.object_dir(key), self.paths.derived_key_dir(key)):
                if path.exists():
                    freed += apparent_bytes(path)
                    trash = self.paths.new_trash(key)
                    trash.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(path, trash)  # atomic disappearance, then the slow delete
                    shutil.rmtree(trash, ignore_errors=True)
            shutil.rmtree(self.paths.profiles(key), ignore_errors=True)   # measured for what is gone
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
        from ..redact import redact_obj

        tmp.write_text(json.dumps(redact_obj(data), sort_keys=True))   # no credentials at rest
        os.replace(tmp, path)

    # -- verification --------------------------------------------------------------------------------
    def verify(self, key: str) -> list[str]:
        """Re-hash an object against its manifest. Returns the paths that are missing or differ."""
        manifest = self.lookup(key, touch=False)
        if manifest is None:
            raise NotFound("no cached object with this key", key)
        base = self.paths.object_dir(key)
        return [f.path for f in manifest.files if not file_matches(base / f.path, f)]
