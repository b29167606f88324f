"""Memory planning: how much memory one replica of a model needs, so Ray admits it only where it fits.

The Ray guide's rule of thumb is 1.5-2x the serialized model size per replica, written by hand into
`ray_actor_options={"memory": ...}`. Here the size comes from the model itself: MLmodel's `model_size_bytes`
(what MLflow measured when it logged the model), else the size of the cached copy, else the size of the origin's
listing. Reading it costs no download: the cached MLmodel, or one small GET of the origin's MLmodel.

Once a replica has loaded the model on this node, what the load really cost is known (serving.memory_profile):
a private part every replica pays and a shared part (the mapped weights) a node holds once. Then K replicas need
K x private + one shared copy per node, and `ray_actor_options["memory"]` reserves the private part only (the
shared pages are page cache, not any one actor's). Without a measurement the rule of thumb stays, labelled so.
Measured private memory is what the load allocated; inference working memory (activations) comes on top: add it
with `overhead_bytes` where it matters.
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


RULE_OF_THUMB = "rule of thumb: factor x model size per replica, nothing shared (no load measured on this node)"
MEASURED = "measured: private bytes per replica + one shared copy of the mapped weights per node"


class MemoryEstimate(int):
    """Bytes to reserve per replica (an int, as before), with the plan for `replicas` replicas attached:
    private_bytes per replica, shared_bytes once per node, total_bytes, basis ("measured" | "rule of thumb")."""

    replicas: int
    format: str
    basis: str
    note: str
    model_bytes: int
    private_bytes: int
    shared_bytes: int
    total_bytes: int
    profile: str | None

    def __new__(cls, per_replica_bytes: int, **fields):
        self = super().__new__(cls, per_replica_bytes)
        for k, v in fields.items():
            setattr(self, k, v)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"replicas": self.replicas, "format": self.format, "basis": self.basis, "basis_note": self.note,
                "model_bytes": self.model_bytes, "per_replica_bytes": int(self),
                "private_per_replica_bytes": self.private_bytes, "shared_bytes": self.shared_bytes,
                "total_bytes": self.total_bytes, "profile": self.profile}


def memory_for(uri: str, factor: float = 2.0, *, replicas: int = 1, format: str = "native",
               overhead_bytes: int = 0, settings=None) -> MemoryEstimate:
    """Bytes to reserve per replica of uri served as `format`, with the plan for `replicas` replicas attached.

    Measured on this node (a load recorded a profile): the private bytes of one replica (+ overhead_bytes);
    `.shared_bytes` once per node; `.total_bytes` = shared + replicas x per replica. Otherwise the rule of thumb:
    factor x the model's serialized size (+ overhead) per replica, nothing shared."""
    _check(factor, overhead_bytes)
    if replicas < 1:
        raise BadURI(f"replicas must be at least 1 (got {replicas})")
    size = model_size(uri, settings)
    return estimate(size, factor, replicas=replicas, format=format, overhead_bytes=overhead_bytes,
                    settings=settings)


def estimate(size: ModelSize, factor: float, *, replicas: int, format: str, overhead_bytes: int,
             settings=None) -> MemoryEstimate:
    from prefetch.config import Settings

    from .memory_profile import profile_path, read_profile

    root = (settings or Settings.load()).cache_dir
    profile = read_profile(root, size.key, format)
    if profile is None:
        each = per_replica(size.bytes, factor, overhead_bytes)
        return MemoryEstimate(each, replicas=replicas, format=format, basis="rule of thumb", note=RULE_OF_THUMB,
                              model_bytes=size.bytes, private_bytes=each, shared_bytes=0,
                              total_bytes=each * replicas, profile=None)
    private = int(profile["private_bytes"])
    shared = int(profile["shared_bytes"])
    each = private + int(overhead_bytes)
    return MemoryEstimate(each, replicas=replicas, format=format, basis="measured", note=MEASURED,
                          model_bytes=size.bytes, private_bytes=private, shared_bytes=shared,
                          total_bytes=shared + each * replicas, profile=str(profile_path(root, size.key, format)))


def per_replica(model_bytes: int, factor: float, overhead_bytes: int = 0) -> int:
    return int(math.ceil(model_bytes * factor)) + int(overhead_bytes)


def actor_options(uri: str, factor: float = 2.0, *, format: str = "native", overhead_bytes: int = 0,
                  settings=None, **extra) -> dict:
    """`ray_actor_options` for a replica of uri: `extra` (num_cpus, ...) with `memory` set: the measured
    private part when a load was profiled on this node (the shared weights are no one actor's), else the rule.

        @serve.deployment(ray_actor_options=actor_options("models:/fraud/3", num_cpus=1))
    """
    each = memory_for(uri, factor, format=format, overhead_bytes=overhead_bytes, settings=settings)
    return {**extra, "memory": int(each)}


def plan(uri: str, replicas: int, factor: float = 2.0, *, overhead_bytes: int = 0, address: str | None = None,
         settings=None, format: str = "native") -> dict[str, Any]:
    """Per-replica and total memory for `replicas` replicas; with `address`, also what the cluster can hold."""
    from prefetch.formats import FORMATS

    if replicas < 1:
        raise BadURI(f"--replicas must be at least 1 (got {replicas})")
    if format not in FORMATS:
        raise BadURI(f"--format must be one of {', '.join(FORMATS)} (got '{format}')", uri)
    _check(factor, overhead_bytes)
    size = model_size(uri, settings)
    est = estimate(size, factor, replicas=replicas, format=format, overhead_bytes=overhead_bytes,
                   settings=settings)
    each = int(est)
    doc: dict[str, Any] = {
        "uri": uri, "key": size.key, "name": size.name, "version": size.version,
        "model_bytes": size.bytes, "size_source": size.source, "factor": factor, "overhead_bytes": overhead_bytes,
        **est.to_dict(),
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
