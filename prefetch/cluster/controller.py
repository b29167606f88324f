"""The desired-set controller: keep a declared set of URIs warm on every node, for good.

`prefetch daemon` (a node's start-up hook, prefetch.cluster.fanout.run_daemon) hands the set to this node's agent
and to the controller, a detached actor (`prefetch-controller`, namespace `prefetch`, `num_cpus=0`, on the head
node when it can be). The controller runs state.AgentStateManager on a loop, like Serve's controller runs its
proxy manager: agents on new nodes, dead ones replaced, the set pushed to each. The agents do the warming and the
re-resolving themselves. Also here: finding and creating the controller, and asking it for its set.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from ..errors import one_line
from .agent import NAMESPACE, ActorAgentWrapper
from .desired import DesiredSet
from .node import alive_nodes, node_map
from .state import HEALTH_CHECK_TIMEOUT_S, AgentStateManager, AgentStatus, AgentWrapper

CONTROLLER_NAME = "prefetch-controller"
MAX_TICK_S = 10.0      # the controller looks for new nodes at least this often, whatever the set's interval


class Controller:
    """Holds the cluster's desired set and reconciles agents on a loop (run as the detached `prefetch-controller`).

    Why a controller and not only the daemon on each node: the start-up hook (`scripts/node-startup.sh`) runs
    `prefetch daemon` on every node, which is the deployment story; but a node whose hook did not run (or ran
    before the daemon existed), and an agent killed later, still need an agent and the set. The controller makes
    that true with no command: every tick it starts agents on new nodes, replaces dead ones, and pushes the set
    (idempotent) to every healthy agent. The agents do the warming and the re-resolving themselves.
    State: the set lives here and in every agent; a restarted controller takes it back from the agents.
    """

    def __init__(self, wrapper_factory: Callable[[str, str | None], AgentWrapper] = ActorAgentWrapper):
        self._desired = DesiredSet()
        self._manager = AgentStateManager(wrapper_factory)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._has_set = False     # declared by set_desired, or taken back from the agents after a restart
        self.ticks = 0
        self.last_tick: dict | None = None
        self._thread = threading.Thread(target=self._run, name="prefetch-controller", daemon=True)
        self._thread.start()

    def ready(self) -> bool:
        return True

    def set_desired(self, uris: list[str], interval: float, format: str = "native") -> dict:
        with self._lock:
            self._desired = DesiredSet(tuple(dict.fromkeys(uris)), float(interval), format, time.time())
            self._has_set = True
        self._wake.set()
        return self.desired()

    def desired(self) -> dict:
        with self._lock:
            return self._desired.to_dict() | {"ticks": self.ticks, "last_tick": self.last_tick}

    def tick(self) -> dict:
        """One reconcile: agents on every alive node, the desired set pushed to each healthy one."""
        with self._lock:
            nodes = node_map(alive_nodes())
            self._manager.update(nodes)
            if not self._has_set:
                self._recover()
            d = self._desired
            healthy = [s for s in self._manager.states.values() if s.status == AgentStatus.HEALTHY]
            if self._has_set:   # never push "nothing" over a set an agent got from the daemon a moment ago
                for state in healthy:
                    state.handle.set_desired.remote(list(d.uris), d.interval, d.format)
            self.ticks += 1
            self.last_tick = {"at": time.time(), "nodes": len(nodes), "healthy": len(healthy),
                              "agents": [s.to_dict() for s in self._manager.states.values()]}
            return self.last_tick

    def _recover(self) -> None:
        """After a restart: adopt the newest non-empty set the agents hold."""
        import ray

        states = [s for s in self._manager.states.values() if s.status == AgentStatus.HEALTHY]
        if not states:
            return
        best = None
        for s in states:
            try:
                d = ray.get(s.handle.desired.remote(), timeout=HEALTH_CHECK_TIMEOUT_S)
            except Exception:  # noqa: BLE001
                continue
            if d.get("uris") and (best is None or (d.get("updated_at") or 0) > (best.get("updated_at") or 0)):
                best = d
        if best:
            self._desired = DesiredSet(tuple(best["uris"]), best["interval"], best["format"], best["updated_at"])
            self._has_set = True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - the loop outlives a bad tick (a GCS hiccup)
                self.last_tick = {"at": time.time(), "error": f"{type(e).__name__}: {one_line(e)}"}
            with self._lock:
                # While agents are starting, look again soon; otherwise at the set's interval (capped, so a
                # node that joins is noticed within MAX_TICK_S even when the set is re-resolved hourly).
                starting = any(s.status == AgentStatus.STARTING for s in self._manager.states.values())
                period = 0.5 if starting else min(self._desired.interval, MAX_TICK_S)
            self._wake.wait(period)
            self._wake.clear()

    def shutdown(self) -> None:
        """Stop the loop; returns once no tick is in progress (so no push of the old set is still being sent)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            pass


def _head_node_id() -> str | None:
    heads = [n.node_id for n in alive_nodes() if n.is_head]
    return heads[0] if heads else None


_controller_class = None


def get_or_create_controller():
    """The cluster's controller: detached, free (num_cpus=0), on the head node when it can be."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    global _controller_class
    if _controller_class is None:
        _controller_class = ray.remote(Controller)
    head = _head_node_id()
    strategy = NodeAffinitySchedulingStrategy(node_id=head, soft=True) if head else "DEFAULT"
    return _controller_class.options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0,
        max_concurrency=8, max_restarts=-1, max_task_retries=0, scheduling_strategy=strategy,
    ).remote()


def get_controller():
    import ray

    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def controller_desired(timeout: float = 10.0) -> dict | None:
    """The controller's desired set (None without a controller). Call when connected."""
    import ray

    handle = get_controller()
    if handle is None:
        return None
    try:
        return ray.get(handle.desired.remote(), timeout=timeout)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {one_line(e)}"}
