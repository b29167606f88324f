"""The Ray cluster layer: one agent per node (agent.py), the desired-set controller (controller.py), what a
caller runs against the whole cluster (fanout.py), the Ray-free reconcile state machine (state.py), the desired
set (desired.py), who "this node" is (node.py), chunks between nodes (peers.py: the tracker and the source that
routes each chunk; swarm.py: the tracker's Ray-free rules; chunk_server.py: what an agent serves), the named
actors (names.py), and every private Ray call (compat.py).

    from prefetch.cluster import connect, warm_cluster, cluster_status

Names resolve lazily: `import prefetch.cluster.node` (what Settings.load() does inside a Ray worker) imports
nothing else, and nothing here imports ray until a function needs it.
"""
from __future__ import annotations

_LAZY = {
    # fanout: a caller against the whole cluster
    "connect": "fanout", "ensure_agents": "fanout", "warm_cluster": "fanout", "cluster_status": "fanout",
    "gather": "fanout", "run_daemon": "fanout", "clear_desired": "fanout",
    # node: this process's node, the cluster's nodes
    "NodeInfo": "node", "alive_nodes": "node", "current_node_id": "node", "in_ray_worker": "node",
    "CACHE_DIR_LABEL": "node",
    # the agents and the controller
    "NAMESPACE": "agent", "agent_name": "agent", "get_agent": "agent", "get_or_create_agent": "agent",
    "warm_via_local_agent": "agent", "NodeAgent": "agent", "ActorAgentWrapper": "agent",
    "CONTROLLER_NAME": "controller", "get_controller": "controller", "controller_desired": "controller",
    "TRACKER_NAME": "names", "get_or_create_tracker": "peers",
    # the state machine and the desired set
    "AgentStatus": "state", "AgentWrapper": "state", "AgentState": "state", "AgentStateManager": "state",
    "DesiredSet": "desired", "parse_models": "desired", "load_models": "desired", "validate_uris": "desired",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
