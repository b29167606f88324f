"""Which model version each Serve replica serves, readable from outside the replicas.

HTTP requests land on whichever replica the router picks, so "ask the app" cannot tell you what *every*
replica serves. Each RegistryModel replica therefore publishes its status into Ray's internal KV (GCS, cluster
wide) under its replica id, and `replica_status(app)` reads them back, keeping only replicas whose actor is
still alive. The same KV holds each deployment's last good model, which a replica that starts while the
deployment's `user_config` points at a broken version falls back to (DESIGN.md "Traps").
The KV calls themselves (a private Ray API) are in serving.control.compat.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from . import compat

logger = logging.getLogger(__name__)

NAMESPACE = "prefetch"
_STATUS = "serving/status/"          # + <app>/<deployment>/<replica unique id>
_LAST_GOOD = "serving/last-good/"    # + <app>/<deployment>/<code version>
_SERVE_NAMESPACE = "serve"
_REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"


def replica_identity() -> dict[str, Any]:
    """This process's Serve replica (app, deployment, replica id, code version), or {} outside Serve."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
    except Exception:
        return {}
    rid = ctx.replica_id
    out = {"app": rid.deployment_id.app_name, "deployment": rid.deployment_id.name, "replica": rid.unique_id,
           "replica_actor": rid.to_full_id_str(), "code_version": getattr(ctx, "code_version", None),
           "pid": os.getpid()}
    try:
        import ray

        out["node_id"] = ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    return out


def publish(identity: dict, status: dict) -> None:
    """Best effort: a replica that cannot publish keeps serving (its status is also on GET /-/model)."""
    if not identity or not compat.kv_ready():
        return
    key = f"{_STATUS}{identity['app']}/{identity['deployment']}/{identity['replica']}"
    try:
        compat.kv_put(key, json.dumps({**status, "published_at": time.time()}, default=str), NAMESPACE)
    except Exception as e:
        logger.warning("could not publish replica status: %s", e)


def unpublish(identity: dict) -> None:
    if not identity or not compat.kv_ready():
        return
    try:
        compat.kv_del(f"{_STATUS}{identity['app']}/{identity['deployment']}/{identity['replica']}", NAMESPACE)
    except Exception:
        pass


def remember_last_good(identity: dict, config: dict) -> None:
    if not identity or not compat.kv_ready():
        return
    try:
        compat.kv_put(_last_good_key(identity), json.dumps(config), NAMESPACE)
    except Exception as e:
        logger.warning("could not record the last good model: %s", e)


def last_good(identity: dict) -> dict | None:
    """The config of the last model a replica of this deployment (same code version) served successfully."""
    if not identity or not compat.kv_ready():
        return None
    try:
        raw = compat.kv_get(_last_good_key(identity), NAMESPACE)
    except Exception:
        return None
    return json.loads(raw) if raw else None


def _last_good_key(identity: dict) -> str:
    # Keyed by code version: a redeploy (new code, args or runtime_env) starts without a fallback, while
    # replicas of the same deployment generation (hot swaps via user_config) share one.
    return f"{_LAST_GOOD}{identity['app']}/{identity['deployment']}/{identity.get('code_version') or '-'}"


def replica_status(app: str, deployment: str | None = None) -> list[dict]:
    """Status of every live RegistryModel replica of `app` (needs a connected Ray driver):
    [{app, deployment, replica, node_id, model, version, key, uri, format, error, ...}], sorted by replica."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("replica_status needs a connected Ray driver (ray.init(address=...))")
    prefix = f"{_STATUS}{app}/" + (f"{deployment}/" if deployment else "")
    keys = compat.kv_list(prefix, NAMESPACE)
    live = _live_replica_actors()
    rows = []
    for key in keys:
        key = key.decode() if isinstance(key, bytes) else key
        raw = compat.kv_get(key, NAMESPACE)
        if not raw:
            continue
        row = json.loads(raw)
        if live is not None and row.get("replica_actor") not in live:
            # A replica that died without unpublishing: drop its record.
            compat.kv_del(key, NAMESPACE)
            continue
        rows.append(row)
    return sorted(rows, key=lambda r: (r.get("deployment") or "", r.get("replica") or ""))


def _live_replica_actors() -> set[str] | None:
    import ray

    try:
        actors = ray.util.list_named_actors(all_namespaces=True)
    except Exception:
        return None
    return {a["name"] for a in actors
            if a.get("namespace") == _SERVE_NAMESPACE and a["name"].startswith(_REPLICA_ACTOR_PREFIX)}
