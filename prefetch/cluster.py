"""One agent per alive node (reconcile), fan-out warm and cluster status.

Shape borrowed from Ray Serve's `_private/proxy_state.py`: `AgentWrapper` is the interface to one agent and
`ActorAgentWrapper` its Ray-backed implementation, so the state machine (`AgentState.reconcile()`: STARTING ->
HEALTHY or UNHEALTHY, HEALTHY -> UNHEALTHY) and `AgentStateManager.update(alive_nodes)` (start what is missing,
drop what is dead, replace what is unhealthy) are unit-testable without Ray.

Who reconciles:
- a one-shot caller (`prefetch warm --cluster`, `prefetch status`): `ensure_agents()` runs update ticks until
  every alive node's agent answered;
- the controller (prefetch/controller.py, started by `prefetch daemon`): the same manager on a loop, so a node
  that joins later gets an agent and the desired set with no command.

Ray is imported inside functions only (the CLI imports this module lazily anyway).
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import os
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from .agent import NAMESPACE, agent_name, get_or_create_agent, validate_uris
from .config import human_bytes as _human
from .errors import Unreachable

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0            # an agent's first answer (worker start + imports); grows with restarts
HEALTH_CHECK_PERIOD_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 10.0
UNHEALTHY_THRESHOLD = 3           # consecutive failed health checks (a dead actor is unhealthy at once)


# -- connecting ---------------------------------------------------------------------------------------------------
def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return True
    return (Path.home() / ".ray" / "auth_token").is_file()


def _probe_gcs(address: str, metadata: tuple = ()) -> tuple[str, str]:
    """Ask the GCS at host:port for its cluster id without a token: ("plain"|"token"|"unreachable"|"unknown", detail).

    Milliseconds, where ray.init needs ~20 s of retries to give up on a refused token or a closed port."""
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return "unknown", ""
    try:
        with grpc.insecure_channel(address) as channel:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=10, metadata=metadata or None)
        return "plain", ""
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            return "token", e.details() or ""
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return "unreachable", (e.details() or "").split(";")[-1].strip()
        return "unknown", e.details() or ""
    except Exception as e:  # noqa: BLE001 - a probe never decides alone: ray.init still runs
        return "unknown", str(e)


def _enable_token_mode() -> tuple:
    """What Ray itself does for address "auto" when a token exists (authentication_token_setup._enable_token_auth).
    Returns the gRPC metadata Ray will send (to check the token before ray.init), or () if unknown."""
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        from ray._private.authentication.grpc_authentication_client_interceptor import (
            _get_authentication_metadata_tuple)
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")   # ray may already be imported: make its cached config see token mode
        AuthenticationTokenLoader.instance().reset_cache()
        return _get_authentication_metadata_tuple()
    except Exception:  # noqa: BLE001 - private helpers moved: ray.init still tells
        return ()


def connect(address: str | None = None) -> None:
    """Connect this process to the Ray cluster (never start one): address, RAY_ADDRESS, or the local node's.

    Token auth (Ray 2.60): a cluster whose head started with a token (`ray start --head` enables it when
    ~/.ray/auth_token exists, or with RAY_AUTH_MODE=token) refuses clients that do not send one, and Ray's client
    turns token mode on by itself only for address "auto". For an explicit host:port we ask the GCS first (no
    token): if it demands one, we switch this process to token mode (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token supplies it); if it does not, we leave the mode alone, because a token-mode driver talking
    to a cluster without auth can read the GCS but its actors die (its own gRPC server then demands tokens the
    workers do not send). A closed port fails here in milliseconds, with one line.
    """
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    if target != "auto" and "://" not in target and os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
        verdict, detail = _probe_gcs(target)
        if verdict == "unreachable":
            raise Unreachable(f"no Ray cluster answers there ({detail or 'connection refused'})", target)
        if verdict == "token" and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            if not _token_available():
                raise Unreachable("the Ray cluster requires token auth: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
                                  "(or put the cluster's token in ~/.ray/auth_token)", target)
            metadata = _enable_token_mode()
            if metadata and _probe_gcs(target, metadata)[0] == "token":
                raise Unreachable("the Ray cluster refused our auth token (from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                                  "or ~/.ray/auth_token): use the token of that cluster's head", target)
    try:
        ray.init(address=target, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as e:
        hint = "" if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" else " (token auth: is the token right?)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Unreachable(f"cannot connect to the Ray cluster: {first}{hint}", target) from None


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    node_id: str
    node_ip: str
    is_head: bool
    labels: dict

    @property
    def cache_dir(self) -> str | None:
        from .node import CACHE_DIR_LABEL

        return self.labels.get(CACHE_DIR_LABEL)


def alive_nodes() -> list[NodeInfo]:
    """Alive nodes, head first, then by address (a stable order for tables)."""
    import ray

    nodes = [NodeInfo(n["NodeID"], n.get("NodeManagerAddress", ""), "node:__internal_head__" in n.get("Resources", {}),
                      dict(n.get("Labels") or {}))
             for n in ray.nodes() if n.get("Alive")]
    return sorted(nodes, key=lambda n: (not n.is_head, n.node_ip, n.node_id))


# -- the interface to one agent (Serve's ProxyWrapper) -----------------------------------------------------------
class AgentStatus(str, enum.Enum):
    STARTING = "STARTING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"


class AgentWrapper(ABC):
    """One node's agent as the state machine sees it. Checks are polled: None means "no answer yet"."""

    info: dict | None = None        # what the agent's ready() answered (node_ip, cache_dir, pid)
    error: str | None = None        # the last failure, for tables
    dead: bool = False              # the actor is gone for good (killed, its node died)

    @property
    @abstractmethod
    def actor_id(self) -> str: ...

    @property
    def handle(self) -> Any:
        return None

    @abstractmethod
    def is_ready(self, timeout_s: float) -> Optional[bool]: ...

    @abstractmethod
    def is_healthy(self, timeout_s: float) -> Optional[bool]: ...

    @abstractmethod
    def kill(self) -> None: ...


