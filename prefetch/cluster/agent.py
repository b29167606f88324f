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
  every interval by a background thread (prefetch.cluster.desired), so a moved alias is fetched with no command;
- peers (prefetch.cluster.peers): its misses take chunks from other nodes, and its chunk server
  (prefetch.cluster.chunk_server) serves this node's store to theirs (`chunk_map` says what it holds).

Also here: finding and creating agents (`get_or_create_agent`, `get_agent`, `warm_via_local_agent`) and
`ActorAgentWrapper`, the Ray-backed form of the state machine's AgentWrapper (prefetch.cluster.state).
Ray is imported only inside functions: `import prefetch.cluster.agent` stays cheap.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from ..config import Settings
from ..errors import PrefetchError, error_fields, one_line
from ..store.lifecycle import inflight_downloads
from ..store import Store
from ..store.quarantine import quarantined
from . import compat
from .desired import DesiredSetLoop
from . import peers as peer_chunks
from .names import NAMESPACE, agent_name, get_agent  # noqa: F401  (re-exported: callers find agents here)
from .node import current_node_id, ray_if_initialized
from .state import AgentWrapper

compat.register_lease_hooks()   # this agent's leases name its actor

if TYPE_CHECKING:
    from ..api import Warmed

AGENT_MAX_CONCURRENCY = 32         # warms of different URIs, status and the replicas' calls run side by side
RECENT = 50                        # warms remembered for `status` (memory only: the disk is the real record)


