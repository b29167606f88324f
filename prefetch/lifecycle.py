"""Cache lifecycle: size cap with LRU eviction, pins, leases for models in use, the free-space guard, gc.

On-disk additions to the store (DESIGN.md "Node-local store"):

    pins/<key>.json                          an operator or the daemon wants this object kept
    leases/<key>/<host>-<pid>-<rand>.json    a live process (a Serve replica, a conversion) uses this object

Rules:
- An object is never evicted while it is pinned, leased by a live holder, or in `protect` (what the caller is
  about to write). Pins and leases may name keys that are not cached yet: pinning or leasing *before* warming
  is how a caller closes the window between "committed" and "protected".
- A lease counts while its holder lives (prefetch/records.py): its heartbeat (renewed by the holder) is younger
  than its TTL wherever it was written; on this host also same boot, the pid exists, is not a zombie, and
  started when the lease says (pid reuse); a Ray actor -> also not DEAD in the GCS (asked only when ray is
  already initialized in this process).
- Eviction takes the victim's lock without waiting (a warm or a repair of that key is in progress: skip it),
  moves the object and derived/<key> to trash/, looks at the leases again, and puts everything back if a lease
  appeared meanwhile. A reader therefore either sees its lease honoured or finds the object gone and warms again.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Iterable

from . import records
from .config import Settings
from .config import human_bytes as human
from .errors import NoSpace
from .store import Store

INFLIGHT = ".inflight.json"   # same name as api.INFLIGHT (api imports us lazily; no import cycle here)
_DERIVED_STAGING = re.compile(r"^derived-(?P<key>.+--[0-9a-f]{16})-(?P<fid>.+)\.[0-9a-f]{8}$")


def _store(store: Store | Path | str) -> Store:
    return store if isinstance(store, Store) else Store(store)


# -- process liveness ------------------------------------------------------------------------------------------
def _hostname() -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", socket.gethostname()) or "host"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    return records.proc_stat(pid)


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True if pid runs on this host (and, given its recorded start time, is still the same process).
    pid <= 0 is never alive (prefetch/records.py)."""
    return records.pid_alive(pid, start)


def _ray_actor_state() -> tuple[str | None, str | None]:
    """(actor id, node id) when called inside a Ray actor; never imports ray itself."""
    ray = sys.modules.get("ray")
    try:
        if ray is None or not ray.is_initialized():
            return None, None
        ctx = ray.get_runtime_context()
        return ctx.get_actor_id(), ctx.get_node_id()
    except Exception:  # noqa: BLE001 - liveness metadata is best effort
        return None, None


def _ray_actor_dead(actor_id: str) -> bool | None:
    """True/False when this process is connected to Ray and the GCS knows the actor; None otherwise.
    Uses the GCS actor table (ray._private.state) because the public state API needs the dashboard."""
    ray = sys.modules.get("ray")
    try:
        if ray is None or not ray.is_initialized():
            return None
        from ray._private import state

        info = state.actors(actor_id=actor_id)
    except Exception:  # noqa: BLE001 - another cluster, a disconnected worker: fall back to the pid
        return None
    if not info:
        return None
    return info.get("State") == "DEAD"


def holder_alive(doc: dict) -> bool:
    """Does the process (or Ray actor) that wrote this lease still live?"""
    if doc.get("actor_id") and _ray_actor_dead(doc["actor_id"]) is True:
        return False
    # Heartbeat within its TTL wherever it was written; on this host also boot id, pid and start time.
    return records.record_alive(doc, doc.get("path"))


# -- leases ----------------------------------------------------------------------------------------------------
def _lease_dir(store: Store, key: str) -> Path:
    return store.root / "leases" / key


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
        actor_id, node_id = _ray_actor_state()
        doc = {"key": key, "holder": holder, "actor_id": actor_id, "node_id": node_id, **records.holder_fields()}
        name = f"{_hostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        directory = _lease_dir(store, key)
        for attempt in range(5):   # gc may remove an empty lease dir between our mkdir and our write
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / f".{name}.tmp"
            try:
                tmp.write_text(json.dumps(doc, sort_keys=True))
                os.replace(tmp, directory / name)
                records.keep_alive(directory / name, doc["ttl"])   # the heartbeat: renewed until release()
                break
            except FileNotFoundError:
                if attempt == 4:
                    raise
        store.touch(key)   # being loaded is being used (LRU)
        return cls(directory / name, key, doc)

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
    directory = _lease_dir(store, key)
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
    """The leases on key whose holder is alive (each: pid, host, holder, created_at, actor_id, path)."""
    return [d for d in _read_leases(_store(store), key) if holder_alive(d)]


