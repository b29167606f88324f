"""NodeAgent: the per-node Ray actor that keeps this node's cache warm. A thin shell over the library.

One detached actor per node, named `prefetch-agent-<node_id>` in the `prefetch` namespace, pinned to its node
(hard node affinity), `num_cpus=0` so it never takes a slot from a replica. It holds no state worth keeping:
everything it knows is on the node's disk (the store), so a killed or restarted agent loses nothing and downloads
nothing again. What it adds to the library:

- `warm` / `warm_for_replica`: `prefetch.warm` run in the agent's process, so replicas on the node (see
  `warm_via_local_agent`) and the agent share one download and `status` shows it;
- `status`: the cache (size, objects), in-flight downloads of *any* process on the node, with progress
  (from the staging dirs' `.inflight.json` and the bytes already allocated there), recent warms, the desired set;
- a desired set (`set_desired`): URIs kept warm and pinned, mutable ones (@alias, latest, a stage) re-resolved
  every interval by a background thread, so a moved alias is fetched with no command.

Ray is imported only inside functions: `import prefetch.agent` stays cheap.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .config import Settings
from .errors import PrefetchError, error_fields  # noqa: F401  (error_fields: re-exported)
from .lifecycle import pin, pins, unpin
from .quarantine import quarantined
from .records import record_alive
from .uri import recheck
from .store import Store

if TYPE_CHECKING:
    from .api import Warmed

NAMESPACE = "prefetch"
AGENT_PREFIX = "prefetch-agent-"
INFLIGHT = ".inflight.json"        # api.INFLIGHT: written by every downloader into its staging dir
AGENT_MAX_CONCURRENCY = 32         # warms of different URIs, status and the replicas' calls run side by side
RECENT = 50                        # warms remembered for `status` (memory only: the disk is the real record)


def agent_name(node_id: str) -> str:
    return f"{AGENT_PREFIX}{node_id}"


# -- in-flight downloads (any process on this node) ------------------------------------------------------------
def _allocated(path: Path) -> int:
    """Bytes really written below path: a ranged download truncates its .part files to full size up front,
    so st_size overstates progress; allocated blocks do not."""
    total = 0
    for dirpath, _d, files in os.walk(path):
        for f in files:
            if f == INFLIGHT:
                continue
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except FileNotFoundError:
                continue
            total += min(st.st_size, st.st_blocks * 512)
    return total


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
            doc = json.loads((d / INFLIGHT).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        total = int(doc.get("bytes") or 0)
        done = _allocated(d)
        pid = int(doc.get("pid") or -1)
        started = doc.get("started_at")
        rows.append({"uri": doc.get("uri"), "key": doc.get("key"), "bytes": total, "done": done,
                     "progress": round(min(1.0, done / total), 4) if total else None,
                     "pid": pid, "alive": record_alive(doc, d / INFLIGHT), "started_at": started,
                     "seconds": round(now - started, 1) if started else None, "staging": d.name})
    return rows


# -- pins kept by the desired set ------------------------------------------------------------------------------
def _pin(store: Store, key: str, uri: str) -> None:
    """Pin what the daemon keeps warm, so eviction never takes the desired set."""
    try:
        pin(store, key, uri=uri)
    except OSError:
        pass   # a pin is a protection, not a precondition of warming


def _unpin_stale(store: Store, uri: str, keep: str | None) -> list[str]:
    """Unpin the objects this URI was pinned for before (its alias moved, or it left the desired set).

    The pin files (`pins/<key>.json`, written by lifecycle.pin with the URI) are the record, so an agent that
    was restarted still finds what its predecessor pinned."""
    released = []
    for doc in pins(store):
        key = doc.get("key")
        if key and doc.get("uri") == uri and key != keep:
            try:
                if unpin(store, key):
                    released.append(key)
            except OSError:
                pass
    return released


def _mutable(uri: str) -> bool:
    try:
        from .uri import parse

        return parse(uri).mutable
    except PrefetchError:
        return False


@dataclasses.dataclass(frozen=True)
class DesiredSet:
    uris: tuple[str, ...] = ()
    interval: float = 60.0
    format: str = "native"
    updated_at: float | None = None

    def to_dict(self) -> dict:
        return {"uris": list(self.uris), "interval": self.interval, "format": self.format,
                "updated_at": self.updated_at}


# -- the actor ---------------------------------------------------------------------------------------------------
class NodeAgent:
    """Run as a Ray actor (see get_or_create_agent); every method is also callable on a plain instance."""

    def __init__(self, node_id: str | None = None):
        from .node import current_node_id

        self.node_id = node_id or current_node_id() or "local"
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._recent: collections.deque[dict] = collections.deque(maxlen=RECENT)
        self._active: dict[int, dict] = {}
        self._next_op = 0
        self._desired = DesiredSet()
        self._desired_rows: dict[str, dict] = {}
        self._passes = 0
        self._last_pass: dict | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._metrics_server = None
        self.metrics_url = self._start_metrics()
        self._loop = threading.Thread(target=self._run_loop, name="prefetch-desired-set", daemon=True)
        self._loop.start()

    # -- identity and health ---------------------------------------------------------------------------------
    @staticmethod
    def _node_ip() -> str | None:
        try:
            import ray

            return ray.util.get_node_ip_address()
        except Exception:
            return None

    def _identity(self) -> dict:
        return {"node_id": self.node_id, "node_ip": self._node_ip(), "cache_dir": str(Settings.load().cache_dir),
                "pid": os.getpid(), "started_at": self.started_at, "metrics_url": self.metrics_url}

    def _start_metrics(self) -> str | None:
        """Serve the node's Prometheus metrics (prefetch/metrics.py) from the agent: it does the node's warms, so
        its counters are the node's; the gauges read the node's store. PREFETCH_METRICS_PORT fixes the port (what
        Prometheus scrapes on every node); unset, or taken, a free port is used (see `prefetch status --json`)."""
        try:
            from . import metrics
        except ImportError:
            return None
        addr = os.environ.get("PREFETCH_METRICS_ADDR") or self._node_ip() or "127.0.0.1"
        wanted = int(os.environ.get("PREFETCH_METRICS_PORT") or 0)
        for port in dict.fromkeys((wanted, 0)):
            try:
                self._metrics_server = metrics.start_http_server(port, addr=addr, cache_dir=Settings.load().cache_dir)
            except OSError:
                continue
            except Exception:  # noqa: BLE001 - metrics are a view; the agent works without them
                return None
            return f"http://{addr}:{self._metrics_server.port}/metrics"
        return None

    def ready(self) -> dict:
        return self._identity()

    def check_health(self) -> bool:
        return self._loop.is_alive()

    # -- the library, run on this node -----------------------------------------------------------------------
    def _warm(self, uri: str, format: str, convert_options: dict | None, caller: str,
              settings: Settings | None = None) -> "Warmed":
        from .api import warm

        with self._lock:
            op = self._next_op
            self._next_op += 1
            self._active[op] = {"uri": uri, "format": format, "caller": caller, "started_at": time.time(),
                                "done": 0, "bytes": None}

        def progress(done: int, total: int) -> None:
            entry = self._active.get(op)
            if entry is not None:
                entry["done"], entry["bytes"] = done, total

        try:
            return warm(uri, format=format, settings=settings, progress=progress, convert_options=convert_options)
        finally:
            with self._lock:
                self._active.pop(op, None)

    def _record(self, row: dict) -> dict:
        with self._lock:
            self._recent.append({k: row.get(k) for k in ("uri", "key", "version", "ok", "hit", "bytes",
                                                          "origin_bytes", "seconds", "caller", "error", "at")})
        return row

    def _row(self, uri: str, format: str, convert_options: dict | None, caller: str,
             settings: Settings | None = None) -> dict:
        started = time.monotonic()
        base = {"node_id": self.node_id, "uri": uri, "format": format, "caller": caller, "at": time.time()}
        try:
            w = self._warm(uri, format, convert_options, caller, settings)
        except Exception as e:  # noqa: BLE001 - a row per node: every failure becomes data, never a dead agent
            row = base | error_fields(e) | {"seconds": round(time.monotonic() - started, 4)}
            return self._record(row)
        row = base | {"ok": True, "key": w.key, "name": w.resolved.name, "version": w.resolved.version,
                      "bytes": w.bytes, "seconds": round(w.seconds, 4), "hit": w.from_cache,
                      "origin_bytes": w.origin_bytes, "path": str(w.path), "note": w.resolved.note}
        return self._record(row)

    def warm(self, uri: str, format: str = "native", convert_options: dict | None = None,
             caller: str = "warm --cluster") -> dict:
        """Warm uri on this node; never raises: the answer is a row (ok, key, bytes, seconds, hit, error...)."""
        me = self._identity()
        return {k: me[k] for k in ("node_id", "node_ip", "cache_dir")} | self._row(uri, format, convert_options, caller)

    def warm_for_replica(self, uri: str, format: str = "native", convert_options: dict | None = None,
                         caller: str = "replica", cache_dir: str | None = None) -> "Warmed":
        """Warm uri for a process on this node and hand back the Warmed (raises the library's errors).

        cache_dir: the caller's (normally the same as ours: both read the node label); honoured when it differs,
        so the caller always gets a path in the store it will lease and load from."""
        started = time.monotonic()
        base = {"node_id": self.node_id, "uri": uri, "format": format, "caller": caller, "at": time.time()}
        settings = Settings.load(cache_dir=cache_dir) if cache_dir else None
        try:
            w = self._warm(uri, format, convert_options, caller, settings)
        except Exception as e:
            self._record(base | error_fields(e) | {"seconds": round(time.monotonic() - started, 4)})
            raise
        self._record(base | {"ok": True, "key": w.key, "version": w.resolved.version, "bytes": w.bytes,
                             "hit": w.from_cache, "origin_bytes": w.origin_bytes, "seconds": round(w.seconds, 4)})
        # The Warmed crosses a process boundary: drop the opened origin (a boto3 client, sockets) it may carry.
        return dataclasses.replace(w, resolved=dataclasses.replace(w.resolved, source=None))

    def ls(self) -> list[dict]:
        from .api import list_objects

        return list_objects()

    def verify(self, key: str | None = None, repair: bool = True) -> list[dict]:
        from .api import verify

        return [r.to_dict() for r in verify(key, repair=repair)]

    def status(self) -> dict:
        doc = self._identity()
        store = Store(Settings.load().cache_dir)
        try:
            manifests = store.manifests()
            doc |= {"objects": len(manifests), "bytes": sum(m.bytes for m in manifests),
                    "used_bytes": store.used_bytes(), "inflight": inflight_downloads(store),
                    "quarantined": quarantined(store)}
            try:
                import shutil

                doc["free_bytes"] = shutil.disk_usage(store.root).free
            except OSError:
                doc["free_bytes"] = None
        except OSError as e:
            doc |= {"objects": 0, "bytes": 0, "used_bytes": 0, "inflight": [], "free_bytes": None,
                    "error": f"cache dir {store.root}: {e.strerror or e}"}
        with self._lock:
            doc["active"] = [dict(v) for v in self._active.values()]
            doc["recent"] = list(self._recent)[-10:]
            doc["desired"] = self._desired.to_dict() | {
                "passes": self._passes, "last_pass": self._last_pass,
                "results": [dict(r) for r in self._desired_rows.values()]}
        return doc

    # -- the desired set ----------------------------------------------------------------------------------------
    def set_desired(self, uris: Iterable[str], interval: float = 60.0, format: str = "native") -> dict:
        """Keep these URIs warm (and pinned) on this node, re-resolving mutable ones every `interval` seconds.
        Idempotent: the same set again changes nothing (the controller pushes it on every tick)."""
        new = DesiredSet(tuple(dict.fromkeys(uris)), float(interval), format, time.time())
        with self._lock:
            old = self._desired
            changed = (new.uris, new.interval, new.format) != (old.uris, old.interval, old.format)
            if changed:
                self._desired = new
                for uri in set(old.uris) - set(new.uris):
                    self._desired_rows.pop(uri, None)
        if changed:
            store = Store(Settings.load().cache_dir)
            for uri in set(old.uris) - set(new.uris):
                _unpin_stale(store, uri, keep=None)
            self._wake.set()
        return self.desired()

    def desired(self) -> dict:
        with self._lock:
            return self._desired.to_dict()

    def sync(self, uris: Iterable[str] | None = None, format: str | None = None) -> dict:
        """One pass now over `uris` (default: the desired set), waited for: what `prefetch daemon --once` runs."""
        with self._lock:
            d = self._desired
        return self._pass(tuple(uris) if uris is not None else d.uris, format or d.format)

    def _pass(self, uris: tuple[str, ...], format: str) -> dict:
        # ref_ttl=0: each pass asks the registry where a mutable URI points now (one cheap call per URI), so a
        # moved alias is noticed within one interval; when the registry is down, the last ref is used.
        settings = Settings.load(ref_ttl=0.0)
        store = Store(settings.cache_dir)
        rows = []
        for uri in uris:
            if not _mutable(uri):
                recheck(uri, settings, store)   # a re-registered version becomes a new key (prefetch/uri.py)
            row = self._row(uri, format, None, "daemon", settings)
            if row["ok"]:
                _pin(store, row["key"], uri)
                if _mutable(uri):
                    row["unpinned"] = _unpin_stale(store, uri, keep=row["key"])
            rows.append(row)
            with self._lock:
                if uri in self._desired.uris:
                    self._desired_rows[uri] = row
        summary = {"at": time.time(), "ok": all(r["ok"] for r in rows), "uris": len(rows),
                   "failed": sum(not r["ok"] for r in rows), "origin_bytes": sum(r.get("origin_bytes") or 0 for r in rows)}
        with self._lock:
            self._passes += 1
            self._last_pass = summary
        return self._identity() | summary | {"rows": rows}

    def _run_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                d = self._desired
            if d.uris:
                try:
                    self._pass(d.uris, d.format)
                except Exception as e:  # noqa: BLE001 - the loop must outlive any one bad pass
                    with self._lock:
                        self._last_pass = {"at": time.time(), "ok": False, "error": f"{type(e).__name__}: {e}"}
            self._wake.wait(d.interval if d.uris else 3600.0)
            self._wake.clear()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._metrics_server is not None:
            self._metrics_server.close()


# -- finding and creating agents ---------------------------------------------------------------------------------
_actor_class = None


def agent_actor_class():
    """NodeAgent as a Ray actor class (built on first use: importing this module never imports ray)."""
    global _actor_class
    if _actor_class is None:
        import ray

        _actor_class = ray.remote(NodeAgent)
    return _actor_class


def get_or_create_agent(node_id: str):
    """This node's agent, started if missing: detached, pinned to the node, free (num_cpus=0)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return agent_actor_class().options(
        name=agent_name(node_id), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        num_cpus=0, max_concurrency=AGENT_MAX_CONCURRENCY,
        # A crashed agent is restarted by Ray on the same node (the affinity is hard); `ray.kill` is final and
        # the next reconcile starts a fresh one. Calls are not retried: a warm is retried by its caller.
        max_restarts=-1, max_task_retries=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    ).remote(node_id)


