"""Cache lifecycle: size cap with LRU eviction, pins, leases for models in use, the free-space guard, gc.

On-disk additions to the store (DESIGN.md "Node-local store"):

    pins/<key>.json                          an operator or the daemon wants this object kept
    leases/<key>/<host>-<pid>-<rand>.json    a live process (a Serve replica, a conversion) uses this object

Rules:
- An object is never evicted while it is pinned, leased by a live holder, or in `protect` (what the caller is
  about to write). Pins and leases may name keys that are not cached yet: pinning or leasing *before* warming
  is how a caller closes the window between "committed" and "protected".
- A lease counts while its holder lives (prefetch/store/records.py): its heartbeat (renewed by the holder) is
  younger than its TTL wherever it was written; on this host also same boot, the pid exists, is not a zombie, and
  started when the lease says (pid reuse); and a registered probe (register_holder_hooks: the cluster layer's Ray
  actor check) does not know it dead.
- Eviction takes the victim's lock without waiting (a warm or a repair of that key is in progress: skip it),
  moves the object and derived/<key> to trash/, looks at the leases again, and puts everything back if a lease
  appeared meanwhile. A reader therefore either sees its lease honoured or finds the object gone and warms again.

Every path comes from StorePaths (paths.py). This module imports no ray and no metrics: eviction returns what it
freed, and its callers count it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

from ..config import Settings
from ..config import human_bytes as human
from ..errors import NoSpace
from . import records
from .paths import INFLIGHT
from .store import Store, allocated_bytes


def _store(store: Store | Path | str) -> Store:
    return store if isinstance(store, Store) else Store(store)


# -- process liveness ------------------------------------------------------------------------------------------
def _hostname() -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", socket.gethostname()) or "host"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    return records.proc_stat(pid)


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True if pid runs on this host (and, given its recorded start time, is still the same process).
    pid <= 0 is never alive (prefetch/store/records.py)."""
    return records.pid_alive(pid, start)


# -- who holds a lease, beyond host and pid: hooks the cluster layer registers -----------------------------------
_identity: Callable[[], dict] | None = None
_probe: Callable[[dict], bool | None] | None = None


def register_holder_hooks(identity: Callable[[], dict] | None = None,
                          probe: Callable[[dict], bool | None] | None = None) -> None:
    """Let the layer above describe and check lease holders this module cannot (e.g. a Ray actor).

    identity() returns extra fields stored in each lease doc written by this process; probe(doc) says whether a
    lease's holder is known dead (True), alive (False) or cannot tell (None: host and pid decide). Replaces both
    hooks; None means no hook (a lease is then judged by its host and pid alone)."""
    global _identity, _probe
    _identity, _probe = identity, probe


def _holder_identity() -> dict:
    if _identity is None:
        return {}
    try:
        return dict(_identity())
    except Exception:  # noqa: BLE001 - holder metadata is best effort; the lease itself must be taken
        return {}


def _probe_dead(doc: dict) -> bool:
    try:
        return _probe(doc) is True
    except Exception:  # noqa: BLE001 - a probe that cannot tell leaves the verdict to host and pid
        return False


def holder_alive(doc: dict) -> bool:
    """Does the process (or, with a probe registered, the actor) that wrote this lease still live?"""
    if _probe is not None and _probe_dead(doc):
        return False
    # Heartbeat within its TTL wherever it was written; on this host also boot id, pid and start time.
    return records.record_alive(doc, doc.get("path"))


# -- leases ----------------------------------------------------------------------------------------------------
class Lease:
    """A live process's claim on an object: while it holds one, the object is not evicted.

        with Lease.acquire(cache_dir, key, holder="replica fraud#3"):
            model = load(path)        # or keep it for the life of the process; a dead holder stops counting
    """

    def __init__(self, path: Path, key: str, doc: dict):
        self.path = path
        self.key = key
        self.doc = doc
        self._released = False

    @classmethod
    def acquire(cls, store_root: Path | str | Store, key: str, holder: str | None = None) -> "Lease":
        store = _store(store_root)
        doc = {**_holder_identity(), "key": key, "holder": holder, **records.holder_fields()}
        path = store.paths.new_lease(key, _hostname(), os.getpid())
        for attempt in range(5):   # gc may remove an empty lease dir between our mkdir and our write
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                tmp.write_text(json.dumps(doc, sort_keys=True))
                os.replace(tmp, path)
                records.keep_alive(path, doc["ttl"])   # the heartbeat: renewed until release()
                break
            except FileNotFoundError:
                if attempt == 4:
                    raise
        store.touch(key)   # being loaded is being used (LRU)
        return cls(path, key, doc)

    def release(self) -> None:
        """Drop the claim. Idempotent."""
        if self._released:
            return
        self._released = True
        records.release(self.path)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    @property
    def released(self) -> bool:
        return self._released

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease({self.key!r}, {self.path.name}{', released' if self._released else ''})"