def dead_leases(store: Store | Path | str) -> list[dict]:
    """Leases, on any key, whose holder is gone (what `gc` removes)."""
    store = _store(store)
    root = store.root / "leases"
    if not root.is_dir():
        return []
    return [d for sub in sorted(root.iterdir()) if sub.is_dir()
            for d in _read_leases(store, sub.name) if not holder_alive(d)]


def leased_keys(store: Store | Path | str) -> set[str]:
    store = _store(store)
    root = store.root / "leases"
    if not root.is_dir():
        return set()
    return {sub.name for sub in root.iterdir() if sub.is_dir() and active_leases(store, sub.name)}


# -- pins ------------------------------------------------------------------------------------------------------
def _pin_path(store: Store, key: str) -> Path:
    return store.root / "pins" / f"{key}.json"


def pin(store: Store | Path | str, key: str, uri: str | None = None) -> bool:
    """Keep key whatever the cap (it may be pinned before it is cached). Returns False if it already was."""
    store = _store(store)
    path = _pin_path(store, key)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    from .redact import redact_uri

    tmp.write_text(json.dumps({"key": key, "uri": redact_uri(uri) if uri else uri, "pinned_at": time.time()},
                              sort_keys=True))
    os.replace(tmp, path)
    return True


def unpin(store: Store | Path | str, key: str) -> bool:
    """Let key be evicted again. Returns False if it was not pinned."""
    try:
        _pin_path(_store(store), key).unlink()
        return True
    except FileNotFoundError:
        return False


def pinned_keys(store: Store | Path | str) -> set[str]:
    root = _store(store).root / "pins"
    if not root.is_dir():
        return set()
    return {p.name[: -len(".json")] for p in root.glob("*.json") if not p.name.startswith(".")}


def is_pinned(store: Store | Path | str, key: str) -> bool:
    return _pin_path(_store(store), key).exists()


# -- usage -----------------------------------------------------------------------------------------------------
def tree_bytes(path: Path) -> int:
    """Bytes a tree occupies: its files' sizes, except that a sparse file (a ranged download's .part, truncated
    to its final size up front) counts only the blocks it really holds, like api._staged_bytes does."""
    total = 0
    for dirpath, _d, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except FileNotFoundError:
                continue
            total += min(st.st_size, st.st_blocks * 512)
    return total


def object_bytes(store: Store, key: str) -> int:
    """What evicting key frees: the object and everything derived from it."""
    return tree_bytes(store.paths.object_dir(key)) + tree_bytes(store.root / "derived" / key)


def _inflight(staging: Path) -> dict | None:
    """The in-flight record of a staging dir whose downloader is alive, else None."""
    try:
        doc = json.loads((staging / INFLIGHT).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if records.record_alive(doc, staging / INFLIGHT) else None


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
            here = tree_bytes(d)
            staging_bytes += here
            doc = _inflight(d)
            if doc is not None:
                inflight += 1
                if doc.get("key") not in exclude:
                    reserved += max(0, int(doc.get("bytes", 0)) - here)
    return Usage(tree_bytes(store.root / "objects"), tree_bytes(store.root / "derived"), staging_bytes, reserved,
                 inflight)


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
    (its lock is busy, or it is pinned or leased)."""
    from filelock import Timeout

    lock = store.lock(key, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return None
    try:
        if is_pinned(store, key) or active_leases(store, key):
            return None
        size = object_bytes(store, key)
        moved: list[tuple[Path, Path]] = []
        trash_root = store.paths.trash()
        trash_root.mkdir(parents=True, exist_ok=True)
        for path in (store.paths.object_dir(key), store.root / "derived" / key):
            if path.exists():
                trash = trash_root / f"{key}.{uuid.uuid4().hex[:8]}"
                os.rename(path, trash)            # atomic disappearance; the slow delete comes after
                moved.append((path, trash))
        if is_pinned(store, key) or active_leases(store, key):
            for path, trash in reversed(moved):   # a lease arrived while we moved it: it wins
                os.rename(trash, path)
            return None
        for _path, trash in moved:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        lock.release()
    from . import metrics

    metrics.record_eviction(size)
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
              dry_run: bool = False, strict: bool = True) -> list[Eviction]:
    """Make `needed` more bytes fit, before any byte of them is written.

    Cap (settings.max_bytes): when used + needed would pass max_bytes * high_watermark, evict LRU candidates
    down to max_bytes * low_watermark - needed. Disk: when the filesystem's free space (minus what other live
    downloads still have to write) cannot take `needed`, evict more. If even evicting every candidate cannot
    make it fit, nothing is evicted and NoSpace says why (strict; `gc` passes strict=False to evict what it can).
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