def get_agent(node_id: str):
    """The running agent of node_id, or None (never starts one)."""
    import ray

    try:
        return ray.get_actor(agent_name(node_id), namespace=NAMESPACE)
    except ValueError:
        return None


def _caller() -> str:
    try:
        import ray

        ctx = ray.get_runtime_context()
        name = ctx.get_actor_name()
        if name:
            return name
        actor = ctx.get_actor_id()
        if actor:
            return f"actor {actor[:12]}"
    except Exception:
        pass
    return f"pid {os.getpid()}"


def warm_via_local_agent(uri: str, format: str = "native", convert_options: dict | None = None) -> "Warmed | None":
    """Warm uri through this node's agent when this process runs in an initialized Ray and the agent exists.

    Returns the agent's Warmed (the download happened once, in the agent, and `prefetch status` shows it), or
    None when there is no agent to ask (outside Ray, no agent on this node, or the agent just died): the caller
    then warms in its own process; the store's lock still makes it one download per node. Library errors
    (NotFound, Unreachable...) are raised as themselves.
    """
    from .node import _ray, current_node_id

    ray = _ray()
    if ray is None:
        return None
    node_id = current_node_id()
    if node_id is None:
        return None
    handle = get_agent(node_id)
    if handle is None:
        return None
    from ray.exceptions import RayActorError, RayTaskError

    cache_dir = str(Settings.load().cache_dir)
    try:
        return ray.get(handle.warm_for_replica.remote(uri, format, convert_options, _caller(), cache_dir))
    except RayActorError:
        return None
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


