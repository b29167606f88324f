"""Lease holders as Ray actors: the hooks prefetch.store.lifecycle calls to describe and check them.

Temporary home: at the merge of issue G this moves into prefetch/cluster/compat.py (it uses the private
`ray._private.state.actors`, the GCS actor table: the public state API needs the dashboard). Importing this module
registers the hooks; it never imports ray itself (a process that has not imported ray is not in a Ray cluster).
Imported by the Ray-side callers: prefetch.agent and serving.loader.
"""
from __future__ import annotations

import sys

from .store.lifecycle import register_holder_hooks


def actor_identity() -> dict:
    """{actor_id, node_id} of the Ray actor this process is (None each outside an actor or outside Ray)."""
    ray = sys.modules.get("ray")
    try:
        if ray is None or not ray.is_initialized():
            return {"actor_id": None, "node_id": None}
        ctx = ray.get_runtime_context()
        return {"actor_id": ctx.get_actor_id(), "node_id": ctx.get_node_id()}
    except Exception:  # noqa: BLE001 - liveness metadata is best effort
        return {"actor_id": None, "node_id": None}


def actor_dead(doc: dict) -> bool | None:
    """True/False when the lease names a Ray actor, this process is connected to Ray and the GCS knows the actor;
    None otherwise (the lease's host and pid decide). Ray 2.x: ray._private.state.actors(actor_id=...)."""
    actor_id = doc.get("actor_id")
    if not actor_id:
        return None
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


register_holder_hooks(identity=actor_identity, probe=actor_dead)