def _staging_lock_name(name: str) -> str:
    m = _DERIVED_STAGING.match(name)
    if m:
        return f"{m['key']}.{m['fid']}"   # a conversion in progress locks "<key>.<format id>"
    return name.rsplit(".", 1)[0]         # a download locks "<key>"


def gc(store: Store, settings: Settings, *, dry_run: bool = False, staging_age: float = 3600.0) -> list[GcAction]:
    """Enforce the cap now; drop stale staging dirs, dead leases, trash leftovers and orphaned derived dirs."""
    actions: list[GcAction] = []
    now = time.time()

    for e in make_room(store, settings, 0, set(), dry_run=dry_run, strict=False):
        actions.append(GcAction("evict", e.key, e.bytes, e.done, e.uri or ""))

    root = store.paths.staging_root()
    if root.is_dir():
        for d in sorted(root.iterdir()):
            age = now - _newest_mtime(d)
            if age < staging_age or _inflight(d) is not None or not _lock_free(store, _staging_lock_name(d.name)):
                continue
            size = tree_bytes(d)
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
            actions.append(GcAction("staging", str(d), size, not dry_run, f"untouched for {age / 60:.0f} min"))

    for doc in dead_leases(store):
        if not dry_run:
            Path(doc["path"]).unlink(missing_ok=True)
        actions.append(GcAction("lease", doc["key"], 0, not dry_run,
                                f"holder {doc.get('holder') or ''} pid {doc.get('pid')} on {doc.get('host')} is gone"))
    leases_root = store.root / "leases"
    if leases_root.is_dir() and not dry_run:
        for sub in leases_root.iterdir():
            try:
                sub.rmdir()               # only succeeds when empty
            except OSError:
                pass

    trash = store.paths.trash()
    if trash.is_dir():
        for t in sorted(trash.iterdir()):
            if not _lock_free(store, t.name.rsplit(".", 1)[0]):
                continue                  # an eviction or rm of that key is in progress (and may restore it)
            size = tree_bytes(t)
            if not dry_run:
                shutil.rmtree(t, ignore_errors=True)
            actions.append(GcAction("trash", str(t), size, not dry_run))

    derived = store.root / "derived"
    if derived.is_dir():
        keep = pinned_keys(store)
        for d in sorted(derived.iterdir()):
            key = d.name
            if store.paths.object_dir(key).exists() or key in keep or active_leases(store, key):
                continue
            if not _lock_free(store, key):
                continue
            size = tree_bytes(d)
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
            actions.append(GcAction("derived-orphan", key, size, not dry_run, "its source object is gone"))
    return actions


# -- naming things on the command line -------------------------------------------------------------------------
def key_for(store: Store, settings: Settings, target: str) -> tuple[str, str | None, bool]:
    """(key, uri or None, cached) for what a user typed: a key or unique key prefix among cached and pinned keys,
    else a URI (resolved with uri.identify: no network for pinned registry versions)."""
    from .errors import BadURI
    from .uri import identify

    if ":" not in target and "/" not in target:
        known = set(store.keys()) | pinned_keys(store)
        if target in known:
            return target, None, store.paths.manifest(target).exists()
        matches = sorted(k for k in known if k.startswith(target))
        if len(matches) > 1 and not Path(target).exists():
            raise BadURI(f"key prefix is ambiguous ({len(matches)} keys match)", target)
        if len(matches) == 1 and not Path(target).exists():
            return matches[0], None, store.paths.manifest(matches[0]).exists()
    resolved = identify(target, settings, store)
    return resolved.key, target, store.paths.manifest(resolved.key).exists()


def pins(store: Store | Path | str) -> list[dict]:
    """Every pin: key, uri (as given when pinned, may be None), pinned_at."""
    root = _store(store).root / "pins"
    out = []
    for p in sorted(root.glob("*.json")) if root.is_dir() else []:
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def unpin_target(store: Store, settings: Settings, target: str) -> list[str]:
    """Unpin what target names: a key, or a URI (the pins made with that very URI, e.g. an older version that
    models:/m/latest pointed to when it was pinned, and the key it names now). Returns the keys unpinned."""
    from .errors import PrefetchError

    from .redact import redact_uri

    keys = {p["key"] for p in pins(store) if p.get("uri") in (target, redact_uri(target))}
    try:
        keys.add(key_for(store, settings, target)[0])
    except PrefetchError:
        if not keys:          # nothing recorded under that URI either: say why it could not be named
            raise
    return sorted(k for k in keys if unpin(store, k))