class ActorAgentWrapper(AgentWrapper):
    """The Ray-backed agent: started or found again by name, polled with ray.wait(timeout=0)."""

    def __init__(self, node_id: str, node_ip: str | None = None):
        self.node_id, self.node_ip = node_id, node_ip
        self.info, self.error, self.dead = None, None, False
        self._handle = get_or_create_agent(node_id)
        self._pending: dict[str, tuple[Any, float]] = {}

    @property
    def actor_id(self) -> str:
        return self._handle._actor_id.hex()

    @property
    def handle(self) -> Any:
        return self._handle

    def _poll(self, check: str, timeout_s: float) -> tuple[Optional[bool], Any]:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnschedulableError, RayActorError

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
            self.error = f"agent died: {_first_line(e)}"
        except RayActorError as e:   # unavailable (restarting): not dead, just not answering
            self.error = f"agent unavailable: {_first_line(e)}"
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {_first_line(e)}"
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# -- per-node state machine (Serve's ProxyState) -----------------------------------------------------------------
class AgentState:
    def __init__(self, wrapper: AgentWrapper, node_id: str, node_ip: str | None, restart_count: int = 0,
                 clock: Callable[[], float] = time.monotonic, previous_error: str | None = None):
        self.wrapper, self.node_id, self.node_ip = wrapper, node_id, node_ip
        self.restart_count = restart_count
        self.previous_error = previous_error   # why the agent this one replaces was dropped
        self.status = AgentStatus.STARTING
        self._clock = clock
        self._failures = 0
        self._last_health_check: float | None = None

    @property
    def handle(self) -> Any:
        return self.wrapper.handle

    @property
    def error(self) -> str | None:
        if self.wrapper.error:
            return self.wrapper.error
        if self.status == AgentStatus.STARTING:
            return "agent starting" + (f" (replaced: {self.previous_error})" if self.previous_error else "")
        return self.previous_error

    def reconcile(self) -> None:
        try:
            self._reconcile()
        except Exception as e:  # noqa: BLE001 - like Serve: an unexpected error makes the agent unhealthy
            self.wrapper.error = f"{type(e).__name__}: {_first_line(e)}"
            self.status = AgentStatus.UNHEALTHY

    def _reconcile(self) -> None:
        """STARTING -> HEALTHY or UNHEALTHY; HEALTHY -> UNHEALTHY. UNHEALTHY is terminal: the manager replaces it."""
        if self.status == AgentStatus.UNHEALTHY:
            return
        if self.status == AgentStatus.STARTING:
            # Linear backoff, as Serve does: an agent that failed to start gets longer next time.
            ready = self.wrapper.is_ready((self.restart_count + 1) * READY_TIMEOUT_S)
            if ready is not None:
                self.status = AgentStatus.HEALTHY if ready else AgentStatus.UNHEALTHY
                self._last_health_check = self._clock()
            return
        due = self._last_health_check is None or self._clock() - self._last_health_check >= HEALTH_CHECK_PERIOD_S
        if not due:
            return
        healthy = self.wrapper.is_healthy(HEALTH_CHECK_TIMEOUT_S)
        if healthy is None:
            return
        self._last_health_check = self._clock()
        if healthy:
            self._failures = 0
            return
        self._failures += 1
        if self.wrapper.dead or self._failures >= UNHEALTHY_THRESHOLD:
            self.status = AgentStatus.UNHEALTHY

    def shutdown(self) -> None:
        self.wrapper.kill()

    def to_dict(self) -> dict:
        return {"node_id": self.node_id, "node_ip": self.node_ip, "status": self.status.value,
                "restarts": self.restart_count, "error": self.error, "actor_id": self.wrapper.actor_id}