def _read_leases(store: Store, key: str) -> list[dict]:
    directory = store.paths.lease_dir(key)
    out = []
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return []
    for p in paths:
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue                              # released while we listed, or a torn write of a dying process
        out.append({**doc, "path": str(p)})
    return out


def active_leases(store: Store | Path | str, key: str) -> list[dict]:
    """The leases on key whose holder is alive (each: pid, host, holder, created_at, path, and what the
    identity hook added, e.g. actor_id)."""
    return [d for d in _read_leases(_store(store), key) if holder_alive(d)]


def dead_leases(store: Store | Path | str) -> list[dict]:
    """Leases, on any key, whose holder is gone (what `gc` removes)."""
    store = _store(store)
    root = store.paths.leases_root()
    if not root.is_dir():
        return []
    return [d for sub in sorted(root.iterdir()) if sub.is_dir()
            for d in _read_leases(store, sub.name) if not holder_alive(d)]


def leased_keys(store: Store | Path | str) -> set[str]:
    store = _store(store)
    root = store.paths.leases_root()
    if not root.is_dir():
        return set()
    return {sub.name for sub in root.iterdir() if sub.is_dir() and active_leases(store, sub.name)}


# -- pins ------------------------------------------------------------------------------------------------------
def pin(store: Store | Path | str, key: str, uri: str | None = None) -> bool:
    """Keep key whatever the cap (it may be pinned before it is cached). Returns False if it already was."""
    store = _store(store)
    path = store.paths.pin(key)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    from ..redact import redact_uri

    tmp.write_text(json.dumps({"key": key, "uri": redact_uri(uri) if uri else uri, "pinned_at": time.time()},
                              sort_keys=True))
    os.replace(tmp, path)
    return True


def unpin(store: Store | Path | str, key: str) -> bool:
    """Let key be evicted again. Returns False if it was not pinned."""
    try:
        _store(store).paths.pin(key).unlink()
        return True
    except FileNotFoundError:
        return False


def pinned_keys(store: Store | Path | str) -> set[str]:
    paths = _store(store).paths
    root = paths.pins_root()
    if not root.is_dir():
        return set()
    return {key for p in root.glob("*.json") if (key := paths.pin_key(p)) is not None}


def is_pinned(store: Store | Path | str, key: str) -> bool:
    return _store(store).paths.pin(key).exists()


# -- usage -----------------------------------------------------------------------------------------------------
def object_bytes(store: Store, key: str) -> int:
    """What evicting key frees: the object and everything derived from it."""
    return allocated_bytes(store.paths.object_dir(key)) + allocated_bytes(store.paths.derived_key_dir(key))


