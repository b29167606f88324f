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
from .config import Settings, human_bytes
from .errors import IntegrityError, NoSpace, TransientOrUnreachable
from .integrity import OriginChanged
from .redact import redact_obj, redact_uri
from .store import MANIFEST, Manifest, Store, allocated_bytes, lifecycle, records
from .store.manifest import file_matches
from .store.staging import data_dir
from .store.lifecycle import Lease
from .transfer import TransferConfig, TransferManager
from .uri import Resolved, identify, locate, resolve  # noqa: F401  (resolve is re-exported)

Progress = Callable[[int, int], None]   # (bytes done, bytes total), called from worker threads
# Builds the Source a miss reads through so chunks can come from other nodes (prefetch/cluster/peers.py):
# (key, origin source, listing, staging data dir, chunk bytes) -> a Source, or None for the origin alone.
Peers = Callable[[str, object, list, Path, int], object]


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
    peer_bytes: int = 0        # bytes this call got from other nodes' agents instead
    source_path: Path | None = None   # the native object, when path is a derived one

    def to_dict(self) -> dict:
        return redact_obj({"uri": self.resolved.uri, "key": self.key, "path": str(self.path), "bytes": self.bytes,
                "from_cache": self.from_cache, "format": self.format, "seconds": round(self.seconds, 4),
                "origin_bytes": self.origin_bytes, "peer_bytes": self.peer_bytes, "name": self.resolved.name,
                "version": self.resolved.version, "run_id": self.resolved.run_id, "model_id": self.resolved.model_id,
                "offline": self.resolved.offline, "note": self.resolved.note})


def warm(uri: str, format: str = "native", *, settings: Settings | None = None, progress: Progress | None = None,
         convert_options: dict | None = None, peers: Peers | None = None) -> Warmed:
    """Make uri's artifacts present on this node's disk (once per node, whatever the number of callers).

    peers: how a miss may get chunks from other nodes (the node agent passes prefetch.cluster.peers'); None: the
    origin only."""
    settings = settings or Settings.load()
    started = time.monotonic()
    for attempt in range(ORIGIN_RESTARTS + 1):
        try:
            warmed = _warm(uri, format, settings, progress, convert_options, started, peers)
        except OriginChanged as e:
            # The listing changed while we downloaded (a key that hashes the listing): identify it again.
            if attempt == ORIGIN_RESTARTS:
                raise
            changed = e
            continue
        if attempt:
            note = (f"the origin changed during the download ({changed.message}); "
                    "listed again and fetched the new content")
            warmed = dataclasses.replace(warmed, resolved=dataclasses.replace(
                warmed.resolved, note="; ".join(filter(None, [warmed.resolved.note, note]))))
        return warmed
    raise AssertionError("unreachable")


def _warm(uri: str, format: str, settings: Settings, progress: Progress | None, convert_options: dict | None,
          started: float, peers: Peers | None = None) -> Warmed:
    store = Store(settings.cache_dir)
    resolved = identify(uri, settings, store)
    # A conversion reads the native object after this returns: lease it first so eviction cannot take it.
    lease = Lease.acquire(store, resolved.key, holder=f"warm --format {format}") if format != "native" else None
    try:
        manifest = store.lookup(resolved.key)
        got, fetched = None, False
        if manifest is None:
            from .store.locks import key_lock

            with key_lock(store, resolved.key, settings.lock_timeout, resolved.uri):
                manifest = store.lookup(resolved.key)   # another process may have finished while we waited
                if manifest is None:
                    metrics.record_miss()
                    fetch_started = time.monotonic()
                    got = _fetch(resolved, settings, store, progress, peers)
                    manifest = got.manifest
                    notes = list(got.notes)
                    if got.restarted:
                        notes.append(f"fetched again from scratch (changed at the origin or failed its check): "
                                     f"{', '.join(sorted(set(got.restarted)))}")
                    if notes:
                        resolved = dataclasses.replace(resolved, note="; ".join(filter(None, [resolved.note, *notes])))
                    metrics.record_download(time.monotonic() - fetch_started, got.origin_bytes)
                    fetched = True
        if not fetched:
            metrics.record_hit()
        resolved = _complete(resolved, manifest)
        path = store.paths.object_dir(resolved.key)
        warmed = Warmed(path, resolved.key, manifest.bytes, not fetched, resolved, "native",
                        time.monotonic() - started, got.origin_bytes if got else 0, got.peer_bytes if got else 0)
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


ORIGIN_RESTARTS = 3   # listings taken again when objects change under us, before giving up (exit 4)