# -- all agents (Serve's ProxyStateManager) ------------------------------------------------------------------------
class AgentStateManager:
    """Not thread safe: call update() from one thread (the controller holds a lock)."""

    def __init__(self, wrapper_factory: Callable[[str, str | None], AgentWrapper] = ActorAgentWrapper,
                 clock: Callable[[], float] = time.monotonic):
        self._factory = wrapper_factory
        self._clock = clock
        self._states: dict[str, AgentState] = {}
        self._restarts: dict[str, int] = {}
        self._last_errors: dict[str, str] = {}
        self.start_errors: dict[str, str] = {}

    @property
    def states(self) -> dict[str, AgentState]:
        return dict(self._states)

    def update(self, alive_nodes: Mapping[str, str | None]) -> None:
        """alive_nodes: node_id -> node_ip. Reconcile each agent, drop the dead and unhealthy, start the missing."""
        for state in self._states.values():
            state.reconcile()
        self._stop_agents_if_needed(alive_nodes)
        self._start_agents_if_needed(alive_nodes)

    def _stop_agents_if_needed(self, alive_nodes: Mapping[str, str | None]) -> None:
        for node_id in list(self._states):
            state = self._states[node_id]
            if node_id not in alive_nodes:
                logger.info("node %s left: dropping its agent", node_id)
            elif state.status == AgentStatus.UNHEALTHY:
                logger.warning("agent on node %s is unhealthy (%s): replacing it", node_id, state.error)
                self._restarts[node_id] = state.restart_count + 1
                self._last_errors[node_id] = state.error or "unhealthy"
            else:
                continue
            del self._states[node_id]
            state.shutdown()

    def _start_agents_if_needed(self, alive_nodes: Mapping[str, str | None]) -> None:
        for node_id, node_ip in alive_nodes.items():
            if node_id in self._states:
                continue
            try:
                wrapper = self._factory(node_id, node_ip)
            except Exception as e:  # noqa: BLE001 - try again next tick
                self.start_errors[node_id] = f"cannot start agent: {type(e).__name__}: {_first_line(e)}"
                continue
            self.start_errors.pop(node_id, None)
            self._states[node_id] = AgentState(wrapper, node_id, node_ip, self._restarts.get(node_id, 0), self._clock,
                                               self._last_errors.pop(node_id, None))

    def settled(self, alive_nodes: Iterable[str]) -> bool:
        """Every alive node has an agent that answered (healthy)."""
        return all(n in self._states and self._states[n].status == AgentStatus.HEALTHY for n in alive_nodes)


class _Unstartable(AgentWrapper):
    """Stands for an agent that could not be created, so tables can say why."""

    def __init__(self, why: str):
        self.error, self.info, self.dead = why, None, True

    actor_id = property(lambda self: "-")

    def is_ready(self, timeout_s: float) -> Optional[bool]:
        return False

    def is_healthy(self, timeout_s: float) -> Optional[bool]:
        return False

    def kill(self) -> None:
        pass


def _node_map(nodes: Iterable[NodeInfo]) -> dict[str, str]:
    return {n.node_id: n.node_ip for n in nodes}


def ensure_agents(address: str | None = None, timeout: float = 120.0) -> dict[str, AgentState]:
    """Reconcile once, to completion: an agent on every alive node (started or found again), dead nodes dropped,
    dead or unhealthy agents replaced. Returns node_id -> AgentState (HEALTHY, or why not after `timeout`)."""
    connect(address)
    manager = AgentStateManager()
    deadline = time.monotonic() + timeout
    while True:
        nodes = _node_map(alive_nodes())
        manager.update(nodes)
        if manager.settled(nodes) or time.monotonic() > deadline:
            states = {n: s for n, s in manager.states.items() if n in nodes}
            for node_id, why in manager.start_errors.items():   # nodes whose agent could not even be created
                if node_id in nodes and node_id not in states:
                    states[node_id] = AgentState(_Unstartable(why), node_id, nodes[node_id])
                    states[node_id].status = AgentStatus.UNHEALTHY
            return states
        time.sleep(0.1)


