"""Memory planning: how much memory one replica of a model needs, so Ray admits it only where it fits.

The Ray guide's rule of thumb is 1.5-2x the serialized model size per replica, written by hand into
`ray_actor_options={"memory": ...}`. Here the size comes from the model itself: MLmodel's `model_size_bytes`
(what MLflow measured when it logged the model), else the size of the cached copy, else the size of the origin's
listing. Reading it costs no download: the cached MLmodel, or one small GET of the origin's MLmodel.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from prefetch.errors import BadURI


@dataclasses.dataclass(frozen=True)
class ModelSize:
    bytes: int
    source: str          # "MLmodel model_size_bytes" | "cached size" | "origin listing"
    uri: str
    key: str
    name: str | None
    version: str | None


def model_size(uri: str, settings=None) -> ModelSize:
    """The serialized size of uri's model, from the cache when it is there, else from the origin."""
    from prefetch.config import Settings
    from prefetch.store import Store
    from prefetch.uri import identify, locate

    settings = settings or Settings.load()
    store = Store(settings.cache_dir)
    resolved = identify(uri, settings, store)
    manifest = store.lookup(resolved.key, touch=False)
    if manifest is not None:
        name = resolved.name or manifest.resolved.get("name")
        version = resolved.version or manifest.resolved.get("version")
        mlmodel = store.paths.object_dir(resolved.key) / "MLmodel"
        declared = _declared_size(mlmodel.read_bytes()) if mlmodel.is_file() else None
        if declared:
            return ModelSize(declared, "MLmodel model_size_bytes", uri, resolved.key, name, version)
        return ModelSize(manifest.bytes, "cached size", uri, resolved.key, name, version)
    source, files, resolved = locate(resolved, settings)
    entry = next((f for f in files if f.path == "MLmodel"), None)
    if entry is not None:
        declared = _declared_size(b"".join(source.read("MLmodel")))
        if declared:
            return ModelSize(declared, "MLmodel model_size_bytes", uri, resolved.key, resolved.name, resolved.version)
    return ModelSize(sum(f.size for f in files), "origin listing", uri, resolved.key, resolved.name, resolved.version)


def _declared_size(mlmodel_text: bytes) -> int | None:
    import yaml

    try:
        doc = yaml.safe_load(mlmodel_text)
    except yaml.YAMLError:
        return None
    value = doc.get("model_size_bytes") if isinstance(doc, dict) else None
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def memory_for(uri: str, factor: float = 2.0, *, overhead_bytes: int = 0, settings=None) -> int:
    """Bytes to reserve per replica: factor x the model's serialized size (+ a fixed overhead, e.g. the
    Python runtime and framework imports, if you want it counted too)."""
    _check(factor, overhead_bytes)
    return per_replica(model_size(uri, settings).bytes, factor, overhead_bytes)


def per_replica(model_bytes: int, factor: float, overhead_bytes: int = 0) -> int:
    return int(math.ceil(model_bytes * factor)) + int(overhead_bytes)


def actor_options(uri: str, factor: float = 2.0, *, overhead_bytes: int = 0, settings=None, **extra) -> dict:
    """`ray_actor_options` for a replica of uri: `extra` (num_cpus, ...) with `memory` set.

        @serve.deployment(ray_actor_options=actor_options("models:/fraud/3", num_cpus=1))
    """
    return {**extra, "memory": memory_for(uri, factor, overhead_bytes=overhead_bytes, settings=settings)}


def plan(uri: str, replicas: int, factor: float = 2.0, *, overhead_bytes: int = 0, address: str | None = None,
         settings=None) -> dict[str, Any]:
    """Per-replica and total memory for `replicas` replicas; with `address`, also what the cluster can hold."""
    if replicas < 1:
        raise BadURI(f"--replicas must be at least 1 (got {replicas})")
    _check(factor, overhead_bytes)
    size = model_size(uri, settings)
    each = per_replica(size.bytes, factor, overhead_bytes)
    doc: dict[str, Any] = {
        "uri": uri, "key": size.key, "name": size.name, "version": size.version,
        "model_bytes": size.bytes, "size_source": size.source, "factor": factor, "overhead_bytes": overhead_bytes,
        "replicas": replicas, "per_replica_bytes": each, "total_bytes": each * replicas,
        "ray_actor_options": {"memory": each}, "cluster": None,
    }
    if address:
        doc["cluster"] = cluster_fit(address, each, replicas)
    return doc


def cluster_fit(address: str, per_replica_bytes: int, replicas: int) -> dict[str, Any]:
    """Connect to a running Ray cluster (never start one) and count how many replicas its nodes can admit."""
    unreachable = _probe(address)
    if unreachable:
        return {"address": address, "reachable": False, "error": unreachable}
    import ray

    connected_here = not ray.is_initialized()
    try:
        if connected_here:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
        nodes = []
        for n in ray.nodes():
            if not n.get("Alive"):
                continue
            memory = int(n.get("Resources", {}).get("memory", 0))
            nodes.append({"node_id": n["NodeID"], "address": n.get("NodeManagerAddress"), "memory_bytes": memory,
                          "replicas_fit": memory // per_replica_bytes if per_replica_bytes else 0})
        available = int(ray.available_resources().get("memory", 0))
    except Exception as e:   # optional information: say why it is missing instead of failing the plan
        return {"address": address, "reachable": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    finally:
        if connected_here and ray.is_initialized():
            ray.shutdown()
    fit = sum(n["replicas_fit"] for n in nodes)
    return {"address": address, "reachable": True, "nodes": nodes,
            "memory_bytes": sum(n["memory_bytes"] for n in nodes), "available_memory_bytes": available,
            "replicas_fit": fit, "fits": fit >= replicas}


def _probe(address: str) -> str | None:
    """Why a host:port GCS address cannot be reached, or None. (ray.init retries an unreachable address for
    minutes; a plan should not.) `auto` and ray:// addresses are left to ray.init."""
    import socket

    if address == "auto" or "://" in address or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except (OSError, ValueError) as e:
        return f"cannot connect to the Ray cluster at {address} ({e})"
    return None


def _check(factor: float, overhead_bytes: int) -> None:
    if not factor > 0:
        raise BadURI(f"factor must be greater than 0 (got {factor})")
    if overhead_bytes < 0:
        raise BadURI(f"overhead must not be negative (got {overhead_bytes})")


def cluster_too_small(doc: dict[str, Any]) -> bool:
    """A plan's verdict: True when a reachable cluster cannot admit its replicas (`prefetch plan` exits 6).
    An unreachable cluster is no verdict: the plan still stands on its own."""
    cluster = doc.get("cluster")
    return bool(cluster and cluster.get("reachable") and not cluster["fits"])