@dataclasses.dataclass
class _Fetched:
    manifest: Manifest | None = None
    origin_bytes: int = 0
    peer_bytes: int = 0
    restarted: list[str] = dataclasses.field(default_factory=list)   # files fetched again from scratch
    notes: list[str] = dataclasses.field(default_factory=list)       # what the peers said (routed around...)

    def add(self, counter: "_Counter", manager: TransferManager, peer) -> None:
        peer_bytes = getattr(peer, "peer_bytes", 0)
        self.peer_bytes += peer_bytes
        self.origin_bytes += counter.fetched - peer_bytes
        self.restarted += manager.restarted
        self.notes += [n for n in getattr(peer, "notes", []) if n not in self.notes]


def _fetch(resolved: Resolved, settings: Settings, store: Store, progress: Progress | None,
           peers: Peers | None = None) -> _Fetched:
    """Miss path, with the key's lock held: locate, check space, download into staging (through the peers when
    given), commit."""
    staging = store.staging_for(resolved.key)
    got = _Fetched()
    peer = None
    try:
        for attempt in range(ORIGIN_RESTARTS + 1):
            source, files, resolved = locate(resolved, settings)
            total = sum(f.size for f in files)
            _ensure_space(store, settings, total, staging, resolved)
            inflight = {"uri": redact_uri(resolved.uri), "key": resolved.key, "bytes": total,
                        "started_at": time.time(), **records.holder_fields()}
            store.paths.inflight(staging).write_text(json.dumps(inflight))
            records.keep_alive(store.paths.inflight(staging), inflight["ttl"])   # expires if we die or freeze
            counter = _Counter(total, progress)
            peer = peers(resolved.key, source, files, data_dir(staging), settings.chunk_bytes) if peers else None
            manager = TransferManager(peer or source, TransferConfig.from_settings(settings), [counter])
            try:
                entries = manager.download(files, staging)
            except OriginChanged:
                got.add(counter, manager, peer)
                if peer is not None:
                    peer.close()
                    peer = None
                if attempt == ORIGIN_RESTARTS or "files" in resolved.identity:
                    # The key is a hash of the listing (s3://, mlflow-artifacts:/, paths): new content is a new
                    # key, so the whole warm starts again from identify (warm() does it); this staging is moot.
                    store.discard_staging(staging)
                    raise
                # A registry version whose files changed under it: list again; the journal drops what belonged
                # to the old version of each changed file, the rest resumes.
                resolved = dataclasses.replace(resolved, files=None, source=None)
                continue
            got.add(counter, manager, peer)
            break
        records.release(store.paths.inflight(staging))
        store.paths.inflight(staging).unlink()
        manifest = Manifest(
            key=resolved.key, uri=resolved.uri, source=resolved.storage_uri or resolved.uri,
            identity=resolved.identity,
            resolved={k: getattr(resolved, k) for k in ("name", "version", "run_id", "model_id", "kind")},
            files=entries, created_at=time.time())
        store.commit(data_dir(staging), manifest)
        store.discard_staging(staging)
        if peer is not None:
            peer.close(entries)     # a holder of every chunk from now on, served from objects/
        got.manifest = manifest
        return got
    except BaseException as e:
        if peer is not None:
            peer.close()
        records.release(store.paths.inflight(staging))
        # The journal makes any staged byte safe to resume from: keep the staging dir when the origin cut us
        # off or the user pressed ^C; anything else (bad listing, no space, integrity) leaves nothing behind.
        keep = (isinstance(e, (*TransientOrUnreachable, OriginChanged, KeyboardInterrupt))
                and allocated_bytes(staging) > 0)
        if not keep or isinstance(e, IntegrityError):
            store.discard_staging(staging)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            # The disk filled outside transfer's own writes (the journal, the manifest, a mkdir).
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


def _ensure_space(store: Store, settings: Settings, needed: int, staging: Path, resolved: Resolved) -> None:
    """Refuse before the first byte when the disk (or the cache cap) cannot take the artifact."""
    needed = max(0, needed - allocated_bytes(staging))
    # Evicts LRU objects for the cap and for the disk, or raises NoSpace naming the sizes.
    lifecycle.make_room(store, settings, needed, protect={resolved.key}, uri=resolved.uri,
                        on_evict=lambda e: metrics.record_eviction(e.bytes))
    free = shutil.disk_usage(store.root).free
    if needed > free:   # the disk shrank between the two looks (another writer): still refuse before any byte
        raise NoSpace(f"needs {human_bytes(needed)}, {human_bytes(free)} free on {store.root}", resolved.uri)


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    key: str
    uri: str
    files: int
    bad: list[str]              # paths whose size or sha256s differed (or were missing)
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
        data = data_dir(staging)
        data.mkdir(parents=True)
        try:
            base = store.paths.object_dir(manifest.key)
            for f in manifest.files:
                if f.path not in bad:
                    (data / f.path).parent.mkdir(parents=True, exist_ok=True)
                    os.link(base / f.path, data / f.path)
            source = open_source(manifest.source, settings, tracking_uri())
            fetch = [f for f in manifest.files if f.path in bad]
            TransferManager(source, TransferConfig.from_settings(settings)).download(fetch, staging)
            for f in fetch:
                # Against the record the object was committed with (whatever chunk size this transfer used).
                if not file_matches(data / f.path, f):
                    raise IntegrityError(f"{f.path}: the origin now serves different bytes than when cached; "
                                         f"`prefetch rm {manifest.key}` and warm again", manifest.uri)
            store.replace(manifest.key, data, manifest)
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
    store = Store(settings.cache_dir)
    pins = lifecycle.pinned_keys(store)
    rows = []
    for m in store.manifests():
        rows.append({"key": m.key, "uri": redact_uri(m.uri), "source": redact_uri(m.source),
                     "name": m.resolved.get("name"),
                     "version": m.resolved.get("version"), "bytes": m.bytes, "files": len(m.files),
                     "created_at": m.created_at, "last_used": store.last_used(m.key),
                     "path": str(store.paths.object_dir(m.key)), "pinned": m.key in pins,
                     "leases": len(lifecycle.active_leases(store, m.key))})
    return rows


