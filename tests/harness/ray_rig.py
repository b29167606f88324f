"""A multi-node Ray cluster for tests (ray.cluster_utils.Cluster): every node started in a given environment
(its raylet and workers inherit it, as on a real node) with its own cache dir declared by the node label
`prefetch-cache-dir`, plus the poll helper the cluster tests share."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from prefetch.store import Store

from . import models as _models
from .ports import free_port

LABEL = "prefetch-cache-dir"
NODE_ARGS = dict(num_cpus=1, object_store_memory=100 << 20)


def _set_environ(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def environ(changes: dict[str, str | None]):
    """os.environ with `changes` (None removes a variable) for the block: what a node started now inherits."""
    saved = {k: os.environ.get(k) for k in changes}
    try:
        _set_environ(changes)
        yield
    finally:
        _set_environ(saved)


class Rig:
    """A cluster whose nodes are added in the registry environment `env`, each with its own cache dir."""

    def __init__(self, cluster, env, seed, root: Path):
        self.cluster, self.env, self.seed, self.root = cluster, env, seed, root
        self.dirs: dict[str, Path] = {}     # node_id -> the cache dir its processes must use

    @property
    def address(self) -> str:
        return self.cluster.address

    def decoy(self, name: str) -> Path:
        return self.root / "decoy" / name

    def add_node(self, name: str, cache_dir: Path | None = None, *, label: bool = True,
                 env: dict[str, str | None] | None = None, expect: Path | None = None):
        """A node started in the registry's environment (its raylet and workers inherit it, as on a real node).

        label: declare cache_dir (default root/name) with the node label; its environment then also holds a decoy
        PREFETCH_CACHE_DIR, which the label must beat. env: more of the node's environment (None removes a
        variable). expect: the cache dir the node's processes must use (default: the labelled one).
        Retried once: on a loaded 2-core machine a raylet may miss Ray's 30 s start-up."""
        cache_dir = cache_dir or (self.root / name)
        args = dict(NODE_ARGS)
        node_env: dict[str, str | None] = {}
        if label:
            args["labels"] = {LABEL: str(cache_dir)}
            node_env["PREFETCH_CACHE_DIR"] = str(self.decoy(name))
        node_env |= env or {}
        with _models.mlflow_env(self.env), environ(node_env):
            for attempt in range(2):
                if self.cluster.head_node is None:
                    # A head's dashboard agent listens on 52365 by default: another Ray head on this shared machine
                    # (anyone's ray.init()) makes ours die at start-up. Worker nodes already get a random port.
                    args |= {"include_dashboard": False, "dashboard_agent_listen_port": free_port()}
                try:
                    node = self.cluster.add_node(**args)
                    break
                except (RuntimeError, TimeoutError):   # Ray: a raylet that did not start (register) in time
                    if attempt:
                        raise
        self.dirs[node.node_id] = expect or cache_dir
        return node

    def remove_node(self, node) -> None:
        from prefetch.cluster import alive_nodes

        self.cluster.remove_node(node)
        self.dirs.pop(node.node_id, None)
        wait_for(lambda: node.node_id not in {n.node_id for n in alive_nodes()}, 60, "the removed node to leave")

    def store(self, node_id: str) -> Store:
        return Store(self.dirs[node_id])


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    """Poll predicate until it returns something true. Its errors are not caught: they are the answer."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)