# -- fan-out warm ---------------------------------------------------------------------------------------------------
def _failed_row(node: NodeInfo, uri: str, message: str, code: int = 1) -> dict:
    return {"node_id": node.node_id, "node_ip": node.node_ip, "cache_dir": node.cache_dir, "uri": uri,
            "ok": False, "error": message, "exit_code": code, "error_type": "AgentError"}


def _gather(pending: dict, on_error: Callable[[Any, BaseException], dict]) -> dict:
    """ObjectRef -> context, resolved as they finish; a failed call becomes a row, never an exception."""
    import ray

    results = {}
    waiting = list(pending)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        ref = done[0]
        try:
            results[ref] = ray.get(ref)
        except Exception as e:  # noqa: BLE001
            results[ref] = on_error(pending[ref], e)
    return results


def warm_cluster(uris: list[str], format: str = "native", address: str | None = None,
                 convert_options: dict | None = None) -> dict:
    """Warm every URI on every alive node, through each node's agent. One row per (node, URI):
    node_id, node_ip, uri, ok, key, version, bytes, seconds, hit, origin_bytes, error, exit_code.

    `ok` is False if any row failed; `exit_code` is then the first failed row's (2/3/4/5/6 as for `warm`,
    1 for an agent that did not answer)."""
    started = time.monotonic()
    validate_uris(uris)
    states = ensure_agents(address)
    nodes = alive_nodes()
    pending: dict = {}
    rows_by_slot: dict[tuple[int, int], dict] = {}
    for i, node in enumerate(nodes):
        state = states.get(node.node_id)
        for j, uri in enumerate(uris):
            if state is None or state.status != AgentStatus.HEALTHY:
                why = (state.error if state else None) or "no agent"
                rows_by_slot[(i, j)] = _failed_row(node, uri, f"agent not ready: {why}")
            else:
                ref = state.handle.warm.remote(uri, format, convert_options or None, "prefetch warm --cluster")
                pending[ref] = (i, j)

    def on_error(slot, e):
        i, j = slot
        return _failed_row(nodes[i], uris[j], f"agent failed: {type(e).__name__}: {_first_line(e)}")

    for ref, row in _gather(pending, on_error).items():
        rows_by_slot[pending[ref]] = row
    rows = []
    for slot in sorted(rows_by_slot):
        row = rows_by_slot[slot]
        row.setdefault("node_ip", nodes[slot[0]].node_ip)
        row["is_head"] = nodes[slot[0]].is_head
        rows.append(row)
    failed = [r for r in rows if not r.get("ok")]
    report = {"ok": not failed, "uris": list(uris), "format": format, "nodes": len(nodes), "rows": rows,
              "failed": len(failed), "origin_bytes": sum(r.get("origin_bytes") or 0 for r in rows),
              "bytes": sum(r.get("bytes") or 0 for r in rows if r.get("ok")),
              "seconds": round(time.monotonic() - started, 3)}
    if failed:
        report["exit_code"] = failed[0].get("exit_code") or 1
    return report


def _node_label(row: Mapping) -> str:
    head = " (head)" if row.get("is_head") else ""
    return f"{(row.get('node_id') or '?')[:12]}{head}"


def render_warm_table(report: dict, console) -> None:
    """The per-node table of warm_cluster's report: node, ip, uri, version, size, seconds, hit/miss, error."""
    from rich.table import Table

    table = Table(box=None)
    for name in ("node", "ip", "uri", "version", "size", "seconds", "result", "origin", "error"):
        table.add_column(name, no_wrap=name not in ("uri", "error"), overflow="fold")
    for r in report["rows"]:
        if r.get("ok"):
            table.add_row(_node_label(r), r.get("node_ip") or "-", r["uri"], str(r.get("version") or "-"),
                          _human(r.get("bytes")), f"{r.get('seconds', 0):.2f}", "hit" if r.get("hit") else "miss",
                          _human(r.get("origin_bytes")), "")
        else:
            table.add_row(_node_label(r), r.get("node_ip") or "-", r["uri"], "-", "-",
                          f"{r['seconds']:.2f}" if r.get("seconds") is not None else "-", "[red]FAILED[/red]", "-",
                          r.get("error") or "")
    console.print(table)
    ok = len(report["rows"]) - report.get("failed", 0)
    console.print(f"{ok}/{len(report['rows'])} ok on {report['nodes']} nodes in {report['seconds']:.1f}s; "
                  f"origin bytes for the cluster: {_human(report['origin_bytes'])}", highlight=False)


