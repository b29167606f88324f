"""The registry calls a `models:/` URI needs, as MLflow's own REST requests over `requests`, for an http(s) tracking
server: `import mlflow` costs ~1.1 CPU-s per process, these few GETs a few milliseconds each.

Same routes, parameters and answers as MlflowClient's REST store (model-versions/get, registered-models/alias,
registered-models/get for the latest version of each stage, model-versions/get-download-uri), so the version
record, and so the cache key made from it, is the same whichever client asked. Credentials as MLflow takes them
(MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD, userinfo in the tracking URI), sent only to the
tracking server's own host; TLS as MLflow's settings say (MLFLOW_TRACKING_INSECURE_TLS,
MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_CLIENT_CERT_PATH); retries and timeouts from MLflow's
MLFLOW_HTTP_REQUEST_* variables. What needs MLflow's own machinery (a registry on another host, SigV4 or plugin
auth, Databricks, sqlite/file stores) goes through the mlflow client (registry.py).
"""
from __future__ import annotations

import os
import threading
from urllib.parse import urlsplit

from .errors import BadURI, NotFound, PrefetchError, Unreachable
from .redact import redact_uri, same_host, userinfo

API = "/api/2.0/mlflow"
PROMPT_TAG = "mlflow.prompt.is_prompt"   # MLflow answers "not found" for a prompt asked as a model; so do we
# Variables that hand auth to MLflow plugins (SigV4, a custom RequestAuthProvider): only mlflow can honour them.
_PLUGIN_AUTH = ("MLFLOW_TRACKING_AWS_SIGV4", "MLFLOW_TRACKING_AUTH")
_sessions: dict = {}
_sessions_lock = threading.Lock()


def applies(registry_uri: str, tracking_uri: str) -> bool:
    """Whether this module can answer for that registry: an http(s) MLflow server that is the tracking server
    itself (its credentials go nowhere else), with no plugin auth."""
    if urlsplit(registry_uri).scheme.lower() not in ("http", "https"):
        return False
    if any(os.environ.get(v, "").strip().lower() not in ("", "false", "0") for v in _PLUGIN_AUTH):
        return False
    return registry_uri == tracking_uri or same_host(registry_uri, tracking_uri)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _session(base: str, tracking_uri: str):
    """One requests session per server and settings, with MLflow's retry policy and the tracking credentials."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7"))
    backoff = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2"))
    token, user = os.environ.get("MLFLOW_TRACKING_TOKEN"), os.environ.get("MLFLOW_TRACKING_USERNAME")
    verify: bool | str = not _truthy("MLFLOW_TRACKING_INSECURE_TLS")
    if verify and os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        verify = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    cert = os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None
    key = (base, tracking_uri, retries, backoff, token, user, os.environ.get("MLFLOW_TRACKING_PASSWORD"), verify, cert)
    with _sessions_lock:
        if key in _sessions:
            return _sessions[key]
        session = requests.Session()
        # MLflow's own policy (mlflow.utils.request_utils): these statuses and refused connections are retried.
        retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=backoff,
                      status_forcelist=(429, 500, 502, 503, 504), allowed_methods=frozenset({"GET"}),
                      raise_on_status=False, respect_retry_after_header=True)
        adapter = HTTPAdapter(max_retries=retry)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.verify = verify
        session.cert = cert
        if same_host(base, tracking_uri):
            if token:
                session.headers["Authorization"] = f"Bearer {token}"
            elif user:
                session.auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
            elif userinfo(tracking_uri):
                session.auth = userinfo(tracking_uri)
        _sessions[key] = session
        return session


def _get(registry_uri: str, tracking_uri: str, route: str, params: dict, uri: str) -> dict:
    """GET one REST route; MLflow's error answers become ours (the kinds and exit codes of registry.translate)."""
    import requests

    base = redact_uri(registry_uri).rstrip("/")   # URLs we build never carry userinfo (it is session auth)
    timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120"))
    try:
        resp = _session(base, tracking_uri).get(f"{base}{API}/{route}", params=params, timeout=timeout)
    except requests.exceptions.SSLError as e:
        raise Unreachable(f"TLS to the MLflow tracking server at {base} failed ({_reason(e)}); "
                          "MLFLOW_TRACKING_SERVER_CERT_PATH or MLFLOW_TRACKING_INSECURE_TLS=true", uri) from None
    except requests.RequestException as e:
        raise Unreachable(f"cannot reach the MLflow tracking server at {base} ({type(e).__name__})", uri) from None
    if resp.status_code == 200:
        try:
            return resp.json()
        except ValueError:
            raise Unreachable(f"the MLflow tracking server at {base} answered {route} with no JSON", uri) from None
    try:
        body = resp.json()
        code, message = body.get("error_code", ""), body.get("message", "")
    except (ValueError, AttributeError):
        code, message = "", resp.text.strip()[:200]
    message = message or f"HTTP {resp.status_code}"
    lowered = message.lower()
    # (MLflow answers a missing alias with INVALID_PARAMETER_VALUE "... not found": registry.translate's rule)
    if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in lowered or "does not exist" in lowered:
        raise NotFound(_short(message), uri)
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or resp.status_code in (401, 403):
        raise Unreachable(f"the tracking server refused us: {_short(message)}", uri)
    if code == "INVALID_PARAMETER_VALUE":
        raise BadURI(_short(message), uri)
    raise Unreachable(f"MLflow error: {_short(message)}", uri)


