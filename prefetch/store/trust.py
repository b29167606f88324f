"""Trust of the cache directory: every replica on the node executes what the cache hands it (a pickle, a skops
file, an ONNX graph), so the cache is only used when nobody else can write into it.

- The cache root and its top-level directories (objects/, staging/, refs/, ...) must be owned by this user and
  not writable by group or others; otherwise `UntrustedCacheDir` (exit 2) names the path and why.
- They are created 0700, or 0750 + setgid to a group with `PREFETCH_SHARED_GROUP=<group name or gid>` (replicas
  running as other users of that group may then read, never write). Files of committed objects are 0400, or
  0440 with a shared group: no world bits, whatever the umask.
- Inside the store, symlinks are never followed: `lstat` checks on the top-level dirs, on staging dirs before
  they are reused or renamed, and on object dirs before they are served (`check_not_symlink`).

Checked on every `Store(...)` (a dozen lstat calls): cheap next to any download, and a cache dir whose mode
changed under a running daemon is refused on its next warm.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import BadURI
from .paths import TOP_DIRS

SHARED_GROUP_ENV = "PREFETCH_SHARED_GROUP"
# Top-level directories of the store (DESIGN.md "Node-local store").


class UntrustedCacheDir(BadURI):
    """The cache dir (or one of its directories) could be written by someone else, or is a symlink (exit 2)."""


def shared_gid() -> int | None:
    """The gid of PREFETCH_SHARED_GROUP (a name or a number), or None when unset."""
    value = os.environ.get(SHARED_GROUP_ENV, "").strip()
    if not value:
        return None
    if value.isdigit():
        return int(value)
    import grp

    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise UntrustedCacheDir(f"{SHARED_GROUP_ENV}={value!r}: no such group") from None


def dir_mode() -> int:
    return 0o2750 if shared_gid() is not None else 0o700


def file_mode() -> int:
    """Mode of a committed file: read-only, for the owner (and the shared group)."""
    return 0o440 if shared_gid() is not None else 0o400


def check_dir(path: Path, what: str = "cache dir") -> None:
    """Refuse a directory someone else could write into, or a symlink where a directory should be."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UntrustedCacheDir(f"{what} {path} is a symlink; the store never follows symlinks inside it")
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedCacheDir(f"{what} {path} is not a directory")
    uid = os.geteuid()
    if not _owner_ok(st):
        raise UntrustedCacheDir(f"{what} {path} is owned by uid {st.st_uid}, not by this user (uid {uid}); "
                                "another user could replace what replicas load")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "others" if st.st_mode & stat.S_IWOTH else "its group"
        raise UntrustedCacheDir(f"{what} {path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o}); "
                                f"chmod go-w {path}")


def prepare(root: Path) -> None:
    """Create the root and its top-level dirs with safe modes (when missing), then check every one of them."""
    gid = shared_gid()
    mode = dir_mode()
    for path in (root, *(root / d for d in TOP_DIRS)):
        created = False
        if not os.path.lexists(path):
            try:
                os.makedirs(path, mode=0o700, exist_ok=False)
                created = True
            except FileExistsError:
                pass
            except OSError:
                continue          # a read-only mount of a pre-warmed cache: hits still work, writes fail later
        if created:
            try:
                if gid is not None:
                    os.chown(path, -1, gid)
                os.chmod(path, mode)   # explicit: makedirs' mode is filtered by the umask
            except OSError:
                pass
        check_dir(path, "cache dir" if path == root else "cache subdir")


def check_not_symlink(path: Path, what: str) -> None:
    """A path inside the store that must be a real directory (a staging dir, an object dir), never a link."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UntrustedCacheDir(f"{what} {path} is {'a symlink' if stat.S_ISLNK(st.st_mode) else 'not a directory'}"
                                "; refused (the store never follows symlinks)")
    if not _owner_ok(st):
        raise UntrustedCacheDir(f"{what} {path} is owned by uid {st.st_uid}, not by this user; refused")


def _owner_ok(st: os.stat_result) -> bool:
    """Ours; or, with PREFETCH_SHARED_GROUP, a cache another user keeps for that group (we only read it: the
    write bits are checked apart, and a warm that needs to write fails on the node's permissions)."""
    if st.st_uid == os.geteuid():
        return True
    gid = shared_gid()
    return gid is not None and st.st_gid == gid


def symlinks_below(root: Path) -> list[str]:
    """Every symlink in a tree (not followed), relative to root: a staging tree must hold none before commit."""
    found = []
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                found.append(os.path.relpath(full, root))
    return found