# -- the actor ---------------------------------------------------------------------------------------------------
class NodeAgent:
    """Run as a Ray actor (see get_or_create_agent); every method is also callable on a plain instance."""

    def __init__(self, node_id: str | None = None):
        self.node_id = node_id or current_node_id() or "local"
        # Read once, at agent start (the node's environment does not change). A bad setting must not kill the
        # actor in its creation task (Ray would report only its own wrapper): ready() raises it, so the node's
        # table says what is wrong.
        self._settings_error: PrefetchError | None = None
        try:
            self.settings = Settings.load()
        except PrefetchError as e:
            self._settings_error, self.settings = e, Settings()
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._recent: collections.deque[dict] = collections.deque(maxlen=RECENT)
        self._active: dict[int, dict] = {}
        self._next_op = 0
        self._metrics_server = None
        self._chunk_server = None
        self.metrics_url = None if self._settings_error else self._start_metrics()
        if not self._settings_error and self.settings.peers and ray_if_initialized() is not None:
            self._chunk_server = self._start_chunk_server()
            # The cluster's peer tracker, started now rather than by this node's first miss (an actor start is
            # about a second); in the background, so an agent never waits on it to answer ready().
            threading.Thread(target=self._start_tracker, name="prefetch-tracker-start", daemon=True).start()
        self._desired = DesiredSetLoop(lambda uri, format, settings: self._row(uri, format, None, "daemon", settings),
                                       self.settings)

    # -- identity and health ---------------------------------------------------------------------------------
    @staticmethod
    def _node_ip() -> str | None:
        try:
            import ray

            return ray.util.get_node_ip_address()
        except Exception:
            return None

    def _identity(self) -> dict:
        return {"node_id": self.node_id, "node_ip": self._node_ip(), "cache_dir": str(self.settings.cache_dir),
                "pid": os.getpid(), "started_at": self.started_at, "metrics_url": self.metrics_url,
                "chunk_server": self._chunk_server.url if self._chunk_server else None}

    def _start_metrics(self) -> str | None:
        """Serve the node's Prometheus metrics (prefetch/metrics.py) from the agent: it does the node's warms, so
        its counters are the node's; the gauges read the node's store. PREFETCH_METRICS_PORT fixes the port (what
        Prometheus scrapes on every node); unset, or taken, a free port is used (see `prefetch status --json`)."""
        try:
            from .. import metrics
        except ImportError:
            return None
        addr = os.environ.get("PREFETCH_METRICS_ADDR") or self._node_ip() or "127.0.0.1"
        wanted = int(os.environ.get("PREFETCH_METRICS_PORT") or 0)
        for port in dict.fromkeys((wanted, 0)):
            try:
                self._metrics_server = metrics.start_http_server(port, addr=addr, cache_dir=self.settings.cache_dir)
            except OSError:
                continue
            except Exception:  # noqa: BLE001 - metrics are a view; the agent works without them
                return None
            return f"http://{addr}:{self._metrics_server.port}/metrics"
        return None

    @staticmethod
    def _start_tracker() -> None:
        if ray_if_initialized() is None:    # a plain NodeAgent (no Ray): nothing to start, and never start Ray
            return
        try:
            peer_chunks.get_or_create_tracker()
        except Exception:  # noqa: BLE001 - a warm that misses tries again, and goes to the origin without one
            pass

    def ready(self) -> dict:
        if self._settings_error is not None:
            raise self._settings_error
        return self._identity()

    def check_health(self) -> bool:
        return self._desired.is_alive()

    # -- the library, run on this node -----------------------------------------------------------------------
    def _warm(self, uri: str, format: str, convert_options: dict | None, caller: str,
              settings: Settings | None = None, peers: bool = True) -> "Warmed":
        from ..api import warm

        settings = settings or self.settings
        factory = None
        if peers and settings.peers and ray_if_initialized() is not None:
            factory = peer_chunks.peer_factory(self.node_id, settings.max_concurrency, settings.peer_timeout,
                                               self._server())

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
            w = warm(uri, format=format, settings=settings, progress=progress, convert_options=convert_options,
                     peers=factory)
            peer_chunks.count_origin(w.origin_bytes)
            return w
        finally:
            with self._lock:
                self._active.pop(op, None)

    def _record(self, row: dict) -> dict:
        with self._lock:
            self._recent.append({k: row.get(k) for k in ("uri", "key", "version", "ok", "hit", "bytes", "origin_bytes",
                                                          "peer_bytes", "seconds", "caller", "error", "at")})
        return row

    def _row(self, uri: str, format: str, convert_options: dict | None, caller: str,
             settings: Settings | None = None, peers: bool = True) -> dict:
        started = time.monotonic()
        base = {"node_id": self.node_id, "uri": uri, "format": format, "caller": caller, "at": time.time()}
        try:
            w = self._warm(uri, format, convert_options, caller, settings, peers)
        except Exception as e:  # noqa: BLE001 - a row per node: every failure becomes data, never a dead agent
            row = base | error_fields(e) | {"seconds": round(time.monotonic() - started, 4)}
            return self._record(row)
        row = base | {"ok": True, "key": w.key, "name": w.resolved.name, "version": w.resolved.version,
                      "bytes": w.bytes, "seconds": round(w.seconds, 4), "hit": w.from_cache,
                      "origin_bytes": w.origin_bytes, "peer_bytes": w.peer_bytes, "path": str(w.path),
                      "note": w.resolved.note}
        return self._record(row)

    def warm(self, uri: str, format: str = "native", convert_options: dict | None = None,
             caller: str = "warm --cluster", peers: bool = True) -> dict:
        """Warm uri on this node; never raises: the answer is a row (ok, key, bytes, seconds, hit, origin_bytes,
        peer_bytes, error...). peers=False: every byte from the origin (`--no-peers`)."""
        me = self._identity()
        return {k: me[k] for k in ("node_id", "node_ip", "cache_dir")} | self._row(uri, format, convert_options,
                                                                                 caller, peers=peers)

    def warm_for_replica(self, uri: str, format: str = "native", convert_options: dict | None = None,
                         caller: str = "replica", cache_dir: str | None = None) -> "Warmed":
        """Warm uri for a process on this node and hand back the Warmed (raises the library's errors).

        cache_dir: the caller's (normally the same as ours: both read the node label); honoured when it differs,
        so the caller always gets a path in the store it will lease and load from."""
        started = time.monotonic()
        base = {"node_id": self.node_id, "uri": uri, "format": format, "caller": caller, "at": time.time()}
        settings = self.settings if not cache_dir else dataclasses.replace(self.settings, cache_dir=Path(cache_dir).expanduser().resolve())
        try:
            w = self._warm(uri, format, convert_options, caller, settings)
        except Exception as e:
            self._record(base | error_fields(e) | {"seconds": round(time.monotonic() - started, 4)})
            raise
        self._record(base | {"ok": True, "key": w.key, "version": w.resolved.version, "bytes": w.bytes,
                             "hit": w.from_cache, "origin_bytes": w.origin_bytes, "peer_bytes": w.peer_bytes,
                             "seconds": round(w.seconds, 4)})
        # The Warmed crosses a process boundary: drop the opened origin (a boto3 client, sockets) it may carry.
        return dataclasses.replace(w, resolved=dataclasses.replace(w.resolved, source=None))

    # -- chunks for other nodes (prefetch.cluster.peers) ------------------------------------------------------------
    def _start_chunk_server(self):
        """This node's chunk server (prefetch/cluster/chunk_server.py), on the node's IP: what peers read from.
        PREFETCH_PEER_PORT fixes its port (a firewall rule); unset, or taken, a free port is used."""
        from .chunk_server import ChunkServer

        host = self._node_ip() or "127.0.0.1"
        store = Store(self.settings.cache_dir)
        raw = os.environ.get("PREFETCH_PEER_PORT", "").strip()
        wanted = int(raw) if raw.isdigit() and int(raw) < 65536 else 0
        for port in dict.fromkeys((wanted, 0)):
            try:
                return ChunkServer(host, lambda key, path: peer_chunks.locate(store, key, path), peer_chunks.served,
                                   port)
            except OSError:
                continue
        return None

    def _server(self) -> tuple[str, str] | None:
        return (self._chunk_server.url, self._chunk_server.secret) if self._chunk_server else None

    def chunk_map(self, key: str, grid: int) -> dict:
        """What this node holds of key on a chunk grid ({"chunks": chunk id -> sha256, "server": (url, secret)}),
        for a tracker seeding its swarm."""
        return {"chunks": peer_chunks.chunk_map(Store(self.settings.cache_dir), key, grid), "server": self._server()}

    def ls(self) -> list[dict]:
        from ..api import list_objects

        return list_objects()

    def verify(self, key: str | None = None, repair: bool = True) -> list[dict]:
        from ..api import verify

        return [r.to_dict() for r in verify(key, repair=repair)]

    def status(self) -> dict:
        doc = self._identity()
        store = Store(self.settings.cache_dir)
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
        doc["desired"] = self._desired.status()
        doc["transfer"] = peer_chunks.counters()      # since the agent started: origin and peer bytes, chunks rejected
        return doc

    # -- the desired set (prefetch.cluster.desired) ---------------------------------------------------------------
    def set_desired(self, uris: Iterable[str], interval: float = 60.0, format: str = "native") -> dict:
        """Keep these URIs warm (and pinned) on this node, re-resolving mutable ones every `interval` seconds.
        Idempotent: the same set again changes nothing (the controller pushes it on every tick)."""
        return self._desired.set(uris, interval, format)

    def desired(self) -> dict:
        return self._desired.current()

    def sync(self, uris: Iterable[str] | None = None, format: str | None = None) -> dict:
        """One pass now over `uris` (default: the desired set), waited for: what `prefetch daemon --once` runs."""
        report = self._desired.sync(uris, format)
        return self._identity() | report

    def shutdown(self) -> None:
        self._desired.stop()
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self._chunk_server is not None:
            self._chunk_server.close()


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
    ray = ray_if_initialized()
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


