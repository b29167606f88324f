"""The cluster layer's named actors and how to find them: every node's agent, the tracker of peer chunks.

Here, apart from the actors themselves, so that modules which call each other's actors (an agent's download asks
other agents for chunks; the tracker asks agents what they hold) find them without importing each other."""
from __future__ import annotations

NAMESPACE = "prefetch"
AGENT_PREFIX = "prefetch-agent-"
TRACKER_NAME = "prefetch-tracker"


def agent_name(node_id: str) -> str:
    return f"{AGENT_PREFIX}{node_id}"


def get_agent(node_id: str):
    """The running agent of node_id, or None (never starts one)."""
    import ray

    try:
        return ray.get_actor(agent_name(node_id), namespace=NAMESPACE)
    except ValueError:
        return None
