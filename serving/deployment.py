"""RegistryModel: a base class for `@serve.deployment` classes that serve one registry model, hot-swappable.

    @serve.deployment(user_config={"model_uri": "models:/fraud@champion"})
    class Fraud(RegistryModel):
        pass

The model URI lives in `user_config` ({"model_uri": ..., "format": "native"|"onnx"|"torchscript",
"session_options": {...}, "convert_options": {...}, "share_weights": true}). On `reconfigure()` the replica warms
the new version through the node-local cache and loads it in a worker thread, off the request path; only then does
it swap one reference. A request reads that reference once, so requests in flight finish on the model they started
with. Loads map the cached weights (shared by every replica on the node) unless share_weights is false; a swap maps
the new version first, and the old one's mapping goes when its last request is done.

A swap that fails (the version is missing, the download or the load fails) keeps the old model serving:
the failure is logged, shown by `status()` (also GET <route>/-/model and the published replica status), and
named in every answer (`swap_error`). `reconfigure` does not raise then, because Serve would treat the replica
as broken and replace it with one that starts from the same broken `user_config` (DESIGN.md "Traps").
A replica that *starts* with a broken `user_config` falls back to the deployment's last good model, if a
replica of the same deployment served one; otherwise it fails to start, as a first deploy of a bad URI should.

Request handling: `handle(body, model)` is the one method to override for a custom request format; the
default speaks MLflow's scoring JSON and answers {"predictions": [...], "model": name, "version": v}.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
import time
from typing import Any

from prefetch.errors import BadURI

from .control import replicas
from .loader import FORMATS, LoadedModel, load_model, prepare_runtime, warm_local
from .scoring import BadRequest, is_client_error, jsonable, parse_request

logger = logging.getLogger("ray.serve")

STATUS_ROUTE = "/-/model"
_HISTORY = 10


def parse_config(config: Any, default_format: str = "native") -> dict:
    """Validate a RegistryModel user_config; raises BadURI naming what is wrong."""
    if not isinstance(config, dict):
        raise BadURI(f"user_config must be a mapping with 'model_uri' (got {type(config).__name__})")
    uri = config.get("model_uri")
    if not isinstance(uri, str) or not uri.strip():
        raise BadURI("user_config needs 'model_uri' (e.g. models:/<name>@champion)")
    from prefetch.uri import parse

    parse(uri)   # syntax only: a malformed URI fails here, before any network
    fmt = config.get("format") or default_format
    if fmt not in FORMATS:
        raise BadURI(f"user_config 'format' must be one of {', '.join(FORMATS)} (got {fmt!r})", uri)
    for opt in ("session_options", "convert_options"):
        if config.get(opt) is not None and not isinstance(config[opt], dict):
            raise BadURI(f"user_config '{opt}' must be a mapping", uri)
    share = config.get("share_weights", True)
    if not isinstance(share, bool):
        raise BadURI(f"user_config 'share_weights' must be true or false (got {share!r})", uri)
    return {**config, "model_uri": uri.strip(), "format": fmt, "share_weights": share,
            "session_options": dict(config.get("session_options") or {}),
            "convert_options": dict(config.get("convert_options") or {})}


class RegistryModel:
    """Base class for Serve deployments serving a registry model from the node-local cache.

    A subclass with its own __init__ must call super().__init__() (with model_uri=... if it takes the URI
    as an argument instead of from user_config)."""

    default_format = "native"

    def __init__(self, model_uri: str | None = None, **config):
        self._model: LoadedModel | None = None
        self._config: dict | None = None
        self._error: dict | None = None
        self._history: list[dict] = []
        self._swap_lock = threading.Lock()
        self._identity = replicas.replica_identity()
        self._started_at = time.time()
        _preload()
        if model_uri is not None:   # bind(model_uri=...) works too; user_config then overrides it
            self._apply({"model_uri": model_uri, **config})

    # -- the model ---------------------------------------------------------------------------------------------
    @property
    def model(self) -> LoadedModel | None:
        """The model serving right now (read it once per request)."""
        return self._model

    @property
    def config(self) -> dict | None:
        return self._config

    def load(self, config: dict) -> LoadedModel:
        """How a config becomes a loaded model. Override to add warm-up work (it runs before the swap)."""
        who = self._identity
        holder = f"serve replica {who['app']}#{who['deployment']}#{who['replica']}" if who else None
        return load_model(config["model_uri"], config["format"], session_options=config["session_options"],
                          convert_options=config["convert_options"], holder=holder,
                          share_weights=config.get("share_weights", True))

    async def reconfigure(self, config: dict) -> None:
        """Serve calls this with the user_config (at start and on every change)."""
        # A worker thread: the replica's event loop keeps answering with the current model meanwhile.
        await asyncio.to_thread(self._apply, config)

    def _apply(self, raw_config: Any) -> None:
        with self._swap_lock:
            started = time.monotonic()
            current = self._model
            try:
                config = parse_config(raw_config, self.default_format)
                if current is not None and self._same_model(current, config):
                    self._config = config
                    self._error = None
                    self._record("unchanged", config, current, current, time.monotonic() - started)
                    return
                new = self.load(config)
            except Exception as e:
                self._failed(raw_config, e, time.monotonic() - started)
                return
            self._model = new          # the swap: one reference, fully loaded before it is visible
            self._config = config
            self._error = None
            self._record("swapped" if current else "loaded", config, current, new, time.monotonic() - started)
            replicas.remember_last_good(self._identity, {**config, "model_uri": _pinned_uri(new)})
            logger.info("serving %s v%s (%s) from %s", new.name, new.version, new.key, new.path)
            if current is not None:
                current.release()

    def _same_model(self, current: LoadedModel, config: dict) -> bool:
        """Same format and options, and the URI resolves to the object already loaded (cheap on a hit)."""
        previous = self._config or {}
        if current.format != config["format"] or previous.get("session_options") != config["session_options"] \
                or previous.get("convert_options") != config["convert_options"] \
                or previous.get("share_weights", True) != config["share_weights"]:
            return False
        from prefetch.uri import parse

        if config["model_uri"] == current.uri and not parse(current.uri).mutable:
            return True
        # An alias, `latest` or a stage may have moved since it was loaded: resolve it again.
        return warm_local(config["model_uri"], config["format"], config["convert_options"]).key == current.key

    def _failed(self, raw_config: Any, error: Exception, seconds: float) -> None:
        from prefetch.redact import redact_text, redact_uri

        uri = raw_config.get("model_uri") if isinstance(raw_config, dict) else None
        uri = redact_uri(uri) if isinstance(uri, str) else None   # shown in status, answers and logs
        self._error = {"uri": uri, "message": redact_text(str(error)), "type": type(error).__name__,
                       "at": time.time(), "seconds": round(seconds, 3)}
        serving = self._model
        if serving is not None:
            logger.error("model swap to %s failed; still serving %s v%s: %s", uri, serving.name, serving.version,
                         self._error["message"])
            self._history.append({"event": "failed", "uri": uri, "error": self._error["message"], "at": time.time()})
            del self._history[:-_HISTORY]
            self._publish()
            return
        # Nothing to keep serving: fall back to the deployment's last good model, or fail the replica's start.
        fallback = replicas.last_good(self._identity)
        if fallback and fallback.get("model_uri") != uri:
            logger.error("model %s failed to load (%s); falling back to the last good model %s",
                         uri, self._error["message"], redact_uri(fallback["model_uri"]))
            try:
                config = parse_config(fallback, self.default_format)
                self._model = self.load(config)
                self._config = config
                self._history.append({"event": "fallback", "uri": config["model_uri"], "at": time.time()})
                self._publish()
                return
            except Exception as e2:
                logger.error("the last good model %s failed too: %s", fallback.get("model_uri"), e2)
        self._publish()
        raise error

    def _record(self, event: str, config: dict, old: LoadedModel | None, new: LoadedModel, seconds: float) -> None:
        self._history.append({"event": event, "uri": config["model_uri"], "from": old and old.version,
                              "to": new.version, "key": new.key, "seconds": round(seconds, 4), "at": time.time()})
        del self._history[:-_HISTORY]
        self._publish()

    # -- status ------------------------------------------------------------------------------------------------
    def status(self) -> dict:
        """What this replica serves, and the last swap failure if any. Never raises."""
        model = self._model
        out: dict[str, Any] = {**self._identity, "healthy": model is not None, "model": None, "version": None}
        if model is not None:
            out.update(model.info())
            out["model"] = model.name
        # Nothing else from user_config (it may hold anything): the URI and format only, credentials stripped.
        config = self._config or {}
        out["config"] = {"model_uri": config.get("model_uri"), "format": config.get("format")} if config else None
        out["error"] = self._error
        out["history"] = list(self._history)
        from prefetch.redact import redact_obj

        return redact_obj(out)

    def model_info(self) -> dict:
        """status(), callable through a DeploymentHandle: `handle.model_info.remote()`."""
        return self.status()

    def _publish(self) -> None:
        replicas.publish(self._identity, self.status())

    # -- requests ----------------------------------------------------------------------------------------------
    async def __call__(self, request):
        from starlette.responses import Response

        if request.method == "GET":
            # GET <route>/-/model (any GET, in fact): which model and version this replica serves.
            return _json(self.status())
        model = self._model
        if model is None:
            reason = "no model loaded" if self._error else "no model configured (set user_config: {model_uri: ...})"
            return _json({"error": reason, "detail": self._error}, 503)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            return _json({"error": "the request body is not valid JSON"}, 400)
        try:
            answer = await self._call_handle(body, model)
        except Exception as e:
            if isinstance(e, (BadRequest, KeyError, TypeError, ValueError)) or is_client_error(e):
                return _json({"error": _first_line(e), "model": model.name, "version": model.version}, 400)
            logger.exception("prediction failed on %s v%s", model.name, model.version)
            return _json({"error": f"{type(e).__name__}: {_first_line(e)}", "model": model.name,
                          "version": model.version}, 500)
        return answer if isinstance(answer, Response) else _json(answer)

    async def _call_handle(self, body: Any, model: LoadedModel):
        if inspect.iscoroutinefunction(self.handle):
            return await self.handle(body, model)
        return await asyncio.to_thread(self.handle, body, model)

    def handle(self, body: Any, model: LoadedModel) -> Any:
        """One request: JSON body in, JSON-able answer out. Override for a custom format; `model` is the
        model this request uses (do not read self.model here: a swap may happen meanwhile)."""
        data, params = parse_request(body, model.input_schema)
        return self.answer(model.predict(data, params), model)

    def answer(self, predictions: Any, model: LoadedModel) -> dict:
        out = {"predictions": jsonable(predictions), "model": model.name, "version": model.version}
        if self._error is not None:
            out["swap_error"] = f"{self._error['uri']}: {self._error['message']}"
        return out

    def predict(self, data: Any, params: dict | None = None) -> Any:
        """Predictions from the current model, for DeploymentHandle callers: `handle.predict.remote(df)`."""
        model = self._model
        if model is None:
            raise RuntimeError(f"no model loaded: {self._error}")
        return model.predict(data, params)

    def __del__(self):
        model, self._model = getattr(self, "_model", None), None
        if model is not None:
            model.release()
        replicas.unpublish(getattr(self, "_identity", {}))


def _preload() -> None:
    """Import what every swap and request needs now, at replica start (a fixed cost, paid once), so that a
    model's load time (and the first request) is only the model's."""
    import mlflow.pyfunc.scoring_server  # noqa: F401

    import prefetch.api  # noqa: F401
    import prefetch.registry  # noqa: F401

    prepare_runtime("native")


def _pinned_uri(model: LoadedModel) -> str:
    """A registry version pinned by number, so a fallback is the same version even if an alias moved since."""
    if model.name and model.version and model.uri.startswith("models:/") and not model.uri.startswith("models:/m-"):
        return f"models:/{model.name}/{model.version}"
    return model.uri


def _json(doc: Any, status: int = 200):
    from starlette.responses import Response

    return Response(json.dumps(doc, default=str), status_code=status, media_type="application/json")


def _first_line(e: BaseException) -> str:
    if isinstance(e, KeyError):
        return f"the request has no {e} field"
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
