"""The reconcile state machine of the node agents, without Ray (so it is unit-testable with scripted wrappers).

Shape borrowed from Ray Serve's `_private/proxy_state.py`: `AgentWrapper` is the interface to one agent (its
Ray-backed form is prefetch.cluster.agent.ActorAgentWrapper), `AgentState.reconcile()` is the only place a
status changes (STARTING -> HEALTHY or UNHEALTHY, HEALTHY -> UNHEALTHY), and `AgentStateManager.update(alive
nodes)` starts what is missing, drops what is dead and replaces what is unhealthy.

Who reconciles: a one-shot caller (`prefetch warm --cluster`, `prefetch status`: fanout.ensure_agents runs
update ticks until every alive node's agent answered) and the controller (the same manager on a loop).
Nothing here imports ray.
"""
from __future__ import annotations

import enum
import logging
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable, Mapping, Optional

from ..errors import one_line

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0            # an agent's first answer (worker start + imports); grows with restarts
HEALTH_CHECK_PERIOD_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 10.0
UNHEALTHY_THRESHOLD = 3           # consecutive failed health checks (a dead actor is unhealthy at once)


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

    @classmethod
    def unstartable(cls, node_id: str, node_ip: str | None, why: str) -> "AgentState":
        """The state of a node whose agent could not even be created: UNHEALTHY, saying why."""
        state = cls(_Unstartable(why), node_id, node_ip)
        state.status = AgentStatus.UNHEALTHY
        return state

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
            self.wrapper.error = f"{type(e).__name__}: {one_line(e)}"
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
    """Not thread safe: call update() from one thread (the controller holds a lock).

    wrapper_factory(node_id, node_ip) -> AgentWrapper: agent.ActorAgentWrapper on a cluster, a script in tests."""

    def __init__(self, wrapper_factory: Callable[[str, str | None], AgentWrapper],
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
                self.start_errors[node_id] = f"cannot start agent: {type(e).__name__}: {one_line(e)}"
                continue
            self.start_errors.pop(node_id, None)
            self._states[node_id] = AgentState(wrapper, node_id, node_ip, self._restarts.get(node_id, 0), self._clock,
                                               self._last_errors.pop(node_id, None))

    def settled(self, alive_nodes: Iterable[str]) -> bool:
        """Every alive node has an agent that answered (healthy)."""
        return all(n in self._states and self._states[n].status == AgentStatus.HEALTHY for n in alive_nodes)
