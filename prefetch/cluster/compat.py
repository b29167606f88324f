"""Every private Ray name the prefetch package uses, in one place (written against Ray 2.60).

Each function says which private name it needs, why, and the public alternative where one exists. When Ray
moves one of these, this file is the only one to change; every function fails soft (an "unknown" answer) so a
moved helper degrades a check, never a warm. Nothing here imports ray at import time: the GCS probe imports
Ray's gRPC stubs when called, and the liveness helpers use the ray of this process only if it is initialized.
"""
from __future__ import annotations

import os
from typing import Any

from .node import ray_if_initialized


# -- the GCS token probe (prefetch.cluster.fanout.connect) ------------------------------------------------------
def probe_gcs(address: str, metadata: tuple = ()) -> tuple[str, str]:
    """Ask the GCS at host:port for its cluster id without a token: ("plain"|"token"|"unreachable"|"unknown", detail).

    Milliseconds, where ray.init needs ~20 s of retries to give up on a refused token or a closed port.
    Private (Ray 2.60): `ray.core.generated.gcs_service_pb2(_grpc)`, the GCS's own gRPC stubs.
    Public alternative: none; `ray.init(address=...)` answers the same question, after its retries."""
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


def enable_token_mode() -> tuple:
    """What Ray itself does for address "auto" when a token exists (authentication_token_setup._enable_token_auth).
    Returns the gRPC metadata Ray will send (to check the token before ray.init), or () if unknown.

    Private (Ray 2.60): `ray._private.authentication...._get_authentication_metadata_tuple`,
    `ray._raylet.AuthenticationTokenLoader` and `ray._raylet.Config.initialize` (re-read RAY_AUTH_MODE in a
    process that already imported ray). Public alternative: RAY_AUTH_MODE=token in the environment before ray is
    imported (what we set first); the metadata has none: without it we skip the early token check."""
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


# -- actor handles ------------------------------------------------------------------------------------------------
def actor_handle_id(handle: Any) -> str:
    """The hex id of the actor behind a handle (for tables and the lease check).

    Private (Ray 2.60): `ActorHandle._actor_id`. Public alternative: `ray.get_runtime_context().get_actor_id()`,
    but only inside the actor itself (the agent reports it in `ready()` for that reason too)."""
    return handle._actor_id.hex()


# -- lease liveness (prefetch.store lifecycle hooks: register_holder_hooks(identity=..., probe=...)) -------------
def actor_identity() -> dict:
    """Who holds a lease taken in this process, as a lease records it: {"actor_id", "node_id"}.

    Inside a Ray actor both are set; in a Ray driver or task actor_id is None (the node is still recorded, as
    lease records always had it); {} outside an initialized Ray (never imports ray).
    Public (Ray 2.60): `ray.get_runtime_context().get_actor_id()` / `.get_node_id()`; nothing private here."""
    ray = ray_if_initialized()
    if ray is None:
        return {}
    try:
        ctx = ray.get_runtime_context()
        return {"actor_id": ctx.get_actor_id(), "node_id": ctx.get_node_id()}
    except Exception:  # noqa: BLE001 - liveness metadata is best effort
        return {}


def actor_dead(doc: dict) -> bool | None:
    """Is the Ray actor that wrote this lease record dead? True/False when this process is connected to Ray and
    the GCS knows the actor; None otherwise (no actor_id, no Ray here, another cluster's actor): the caller then
    falls back to the pid.

    Private (Ray 2.60): `ray._private.state.actors(actor_id=...)`, the GCS actor table.
    Public alternatives, and why they are not used: `ray.util.state.get_actor(id)` asks the dashboard, which many
    clusters (and the test clusters) do not run; `ray.util.list_named_actors(all_namespaces=True)` lists alive
    *named* actors by name only: an unnamed holder is invisible and a name is reused by the actor's successor
    (a restarted agent), so it cannot tell that this holder died."""
    actor_id = doc.get("actor_id")
    if not actor_id:
        return None
    ray = ray_if_initialized()
    if ray is None:
        return None
    try:
        from ray._private import state

        info = state.actors(actor_id=actor_id)
    except Exception:  # noqa: BLE001 - another cluster, a disconnected worker: fall back to the pid
        return None
    if not info:
        return None
    return info.get("State") == "DEAD"


def register_lease_hooks() -> None:
    """Let the store's lease records name the Ray actor that holds them, and check that actor's liveness
    (called at import by the Ray-side holders: the node agent and serving.loader)."""
    from ..store.lifecycle import register_holder_hooks

    register_holder_hooks(identity=actor_identity, probe=actor_dead)
