"""How a process finds its node's cache directory, and who "this node" is, inside a Ray cluster.

One rule for every process on a node (the agent, Serve replicas, Ray tasks): the node label
`prefetch-cache-dir` names the node's cache directory (its NVMe mount). Set it where the node starts:

    ray start --address=HEAD --labels='{"prefetch-cache-dir": "/nvme/prefetch"}'        # Ray >= 2.60
    cluster.add_node(labels={"prefetch-cache-dir": str(tmp / "node-1")})                 # tests

Without the label, PREFETCH_CACHE_DIR in the node's environment (workers inherit the raylet's env,
so a KubeRay container `env:` works), then the default. A label value may hold a path only in the JSON
form of `--labels` (or `add_node(labels=...)`): the `key=value` form and KubeRay's label validation
follow Kubernetes syntax, which forbids "/". There, use PREFETCH_CACHE_DIR in the container env.

Also here: the alive nodes of the cluster (`alive_nodes`, for a connected driver or actor).

Nothing here imports ray at import time, and the helpers for "this process" look at `sys.modules`, so a CLI
run (or a library user who never touches Ray) pays nothing. `ray_if_initialized` is the one "is Ray initialized
in this process?" check of the package: everything else asks it.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Iterable

CACHE_DIR_LABEL = "prefetch-cache-dir"


def ray_if_initialized():
    """The ray module if this process already imported and initialized it, else None (never imports ray)."""
    ray = sys.modules.get("ray")
    if ray is None:
        return None
    try:
        return ray if ray.is_initialized() else None
    except Exception:   # half-imported ray (during its own import): behave as if absent
        return None


def in_ray_worker() -> bool:
    """True inside a Ray task or actor (a replica, the agent); False in a driver or without Ray."""
    ray = ray_if_initialized()
    if ray is None:
        return False
    try:
        return ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:
        return False


def node_labels() -> dict[str, str]:
    """This process's Ray node labels ({} outside an initialized Ray)."""
    ray = ray_if_initialized()
    if ray is None:
        return {}
    try:
        return dict(ray.get_runtime_context().get_node_labels() or {})
    except Exception:
        return {}


def label_cache_dir(labels: dict[str, str] | None = None) -> Path | None:
    """The cache dir a node's labels declare (labels: one node's, e.g. from ray.nodes(); default: this node's)."""
    value = (labels if labels is not None else node_labels()).get(CACHE_DIR_LABEL)
    return Path(value).expanduser() if value else None


def node_cache_dir() -> Path | None:
    """This node's cache dir from its Ray label, when this process runs in an initialized Ray; else None.

    The fallbacks (PREFETCH_CACHE_DIR, the TOML file, the default) are Settings.load()'s, which calls this
    inside Ray workers only: a driver (a test process, a laptop connected to a cluster) keeps its own cache dir
    and never writes into the node it happens to be connected to.
    """
    label = label_cache_dir()
    return label.resolve() if label is not None else None


def current_node_id() -> str | None:
    ray = ray_if_initialized()
    if ray is None:
        return None
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


# -- the cluster's nodes ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NodeInfo:
    node_id: str
    node_ip: str
    is_head: bool
    labels: dict

    @property
    def cache_dir(self) -> str | None:
        return self.labels.get(CACHE_DIR_LABEL)


def alive_nodes() -> list[NodeInfo]:
    """Alive nodes, head first, then by address (a stable order for tables). Needs a connected process."""
    import ray

    nodes = [NodeInfo(n["NodeID"], n.get("NodeManagerAddress", ""), "node:__internal_head__" in n.get("Resources", {}),
                      dict(n.get("Labels") or {}))
             for n in ray.nodes() if n.get("Alive")]
    return sorted(nodes, key=lambda n: (not n.is_head, n.node_ip, n.node_id))


def node_map(nodes: Iterable[NodeInfo]) -> dict[str, str]:
    """node_id -> node_ip: what AgentStateManager.update() takes."""
    return {n.node_id: n.node_ip for n in nodes}