def parse_models(text: str) -> list[str]:
    """A desired set from a models file or PREFETCH_MODELS: URIs separated by newlines or commas; blank lines
    and `#` comments ignored; duplicates dropped, order kept."""
    uris: list[str] = []
    for line in text.splitlines():
        line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]   # a comment starts a line or follows a space
        for part in line.split(","):
            part = part.strip()
            if part:
                uris.append(part)
    return list(dict.fromkeys(uris))


def load_models(models_file: str | os.PathLike | None = None, env: dict[str, str] | Any = None) -> list[str]:
    """The daemon's desired set: the models file's URIs, then PREFETCH_MODELS's."""
    from .errors import BadURI

    env = os.environ if env is None else env
    uris: list[str] = []
    if models_file is not None:
        path = Path(models_file).expanduser()
        try:
            uris += parse_models(path.read_text())
        except FileNotFoundError:
            raise BadURI("no such models file", str(path)) from None
        except OSError as e:
            raise BadURI(f"cannot read models file: {e.strerror or e}", str(path)) from None
    uris += parse_models(env.get("PREFETCH_MODELS", "") or "")
    return list(dict.fromkeys(uris))


def validate_uris(uris: Iterable[str]) -> None:
    """Parse each URI (no network): a typo fails here, on the caller, not on every node."""
    from .uri import parse

    for uri in uris:
        parse(uri)

