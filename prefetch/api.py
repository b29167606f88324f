"""`prefetch.warm` and `prefetch.resolve`: the library functions the CLI, the node agent and serving all call.

Data flows one way (DESIGN.md): URI -> identify -> store.lookup (hit: done) -> locate -> transfer into
staging -> verify + atomic commit -> (convert -> derived/) -> local path.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from . import metrics
from .config import Settings
from .errors import NoSpace, TransientOrUnreachable
from .lifecycle import Lease
from .redact import redact_obj, redact_uri
from .store import MANIFEST, Manifest, Store
from .transfer import TransferConfig, TransferManager
from .uri import Resolved, identify, locate, resolve  # noqa: F401  (resolve is re-exported)

Progress = Callable[[int, int], None]   # (bytes done, bytes total), called from worker threads
INFLIGHT = ".inflight.json"             # in a staging dir: what is being fetched (read by `status`)


@dataclasses.dataclass(frozen=True)
class Warmed:
    path: Path                 # local directory to load from (objects/<key> or derived/<key>/<format>-<id>)
    key: str
    bytes: int                 # size of the cached artifact
    from_cache: bool           # True: nothing was downloaded by this call
    resolved: Resolved
    format: str = "native"
    seconds: float = 0.0
    origin_bytes: int = 0      # bytes this call pulled from the origin
    source_path: Path | None = None   # the native object, when path is a derived one

    def to_dict(self) -> dict:
        return redact_obj({"uri": self.resolved.uri, "key": self.key, "path": str(self.path), "bytes": self.bytes,
                "from_cache": self.from_cache, "format": self.format, "seconds": round(self.seconds, 4),
                "origin_bytes": self.origin_bytes, "name": self.resolved.name, "version": self.resolved.version,
                "run_id": self.resolved.run_id, "model_id": self.resolved.model_id,
                "offline": self.resolved.offline, "note": self.resolved.note})


def warm(uri: str, format: str = "native", *, settings: Settings | None = None, progress: Progress | None = None,
         convert_options: dict | None = None) -> Warmed:
    """Make uri's artifacts present on this node's disk (once per node, whatever the number of callers)."""
    settings = settings or Settings.load()
    store = Store(settings.cache_dir)
    started = time.monotonic()
    resolved = identify(uri, settings, store)
    # A conversion reads the native object after this returns: lease it first so eviction cannot take it.
    lease = Lease.acquire(store, resolved.key, holder=f"warm --format {format}") if format != "native" else None
    try:
        manifest = store.lookup(resolved.key)
        origin_bytes, fetched = 0, False
        if manifest is None:
            with store.lock(resolved.key):
                manifest = store.lookup(resolved.key)   # another process may have finished while we waited
                if manifest is None:
                    metrics.record_miss()
                    fetch_started = time.monotonic()
                    manifest, origin_bytes = _fetch(resolved, settings, store, progress)
                    metrics.record_download(time.monotonic() - fetch_started, origin_bytes)
                    fetched = True
        if not fetched:
            metrics.record_hit()
        resolved = _complete(resolved, manifest)
        path = store.paths.object_dir(resolved.key)
        warmed = Warmed(path, resolved.key, manifest.bytes, origin_bytes == 0, resolved, "native",
                        time.monotonic() - started, origin_bytes)
        if format != "native":
            from .convert import ensure_converted

            warmed = ensure_converted(warmed, format, store, manifest, convert_options or {})
            warmed = dataclasses.replace(warmed, seconds=time.monotonic() - started)
        return warmed
    finally:
        if lease is not None:
            lease.release()


def _complete(resolved: Resolved, manifest: Manifest) -> Resolved:
    """Fill the ids a cheap identify() did not ask the registry for, from the manifest."""
    fields = {k: manifest.resolved.get(k) for k in ("name", "version", "run_id", "model_id")
              if getattr(resolved, k) is None and manifest.resolved.get(k) is not None}
    if resolved.storage_uri is None:
        fields["storage_uri"] = manifest.source
    return dataclasses.replace(resolved, **fields) if fields else resolved


def _fetch(resolved: Resolved, settings: Settings, store: Store, progress: Progress | None) -> tuple[Manifest, int]:
    """Miss path, with the key's lock held: locate, check space, download into staging, commit."""
    source, files, resolved = locate(resolved, settings)
    total = sum(f.size for f in files)
    staging = store.staging_for(resolved.key)
    wrote_anything = False
    try:
        _ensure_space(store, settings, total, staging, resolved)
        from . import records

        inflight = {"uri": redact_uri(resolved.uri), "key": resolved.key, "bytes": total,
                    "started_at": time.time(), **records.holder_fields()}
        (staging / INFLIGHT).write_text(json.dumps(inflight))
        records.keep_alive(staging / INFLIGHT, inflight["ttl"])   # expires if this process dies or freezes
        counter = _Counter(total, progress)
        entries = TransferManager(source, TransferConfig.from_settings(settings), [counter]).download(files, staging)
        wrote_anything = True
        records.release(staging / INFLIGHT)
        (staging / INFLIGHT).unlink()
        manifest = Manifest(
            key=resolved.key, uri=resolved.uri, source=resolved.storage_uri or resolved.uri,
            identity=resolved.identity,
            resolved={k: getattr(resolved, k) for k in ("name", "version", "run_id", "model_id", "kind")},
            files=entries, created_at=time.time())
        store.commit(staging, manifest)
        return manifest, counter.fetched
    except BaseException as e:
        from . import records

        records.release(staging / INFLIGHT)
        # A download the origin cut off halfway keeps its staging dir so the next try resumes; anything
        # else (bad listing, no space, integrity, ^C before any byte) leaves nothing behind.
        if not (isinstance(e, TransientOrUnreachable) and _staged_bytes(staging) > 0) or wrote_anything:
            store.discard_staging(staging)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            # The disk filled outside transfer's own writes (a .part.chunks log, the manifest, a mkdir).
            raise NoSpace(f"disk full while writing into {store.root}", resolved.uri) from None
        raise


