"""Every private Ray / Serve name Serve control uses, in one place (written against Ray 2.60).

Each function says which private name it uses and what the public alternative is (or that there is none), so a
Ray upgrade that moves one breaks this module only. Nothing outside it touches `ray.serve.context`,
`ray.experimental.internal_kv` or `ray._private`.

Serve's apps are read and changed through Serve's REST API on the dashboard where one runs (`GET/PUT
/api/serve/applications/`, what `serve status` / `serve deploy` use, with the same token auth headers), and
through the Serve controller client of the connected driver where none does (clusters started with
include_dashboard=False, as the tests' are). Ray and Serve are imported inside functions only.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

logger = logging.getLogger(__name__)


# -- Serve's apps: REST API first, the controller client as the fallback ------------------------------------------
def dashboard_url() -> Optional[str]:
    """The connected cluster's dashboard (http://host:port), or None when it runs without one.

    RAY_DASHBOARD_ADDRESS first (what the `serve` CLI reads); else the URL the cluster recorded.
    Private (Ray 2.60): `ray._private.worker.get_dashboard_url`; public alternative: the `dashboard_url` of the
    RayContext `ray.init()` returns, which prefetch.cluster.connect does not keep."""
    url = os.environ.get("RAY_DASHBOARD_ADDRESS")
    if not url:
        try:
            from ray._private.worker import get_dashboard_url

            url = get_dashboard_url()
        except Exception:  # noqa: BLE001 - not connected, or the name moved: no REST path, use the client
            return None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def _rest():
    """Serve's REST client on the dashboard (ray.dashboard.modules.serve.sdk, public: what `serve deploy` uses;
    it adds the token auth header itself when this process runs in token mode), or None without a dashboard."""
    url = dashboard_url()
    if url is None:
        return None
    try:
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        return ServeSubmissionClient(url)
    except Exception as e:  # noqa: BLE001 - no dashboard answers there (or no ray[default]): use the client
        logger.debug("Serve REST API not reachable at %s (%s): using the controller client", url, e)
        return None


def _controller_client():
    """The connected driver's Serve controller client.

    Private (Ray 2.60): `ray.serve.context._get_global_client`; public alternative: the REST API above (needs a
    dashboard). Raises ray.serve.exceptions.RayServeException when Serve is not running."""
    from ray.serve.context import _get_global_client

    return _get_global_client()


def get_serve_details() -> Optional[dict]:
    """ServeInstanceDetails as JSON-able dicts (apps, their configs and deployments); None when Serve is not
    running on the connected cluster (the REST API then answers an empty schema, the client raises)."""
    from ray.serve.exceptions import RayServeException

    rest = _rest()
    if rest is not None:
        details = rest.get_serve_details()
        return details if (details.get("controller_info") or {}).get("node_id") else None
    try:
        return _controller_client().get_serve_details()
    except RayServeException:
        return None


def deploy_apps(config: dict) -> None:
    """Deploy a whole ServeDeploySchema document (Serve deletes declarative apps missing from it)."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    rest = _rest()
    if rest is not None:
        rest.deploy_applications(schema.model_dump(mode="json", exclude_unset=True))
        return
    _controller_client().deploy_apps(schema)


# -- Ray's internal KV (replica status, last good model) ----------------------------------------------------------
# Private (Ray 2.60): `ray.experimental.internal_kv`. Public alternative: none in Ray for a cluster-wide KV; the
# design's is replicas reporting to their node agent (a named actor), which is a behaviour change left for later.
def kv_ready() -> bool:
    import ray

    if not ray.is_initialized():
        return False
    from ray.experimental import internal_kv

    return bool(internal_kv._internal_kv_initialized())


def kv_put(key: str, value: str | bytes, namespace: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=namespace)


def kv_get(key: str, namespace: str) -> Any:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get(key, namespace=namespace)


def kv_del(key: str, namespace: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key, namespace=namespace)


def kv_list(prefix: str, namespace: str) -> list:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_list(prefix, namespace=namespace)