def _reason(e: Exception) -> str:
    text = str(e)
    return text if len(text) < 160 else text[:157] + "..."


def _short(text: str) -> str:
    return text if len(text) < 300 else text[:297] + "..."


def _not_a_prompt(tags: list | None, name: str, uri: str) -> None:
    if any(t.get("key") == PROMPT_TAG for t in tags or []):
        raise NotFound(f"Registered Model with name={name!r} not found.", uri)


def _record(mv: dict) -> dict:
    """A REST model version as registry.model_version() returns it (MLflow leaves empty fields out of JSON)."""
    return {"name": mv["name"], "version": str(mv["version"]), "run_id": mv.get("run_id") or None,
            "model_id": mv.get("model_id") or None, "source": mv.get("source", ""),
            "stage": mv.get("current_stage", ""), "aliases": list(mv.get("aliases") or [])}


def model_version(registry_uri: str, tracking_uri: str, uri: str, name: str, *, version: str | None = None,
                  stage: str | None = None, alias: str | None = None) -> dict:
    """One GET: the immutable version a `models:/` form points at now (see registry.model_version)."""
    if version is not None:
        mv = _get(registry_uri, tracking_uri, "model-versions/get", {"name": name, "version": version},
                  uri)["model_version"]
    elif alias is not None:
        mv = _get(registry_uri, tracking_uri, "registered-models/alias", {"name": name, "alias": alias},
                  uri)["model_version"]
    else:
        rm = _get(registry_uri, tracking_uri, "registered-models/get", {"name": name}, uri)["registered_model"]
        _not_a_prompt(rm.get("tags"), name, uri)
        candidates = rm.get("latest_versions") or []
        if stage is not None:
            candidates = [m for m in candidates if (m.get("current_stage") or "").lower() == stage.lower()]
        if not candidates:
            where = f"in stage '{stage}'" if stage else "at all"
            raise NotFound(f"registered model '{name}' has no version {where}", uri)
        mv = max(candidates, key=lambda m: int(m["version"]))
    _not_a_prompt(mv.get("tags"), name, uri)
    return _record(mv)


def version_storage(registry_uri: str, tracking_uri: str, uri: str, name: str, version: str) -> str:
    """Where a model version's files are: the server's get-download-uri answer."""
    answer = _get(registry_uri, tracking_uri, "model-versions/get-download-uri", {"name": name, "version": version},
                  uri)
    if not answer.get("artifact_uri"):
        raise PrefetchError(f"MLflow error: no download URI for {name} version {version}", uri)
    return answer["artifact_uri"]