# -- cluster status -------------------------------------------------------------------------------------------------
def cluster_status(address: str | None = None, timeout: float = 30.0) -> dict:
    """Every alive node: its agent's status (cache dir, objects, bytes, in-flight downloads with progress,
    desired set) or why there is none. Starts missing agents (they cost no CPU), like `warm --cluster`, but waits
    at most `timeout` for them: a status must come back even when a node is in trouble."""
    states = ensure_agents(address, timeout=timeout)
    nodes = alive_nodes()
    pending: dict = {}
    rows: dict[int, dict] = {}
    for i, node in enumerate(nodes):
        state = states.get(node.node_id)
        base = {"node_id": node.node_id, "node_ip": node.node_ip, "is_head": node.is_head,
                "cache_dir": node.cache_dir, "agent": state.status.value if state else "MISSING",
                "agent_name": agent_name(node.node_id)}
        if state is None or state.status != AgentStatus.HEALTHY:
            rows[i] = base | {"ok": False, "error": (state.error if state else None) or "no agent",
                              "objects": None, "bytes": None, "inflight": []}
        else:
            rows[i] = base
            pending[state.handle.status.remote()] = i

    def on_error(i, e):
        return {"ok": False, "error": f"status failed: {type(e).__name__}: {_first_line(e)}", "inflight": []}

    for ref, doc in _gather(pending, on_error).items():
        i = pending[ref]
        rows[i] = rows[i] | {"ok": "error" not in doc} | doc | {"is_head": nodes[i].is_head,
                                                               "node_ip": doc.get("node_ip") or nodes[i].node_ip}
    out = [rows[i] for i in sorted(rows)]
    return {"ok": all(r.get("ok") for r in out), "nodes": out,
            "objects": sum(r.get("objects") or 0 for r in out), "bytes": sum(r.get("bytes") or 0 for r in out),
            "inflight": sum(len(r.get("inflight") or []) for r in out), "controller": _controller_desired()}


def _controller_desired() -> dict | None:
    from .controller import controller_desired

    return controller_desired()


def render_status_table(report: dict, console) -> None:
    from rich.table import Table

    table = Table(box=None)
    for name in ("node", "ip", "agent", "cache dir", "objects", "size", "in flight", "desired set"):
        table.add_column(name, no_wrap=name in ("node", "ip", "objects", "size"), overflow="fold")
    for r in report["nodes"]:
        inflight = []
        for d in r.get("inflight") or []:
            pct = f"{d['progress'] * 100:.0f}%" if d.get("progress") is not None else "?"
            state = "" if d.get("alive") else " (stalled)"
            inflight.append(f"{d.get('uri')} {pct} of {_human(d.get('bytes'))}{state}")
        desired = r.get("desired") or {}
        if desired.get("uris"):
            last = desired.get("last_pass") or {}
            mark = "ok" if last.get("ok") else (f"{last.get('failed', '?')} failed" if last else "pending")
            desired_text = f"{len(desired['uris'])} URIs every {desired.get('interval'):g}s: {mark}"
        else:
            desired_text = "-"
        agent = r.get("agent", "-") if r.get("ok") else f"[red]{r.get('agent', '-')}[/red]: {r.get('error')}"
        table.add_row(_node_label(r), r.get("node_ip") or "-", agent, r.get("cache_dir") or "-",
                      str(r.get("objects") if r.get("objects") is not None else "-"), _human(r.get("bytes")),
                      "\n".join(inflight) or "-", desired_text)
    console.print(table)
    console.print(f"{len(report['nodes'])} nodes, {report['objects']} objects, {_human(report['bytes'])} cached, "
                  f"{report['inflight']} downloads in flight", highlight=False)
    for r in report["nodes"]:
        for q in r.get("quarantined") or []:   # objects whose manifest could not be read (prefetch/quarantine.py)
            console.print(f"quarantined on {r.get('node_ip') or '-'}: {q.get('key')}: {q.get('reason')}",
                          highlight=False, soft_wrap=True)


def clear_desired(address: str | None = None) -> dict:
    """Forget the cluster's desired set (prefetch.controller.clear_desired; kept here for callers of this module)."""
    from .controller import clear_desired as clear

    return clear(address)