def check_format(format: str) -> str:
    """The format a caller asked for, or BadURI naming the ones there are (before anything is resolved)."""
    from .errors import BadURI
    from .formats import FORMATS

    if format not in FORMATS:
        raise BadURI(f"unknown --format '{format}' ({', '.join(FORMATS[:-1])} or {FORMATS[-1]})")
    return format


_warm_uri = warm   # `pin(..., warm=True)` names its flag after the CLI's --warm, which hides the function


@dataclasses.dataclass(frozen=True)
class Pinned:
    key: str
    uri: str | None            # None when pinned by key
    newly_pinned: bool         # False: it was pinned already
    cached: bool               # the object is on disk now
    warmed: Warmed | None      # the warm this call ran (a URI not cached yet)

    def to_dict(self) -> dict:
        return {"key": self.key, "uri": self.uri, "pinned": True, "newly_pinned": self.newly_pinned,
                "cached": self.cached, "warmed": self.warmed.to_dict() if self.warmed else None}


def pin(target: str, *, warm: bool = True, settings: Settings | None = None,
        progress: Progress | None = None) -> Pinned:
    """Keep an object whatever the cap. A URI not cached yet is pinned first, then warmed (so nothing can evict
    it once committed); if that warm fails, a pin this call added is taken back and the warm's error raised."""
    from . import targets
    from .store import lifecycle

    settings = settings or Settings.load()
    store = Store(settings.cache_dir)
    key, uri, cached = targets.key_for(store, settings, target)
    added = lifecycle.pin(store, key, uri)
    warmed = None
    if not cached and uri is not None and warm:
        try:
            warmed = _warm_uri(uri, settings=settings, progress=progress)
        except BaseException:
            if added:
                lifecycle.unpin(store, key)
            raise
    return Pinned(key, uri, added, cached or warmed is not None, warmed)


def unpin(target: str, *, settings: Settings | None = None) -> list[str]:
    """Let what target names (a key, or the URI it was pinned with) be evicted again. Returns the keys unpinned."""
    from . import targets

    settings = settings or Settings.load()
    return targets.unpin_target(Store(settings.cache_dir), settings, target)


@dataclasses.dataclass(frozen=True)
class GcReport:
    dry_run: bool
    actions: list               # lifecycle.GcAction, in the order gc took them
    used_bytes: int             # what the cache holds afterwards
    max_bytes: int | None       # the cap (None: no cap)

    @property
    def freed_bytes(self) -> int:
        return sum(a.bytes for a in self.actions)

    @property
    def over_cap(self) -> bool:
        """Still over the cap after a real gc: what is left is pinned, leased or being written."""
        return bool(self.max_bytes) and self.used_bytes > self.max_bytes and not self.dry_run

    def to_dict(self) -> dict:
        return {"dry_run": self.dry_run, "actions": [a.to_dict() for a in self.actions],
                "freed_bytes": self.freed_bytes, "used_bytes": self.used_bytes, "max_bytes": self.max_bytes,
                "over_cap": self.over_cap}


def gc(*, dry_run: bool = False, staging_age: float = 3600.0, settings: Settings | None = None) -> GcReport:
    """Enforce the cap now; remove stale staging dirs (untouched for staging_age seconds, no live downloader),
    dead leases, trash and orphaned derived artifacts."""
    from .store import lifecycle

    settings = settings or Settings.load()
    store = Store(settings.cache_dir)
    actions = lifecycle.gc(store, settings, dry_run=dry_run, staging_age=staging_age)
    return GcReport(dry_run, actions, lifecycle.usage(store).total, settings.max_bytes)


def quarantined(settings: Settings | None = None) -> list[dict]:
    """Objects moved aside because their manifest could not be read (key, reason, path, when)."""
    from .store.quarantine import quarantined as held

    settings = settings or Settings.load()
    return held(Store(settings.cache_dir))