def _inflight(store: Store, staging: Path) -> dict | None:
    """The in-flight record of a staging dir whose downloader is alive, else None."""
    try:
        doc = json.loads(store.paths.inflight(staging).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if records.record_alive(doc, store.paths.inflight(staging)) else None


@dataclasses.dataclass(frozen=True)
class Usage:
    objects: int       # committed objects
    derived: int       # converted artifacts
    staging: int       # bytes already in staging dirs (downloads and conversions in progress, or left over)
    reserved: int      # bytes other live downloads declared and have not written yet
    inflight: int      # number of live downloads

    @property
    def total(self) -> int:
        return self.objects + self.derived + self.staging + self.reserved


def usage(store: Store | Path | str, exclude: Iterable[str] = ()) -> Usage:
    """Bytes the cache holds or has promised to concurrent downloads (except those of `exclude` keys)."""
    store = _store(store)
    exclude = set(exclude)
    staging_bytes = reserved = inflight = 0
    root = store.paths.staging_root()
    if root.is_dir():
        for d in root.iterdir():
            here = allocated_bytes(d)
            staging_bytes += here
            doc = _inflight(store, d)
            if doc is not None:
                inflight += 1
                if doc.get("key") not in exclude:
                    reserved += max(0, int(doc.get("bytes", 0)) - here)
    return Usage(allocated_bytes(store.paths.objects_root()), allocated_bytes(store.paths.derived_root()),
                 staging_bytes, reserved, inflight)


def inflight_downloads(store: Store) -> list[dict]:
    """One row per staging dir that declares a download: uri, key, bytes, done, progress (0..1), pid, alive.
    `alive` False means a download was cut off (a crash, a kill): the next warm of that key resumes it."""
    root = store.paths.staging_root()
    rows = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return rows
    now = time.time()
    for d in entries:
        try:
            doc = json.loads(store.paths.inflight(d).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        total = int(doc.get("bytes") or 0)
        done = allocated_bytes(d, skip=(INFLIGHT,))   # the bytes of the download, not of its record
        pid = int(doc.get("pid") or -1)
        started = doc.get("started_at")
        rows.append({"uri": doc.get("uri"), "key": doc.get("key"), "bytes": total, "done": done,
                     "progress": round(min(1.0, done / total), 4) if total else None,
                     "pid": pid, "alive": records.record_alive(doc, store.paths.inflight(d)), "started_at": started,
                     "seconds": round(now - started, 1) if started else None, "staging": d.name})
    return rows


# -- eviction --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Candidate:
    key: str
    bytes: int
    last_used: float
    uri: str | None = None


def candidates(store: Store, protect: Iterable[str] = ()) -> list[Candidate]:
    """Evictable objects, least recently used first: not pinned, not leased, not protected."""
    keep = set(protect) | pinned_keys(store)
    out = []
    for key in store.keys():
        if key in keep or active_leases(store, key):
            continue
        manifest = store.lookup(key, touch=False)
        out.append(Candidate(key, object_bytes(store, key), store.last_used(key), manifest.uri if manifest else None))
    return sorted(out, key=lambda c: (c.last_used, c.key))


def evict(store: Store, key: str) -> int | None:
    """Remove one object and its derived artifacts if nobody holds it. Returns bytes freed, or None if skipped
    (its lock is busy, or it is pinned or leased). The caller counts it (metrics.record_eviction)."""
    lock = store.try_lock(key)
    if lock is None:
        return None
    try:
        if is_pinned(store, key) or active_leases(store, key):
            return None
        size = object_bytes(store, key)
        moved: list[tuple[Path, Path]] = []
        trash_root = store.paths.trash()
        trash_root.mkdir(parents=True, exist_ok=True)
        for path in (store.paths.object_dir(key), store.paths.derived_key_dir(key)):
            if path.exists():
                trash = store.paths.new_trash(key)
                os.rename(path, trash)            # atomic disappearance; the slow delete comes after
                moved.append((path, trash))
        if is_pinned(store, key) or active_leases(store, key):
            for path, trash in reversed(moved):   # a lease arrived while we moved it: it wins
                os.rename(trash, path)
            return None
        for _path, trash in moved:
            shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(store.paths.profiles(key), ignore_errors=True)   # measured for what is gone
    finally:
        lock.release()
    return size


@dataclasses.dataclass
class Eviction:
    key: str
    bytes: int
    last_used: float
    uri: str | None
    done: bool          # False in a dry run

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_room(store: Store, settings: Settings, needed: int, protect: set[str], *, uri: str | None = None,
              dry_run: bool = False, strict: bool = True,
              on_evict: Callable[[Eviction], None] | None = None) -> list[Eviction]:
    """Make `needed` more bytes fit, before any byte of them is written.

    Cap (settings.max_bytes): when used + needed would pass max_bytes * high_watermark, evict LRU candidates
    down to max_bytes * low_watermark - needed. Disk: when the filesystem's free space (minus what other live
    downloads still have to write) cannot take `needed`, evict more. If even evicting every candidate cannot
    make it fit, nothing is evicted and NoSpace says why (strict; `gc` passes strict=False to evict what it can).
    on_evict is called at once for each object really evicted (how the caller counts evictions in its metrics,
    including those done before a NoSpace).
    """
    usage_now = usage(store, exclude=protect)
    used = usage_now.total
    pool = candidates(store, protect)
    evictable = sum(c.bytes for c in pool)
    goal = 0                                      # bytes to free, from the LRU end of the pool

    cap = settings.max_bytes
    if cap:
        if needed > cap and strict:
            raise NoSpace(f"needs {human(needed)} but the cache cap (PREFETCH_MAX_BYTES) is {human(cap)}", uri)
        if used + needed > cap * settings.high_watermark:
            must = used + needed - cap                                        # to fit under the cap at all
            want = used - max(0, int(cap * settings.low_watermark) - needed)  # to reach the low watermark
            if must > evictable and strict:
                raise NoSpace(f"needs {human(needed)}; the cache holds {human(used)} of its "
                              f"{human(cap)} cap (PREFETCH_MAX_BYTES) and only {human(evictable)} is evictable "
                              f"(the rest is pinned, leased or in use)", uri)
            goal = max(must, want)

    free = shutil.disk_usage(store.root).free - usage_now.reserved
    if needed > free + goal:
        if needed > free + evictable and strict:
            raise NoSpace(f"needs {human(needed)} but {store.root} has {human(max(free, 0))} free"
                          + (f" and only {human(evictable)} of cached objects can be evicted" if pool else ""), uri)
        goal = needed - free

    done: list[Eviction] = []
    freed = 0
    for c in pool:                                # LRU first; a busy victim is replaced by the next one
        if freed >= goal:
            break
        if dry_run:
            done.append(Eviction(c.key, c.bytes, c.last_used, c.uri, False))
            freed += c.bytes
            continue
        got = evict(store, c.key)
        if got is not None:
            done.append(Eviction(c.key, got, c.last_used, c.uri, True))
            freed += got
            if on_evict is not None:
                on_evict(done[-1])
    if strict and not dry_run and freed < goal:
        after = usage(store, exclude=protect).total
        free_after = shutil.disk_usage(store.root).free - usage_now.reserved
        if (cap and after + needed > cap) or needed > free_after:
            raise NoSpace(f"needs {human(needed)}; could only free {human(freed)} "
                          f"(other objects are being written or loaded right now)", uri)
    return done


# -- gc --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GcAction:
    kind: str          # evict | staging | lease | trash | derived-orphan
    target: str        # key or path
    bytes: int
    done: bool
    detail: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _newest_mtime(path: Path) -> float:
    newest = 0.0
    for dirpath, _d, files in os.walk(path):
        for name in [*files, "."]:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest


def _lock_free(store: Store, lock_name: str) -> bool:
    """True if nobody holds locks/<lock_name>.lock right now (we take and drop it)."""
    from filelock import Timeout

    lock = store.lock(lock_name, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return False
    lock.release()
    return True


def gc(store: Store, settings: Settings, *, dry_run: bool = False, staging_age: float = 3600.0,
       on_evict: Callable[[Eviction], None] | None = None) -> list[GcAction]:
    """Enforce the cap now; drop stale staging dirs, dead leases, trash leftovers and orphaned derived dirs."""
    actions: list[GcAction] = []
    now = time.time()

    for e in make_room(store, settings, 0, set(), dry_run=dry_run, strict=False, on_evict=on_evict):
        actions.append(GcAction("evict", e.key, e.bytes, e.done, e.uri or ""))

    root = store.paths.staging_root()
    if root.is_dir():
        for d in sorted(root.iterdir()):
            age = now - _newest_mtime(d)
            if (age < staging_age or _inflight(store, d) is not None
                    or not _lock_free(store, store.paths.staging_lock_name(d.name))):
                continue
            size = allocated_bytes(d)
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
            actions.append(GcAction("staging", str(d), size, not dry_run, f"untouched for {age / 60:.0f} min"))

    for doc in dead_leases(store):
        if not dry_run:
            Path(doc["path"]).unlink(missing_ok=True)
        actions.append(GcAction("lease", doc["key"], 0, not dry_run,
                                f"holder {doc.get('holder') or ''} pid {doc.get('pid')} on {doc.get('host')} is gone"))
    leases_root = store.paths.leases_root()
    if leases_root.is_dir() and not dry_run:
        for sub in leases_root.iterdir():
            try:
                sub.rmdir()               # only succeeds when empty
            except OSError:
                pass

    trash = store.paths.trash()
    if trash.is_dir():
        for t in sorted(trash.iterdir()):
            if not _lock_free(store, store.paths.trash_key(t.name)):
                continue                  # an eviction or rm of that key is in progress (and may restore it)
            size = allocated_bytes(t)
            if not dry_run:
                shutil.rmtree(t, ignore_errors=True)
            actions.append(GcAction("trash", str(t), size, not dry_run))

    derived = store.paths.derived_root()
    if derived.is_dir():
        keep = pinned_keys(store)
        for d in sorted(derived.iterdir()):
            key = d.name
            if store.paths.object_dir(key).exists() or key in keep or active_leases(store, key):
                continue
            if not _lock_free(store, key):
                continue
            size = allocated_bytes(d)
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
            actions.append(GcAction("derived-orphan", key, size, not dry_run, "its source object is gone"))
    return actions


# -- the pin records ---------------------------------------------------------------------------------------------
def pins(store: Store | Path | str) -> list[dict]:
    """Every pin: key, uri (as given when pinned, may be None), pinned_at."""
    root = _store(store).paths.pins_root()
    out = []
    for p in sorted(root.glob("*.json")) if root.is_dir() else []:
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out
