"""Serve control through Serve's REST API (the dashboard's /api/serve/applications/), on a real Ray cluster whose
head runs a dashboard, with a real Serve app answering HTTP.

The other Serve tests run without a dashboard, so there serving.control.compat falls back to the driver's
Serve controller client. Here that client is made unusable, so every read and every deploy below can only have
gone over the dashboard's HTTP API: if compat quietly took the client path, the test fails.
"""
from __future__ import annotations

import time

import pytest
import requests
from ray import serve

from tests import harness
from tests.harness.ports import LOOPBACK


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
class Echo:
    """Answers with the `x` of its user_config: what a hot swap through the REST API changed."""

    def __init__(self) -> None:
        self.x = None

    def reconfigure(self, config: dict) -> None:
        self.x = config.get("x")

    async def __call__(self, request) -> dict:
        return {"x": self.x}


app = Echo.bind()


@pytest.fixture(scope="module")
def dashboard_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    dashboard_port = harness.free_port()
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, object_store_memory=100 << 20, include_dashboard=True, dashboard_host=LOOPBACK,
        dashboard_port=dashboard_port, dashboard_agent_listen_port=harness.free_port()))
    try:
        from prefetch.cluster import connect

        connect(cluster.address)
        yield dashboard_port
    finally:
        try:
            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        cluster.shutdown()


def wait_for(probe, timeout: float = 240.0, what: str = "it"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"no {what} in {timeout:.0f}s")


def test_apps_are_read_and_switched_over_the_rest_api(dashboard_cluster, monkeypatch):
    from serving.control import compat
    from serving.control.apps import apply_configs, declarative_configs, serve_details

    def no_client():
        raise AssertionError("the Serve controller client was used although a dashboard runs")

    monkeypatch.setattr(compat, "_controller_client", no_client)
    assert compat.dashboard_url() == f"http://{LOOPBACK}:{dashboard_cluster}"
    assert compat.get_serve_details() is None, "Serve is not running yet"
    port = harness.free_port()
    serve.start(http_options={"host": LOOPBACK, "port": port})
    url = f"http://{LOOPBACK}:{port}/echo"
    config = {"name": "echo", "route_prefix": "/echo", "import_path": "tests.test_serve_rest:app",
              "deployments": [{"name": "Echo", "user_config": {"x": 1}}]}
    apply_configs([config], None)
    wait_for(lambda: (serve_details()["applications"].get("echo") or {}).get("status") == "RUNNING",
             what="app RUNNING")
    assert requests.get(url, timeout=30).json() == {"x": 1}
    # What the rollout does: re-apply the declarative set it read, with one app's user_config changed.
    details = serve_details()
    new = declarative_configs(details)["echo"]
    new["deployments"][0]["user_config"] = {"x": 2}
    apply_configs([new], details.get("target_capacity"))
    wait_for(lambda: requests.get(url, timeout=30).json() == {"x": 2}, what="the hot swap")
    live = serve_details()["applications"]["echo"]["deployments"]["Echo"]["deployment_config"]["user_config"]
    assert live == {"x": 2}