# -- the Ray-backed AgentWrapper of the state machine (Serve's ActorProxyWrapper) --------------------------------
class ActorAgentWrapper(AgentWrapper):
    """The Ray-backed agent: started or found again by name, polled with ray.wait(timeout=0)."""

    def __init__(self, node_id: str, node_ip: str | None = None):
        self.node_id, self.node_ip = node_id, node_ip
        self.info, self.error, self.dead = None, None, False
        self._handle = get_or_create_agent(node_id)
        self._pending: dict[str, tuple[Any, float]] = {}

    @property
    def actor_id(self) -> str:
        return compat.actor_handle_id(self._handle)

    @property
    def handle(self) -> Any:
        return self._handle

    def _poll(self, check: str, timeout_s: float) -> tuple[Optional[bool], Any]:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnschedulableError, RayActorError, RayTaskError

        if check not in self._pending:
            self._pending[check] = (getattr(self._handle, check).remote(), time.monotonic())
        ref, started = self._pending[check]
        done, _ = ray.wait([ref], timeout=0)
        if not done:
            if time.monotonic() - started < timeout_s:
                return None, None
            del self._pending[check]
            self.error = f"no answer to {check} in {timeout_s:.0f}s"
            return False, None
        del self._pending[check]
        try:
            return True, ray.get(ref)
        except (ActorDiedError, ActorUnschedulableError) as e:
            self.dead = True
            self.error = f"agent died: {one_line(e)}"
        except RayActorError as e:   # unavailable (restarting): not dead, just not answering
            self.error = f"agent unavailable: {one_line(e)}"
        except RayTaskError as e:    # the agent answered with its own error: name it, not Ray's wrapper line
            cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
            self.error = f"{type(cause).__name__}: {one_line(cause)}"
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {one_line(e)}"
        return False, None

    def is_ready(self, timeout_s: float) -> Optional[bool]:
        answered, value = self._poll("ready", timeout_s)
        if answered:
            self.info, self.error = value, None
        return answered

    def is_healthy(self, timeout_s: float) -> Optional[bool]:
        answered, value = self._poll("check_health", timeout_s)
        if answered is None:
            return None
        if answered and not value:
            self.error = "agent's desired-set loop stopped"
        return bool(answered and value)

    def kill(self) -> None:
        import ray

        try:
            ray.kill(self._handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