class _Counter:
    def __init__(self, total: int, progress: Progress | None):
        self.total, self.progress, self.done, self.fetched = total, progress, 0, 0
        self.lock = threading.Lock()

    def __call__(self, n: int, fetched: bool = True) -> None:
        with self.lock:
            self.done += n
            self.fetched += n if fetched else 0
            done = self.done
        if self.progress:
            self.progress(done, self.total)


def _staged_bytes(staging: Path) -> int:
    total = 0
    for dirpath, _d, files in os.walk(staging):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def _ensure_space(store: Store, settings: Settings, needed: int, staging: Path, resolved: Resolved) -> None:
    """Refuse before the first byte when the disk (or the cache cap) cannot take the artifact."""
    from . import lifecycle

    needed = max(0, needed - _staged_bytes(staging))
    # Evicts LRU objects for the cap and for the disk, or raises NoSpace naming the sizes.
    lifecycle.make_room(store, settings, needed, protect={resolved.key}, uri=resolved.uri)
    free = shutil.disk_usage(store.root).free
    if needed > free:   # the disk shrank between the two looks (another writer): still refuse before any byte
        raise NoSpace(f"needs {lifecycle.human(needed)}, {lifecycle.human(free)} free on {store.root}", resolved.uri)


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    key: str
    uri: str
    files: int
    bad: list[str]              # paths whose size or sha256 differed (or were missing)
    repaired: bool

    @property
    def ok(self) -> bool:
        return not self.bad or self.repaired

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"ok": self.ok}


def verify(key: str | None = None, *, repair: bool = True, settings: Settings | None = None) -> list[VerifyReport]:
    """Re-hash cached objects against their manifests; re-fetch the damaged files from the origin if asked."""
    settings = settings or Settings.load()
    store = Store(settings.cache_dir)
    keys = [store.resolve_key(key)] if key else store.keys()
    reports = []
    for k in keys:
        manifest = store.lookup(k, touch=False)
        if manifest is None:
            if not store.paths.object_dir(k).exists():   # its manifest was unreadable: just quarantined
                reports.append(VerifyReport(k, "", 0, [MANIFEST], False))
            continue
        bad = store.verify(k)
        repaired = False
        if bad and repair:
            _repair(store, settings, manifest, set(bad))
            repaired = not store.verify(k)
        reports.append(VerifyReport(k, redact_uri(manifest.uri), len(manifest.files), bad, repaired))
    return reports


def _repair(store: Store, settings: Settings, manifest: Manifest, bad: set[str]) -> None:
    """Build a fresh tree in staging (good files hard-linked, bad ones fetched again), then swap it in."""
    from .errors import IntegrityError
    from .sources import open_source
    from .registry import tracking_uri

    with store.lock(manifest.key):
        staging = store.paths.new_staging(manifest.key)
        staging.mkdir(parents=True)
        try:
            base = store.paths.object_dir(manifest.key)
            for f in manifest.files:
                if f.path not in bad:
                    (staging / f.path).parent.mkdir(parents=True, exist_ok=True)
                    os.link(base / f.path, staging / f.path)
            source = open_source(manifest.source, settings, tracking_uri())
            fetch = [f for f in manifest.files if f.path in bad]
            fresh = {f.path: f for f in TransferManager(source, TransferConfig.from_settings(settings)).download(fetch, staging)}
            for f in fetch:
                if f.sha256 and fresh[f.path].sha256 != f.sha256:
                    raise IntegrityError(f"{f.path}: the origin now serves different bytes than when cached; "
                                         f"`prefetch rm {manifest.key}` and warm again", manifest.uri)
            store.replace(manifest.key, staging, manifest)
        finally:
            store.discard_staging(staging)


def remove(key: str, settings: Settings | None = None) -> tuple[str, int]:
    """Delete a cached object (and what was derived from it). Returns (full key, bytes freed)."""
    settings = settings or Settings.load()
    store = Store(settings.cache_dir)
    full = store.resolve_key(key)
    return full, store.remove(full)


def list_objects(settings: Settings | None = None) -> list[dict]:
    """What `prefetch ls` shows: one dict per cached object."""
    settings = settings or Settings.load()
    from . import lifecycle

    store = Store(settings.cache_dir)
    pins = lifecycle.pinned_keys(store)
    rows = []
    for m in store.manifests():
        rows.append({"key": m.key, "uri": redact_uri(m.uri), "source": redact_uri(m.source), "name": m.resolved.get("name"),
                     "version": m.resolved.get("version"), "bytes": m.bytes, "files": len(m.files),
                     "created_at": m.created_at, "last_used": store.last_used(m.key),
                     "path": str(store.paths.object_dir(m.key)), "pinned": m.key in pins,
                     "leases": len(lifecycle.active_leases(store, m.key))})
    return rows
