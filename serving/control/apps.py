"""The running Serve apps, as `prefetch rollout` / `watch` / `status --app` see and change them.

Through Serve's declarative API (serving.control.compat: the dashboard's REST API where one runs, the Serve
controller client where none does): the instance details give each app's status, source (declarative or
serve.run), the config it was deployed with and its deployments' live options (user_config, replicas); a deploy
takes the *whole* set of declarative apps (Serve deletes declarative apps missing from it), so a caller changes
one app by re-applying every declarative app's config with only that one changed.
What each replica serves comes from the replicas themselves (serving.control.replicas).
The `status --app` table is drawn by prefetch.render from app_status()'s dict.

Ray and Serve are imported inside functions only.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable

from prefetch.errors import BadURI, NotFound

from . import compat


def enum_value(x: Any) -> str:
    """An enum Serve puts in its details (ApplicationStatus.RUNNING, APIType.DECLARATIVE) as its plain value."""
    return str(getattr(x, "value", x))


# -- the apps -----------------------------------------------------------------------------------------------------
def serve_details() -> dict:
    """Serve's instance details (ServeInstanceDetails as JSON-able dicts): apps, their configs and deployments."""
    details = compat.get_serve_details()
    if details is None:
        raise NotFound("Serve is not running on this Ray cluster")
    return details


def declarative_configs(details: dict) -> dict[str, dict]:
    """app name -> the config it was deployed with, for every declaratively deployed app (same order)."""
    out = {}
    for name, app in (details.get("applications") or {}).items():
        if enum_value(app.get("source")) == "declarative" and app.get("deployed_app_config"):
            out[name] = copy.deepcopy(app["deployed_app_config"])
    return out


@dataclasses.dataclass
class AppView:
    """A running app as the rollout sees it."""

    name: str
    status: str
    source: str
    config: dict | None                   # its declarative config (None for serve.run apps)
    deployments: dict[str, dict]          # name -> Serve's DeploymentDetails (dict)
    targets: list[str]                    # deployments taking model_uri in user_config

    def user_config(self, deployment: str) -> dict:
        return dict(self.deployments[deployment].get("deployment_config", {}).get("user_config") or {})

    def target_replicas(self, deployment: str) -> int:
        return int(self.deployments[deployment].get("target_num_replicas") or 0)

    def runtime_env(self, deployment: str) -> dict:
        opts = self.deployments[deployment].get("deployment_config", {}).get("ray_actor_options") or {}
        return dict(opts.get("runtime_env") or {})


def inspect_app(app: str, deployment: str | None = None, details: dict | None = None) -> AppView:
    """The app and its model deployments, or a clear error (the app is missing; nothing takes a model_uri)."""
    details = details if details is not None else serve_details()
    apps = details.get("applications") or {}
    if app not in apps:
        known = ", ".join(sorted(apps)) or "none"
        raise NotFound(f"no Serve application named '{app}' (running: {known})")
    doc = apps[app]
    deployments = dict(doc.get("deployments") or {})
    with_uri = [d for d, dd in deployments.items()
                if isinstance((dd.get("deployment_config") or {}).get("user_config"), dict)
                and "model_uri" in dd["deployment_config"]["user_config"]]
    if deployment is not None:
        if deployment not in deployments:
            raise NotFound(f"application '{app}' has no deployment '{deployment}' "
                           f"(it has: {', '.join(sorted(deployments)) or 'none'})")
        targets = [deployment]
    else:
        targets = with_uri
    if not targets:
        raise BadURI(f"application '{app}' has no deployment with a 'model_uri' in its user_config "
                     "(serving.RegistryModel keeps the model URI there)")
    return AppView(app, enum_value(doc.get("status")), enum_value(doc.get("source")),
                   doc.get("deployed_app_config"), deployments, targets)


def replica_rows(app: str, deployments: Iterable[str] | None = None) -> list[dict]:
    """What each live RegistryModel replica of the app serves (published by the replicas themselves)."""
    from .replicas import replica_status

    rows = replica_status(app)
    if deployments is not None:
        wanted = set(deployments)
        rows = [r for r in rows if r.get("deployment") in wanted]
    return rows


_ROW_FIELDS = ("deployment", "replica", "node_id", "name", "version", "format", "key", "uri", "from_cache",
               "warm_seconds", "load_seconds", "healthy", "error")


def replica_summary(row: dict) -> dict:
    """The fields of a replica status row a report keeps (its error reduced to uri, message, type, at)."""
    out = {k: row.get(k) for k in _ROW_FIELDS}
    if isinstance(out["error"], dict):
        out["error"] = {k: out["error"].get(k) for k in ("uri", "message", "type", "at")}
    return out


def apply_configs(configs: Iterable[dict], target_capacity: float | None) -> None:
    """Deploy this set of declarative app configs (Serve deletes declarative apps missing from it)."""
    compat.deploy_apps({"applications": list(configs), "target_capacity": target_capacity})


# -- `prefetch status --app` -------------------------------------------------------------------------------------
def app_status(app: str, address: str | None = None) -> dict:
    """The version each replica of a Serve app serves: {ok, app, status, deployments: {name: {user_config,
    target_replicas}}, replicas: [rows], versions: {"name vN": count}}. ok: every replica healthy, no swap error."""
    from prefetch.cluster.fanout import connect

    connect(address)
    details = serve_details()
    apps = details.get("applications") or {}
    if app not in apps:
        raise NotFound(f"no Serve application named '{app}' (running: {', '.join(sorted(apps)) or 'none'})")
    doc = apps[app]
    rows = [replica_summary(r) for r in replica_rows(app)]
    versions: dict[str, int] = {}
    for r in rows:
        label = f"{r['name']} v{r['version']}" if r.get("version") else (r.get("uri") or "?")
        versions[label] = versions.get(label, 0) + 1
    deployments = {name: {"status": enum_value(d.get("status")),
                          "user_config": (d.get("deployment_config") or {}).get("user_config"),
                          "target_replicas": d.get("target_num_replicas")}
                   for name, d in (doc.get("deployments") or {}).items()}
    return {"ok": all(r.get("healthy") and not r.get("error") for r in rows), "app": app,
            "status": enum_value(doc.get("status")), "source": enum_value(doc.get("source")),
            "deployments": deployments, "replicas": rows, "versions": versions}

