"""MultiplexedModel: many registry models behind one Serve deployment, each replica holding a few of them.

    @serve.deployment(num_replicas=2, user_config={"model_uri_template": "models:/{model_id}@champion",
                                                   "max_models_per_replica": 2})
    class Models(MultiplexedModel):
        pass

A request names its model with Serve's `serve_multiplexed_model_id` header; Serve routes it to a replica that
holds that model when one does. user_config: `model_uri_template` (a URI with `{model_id}`, or a mapping of
ids to URIs), `max_models_per_replica` (Serve's LRU size; -1 = no limit), and RegistryModel's `format`,
`session_options`, `convert_options`. Answers are RegistryModel's (`{"predictions", "model", "version"}`, plus
`model_id`); an unknown id is a 404, a bad payload a 400.

How it uses Serve's `@serve.multiplexed`:
- The per-replica maximum is a decorator argument, but here it comes from user_config: so the loader is
  decorated at reconfigure time, on a closure (Serve keeps its LRU on the decorated function object). A
  changed maximum, template or format starts a new closure (a fresh LRU) and releases the old one's models.
- Serve holds one lock per replica for the whole of a load, so a slow loader would serialize every cold
  model of the replica. The decorated loader therefore does only the quick part (id -> URI -> registry
  check, so an unknown id never takes a place in the LRU) and returns a `_Slot` whose warm + load runs in
  this replica's thread pool: loads of different ids overlap, and requests for one id share one slot.
- Warm + load go through the node cache (`serving.load_model`): one origin download per model per node,
  whatever the number of replicas; a model evicted from RAM (Serve calls the slot's `__del__`, which gives
  back its cache lease) and asked for again is read from local disk.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable

from prefetch.errors import BadURI, NotFound

from .deployment import RegistryModel, _first_line, _json, parse_config
from .loader import LoadedModel
from .scoring import BadRequest, is_client_error

logger = logging.getLogger("ray.serve")

HEADER = "serve_multiplexed_model_id"
DEFAULT_MAX_MODELS = 3   # Serve's own default for max_num_models_per_replica


class UnknownModel(NotFound):
    """The request's model id maps to no model (not in the mapping, or the registry has no such model)."""


def parse_multiplex_config(config: Any, default_format: str = "native") -> dict:
    """Validate a MultiplexedModel user_config; raises BadURI naming what is wrong."""
    from prefetch.templates import check_mapping, check_template

    if not isinstance(config, dict):
        raise BadURI(f"user_config must be a mapping with 'model_uri_template' (got {type(config).__name__})")
    template = config.get("model_uri_template")
    if isinstance(template, dict):
        template = check_mapping(template)
    elif isinstance(template, str):
        template = check_template(template)
    else:
        raise BadURI("user_config needs 'model_uri_template' (e.g. models:/{model_id}@champion, or a mapping "
                     "of model ids to URIs)")
    most = config.get("max_models_per_replica", DEFAULT_MAX_MODELS)
    if isinstance(most, bool) or not isinstance(most, int) or (most <= 0 and most != -1):
        raise BadURI(f"user_config 'max_models_per_replica' must be a positive integer or -1 (got {most!r})")
    # The per-model options are RegistryModel's: validate them with its parser, on a stand-in URI.
    options = {k: config[k] for k in ("format", "session_options", "convert_options") if k in config}
    checked = parse_config({**options, "model_uri": "models:/any/1"}, default_format)
    return {"model_uri_template": template, "max_models_per_replica": most, "format": checked["format"],
            "session_options": checked["session_options"], "convert_options": checked["convert_options"]}


def uri_for(template: str | dict, model_id: str) -> str:
    """The URI a model id names under a template or a mapping; UnknownModel if it names none."""
    from prefetch.templates import uri_for as from_template

    if isinstance(template, dict):
        if model_id not in template:
            raise UnknownModel(f"no model '{model_id}' (the deployment serves: {', '.join(sorted(template))})")
        return template[model_id]
    try:
        return from_template(template, model_id)
    except BadURI as e:
        raise UnknownModel(f"no model '{model_id}': {e.message}") from None


class _Slot:
    """One model id's place in Serve's LRU: its warm + load runs in a worker thread, started at once, so that
    the loader Serve serializes returns immediately. Requests for the id await the same load; a failed load
    is retried by the next request for the id (a transient failure must not stick in the LRU)."""

    def __init__(self, model_id: str, uri: str, start: Callable[[], concurrent.futures.Future]):
        self.model_id, self.uri = model_id, uri
        self._start = start
        self._future: concurrent.futures.Future | None = start()
        self._released = False
        self.loaded_at: float | None = None

    async def model(self) -> LoadedModel:
        future = self._future
        if future is None:
            future = self._future = self._start()
            if self._released:   # evicted while this request waited: serve it, then give the lease back
                future.add_done_callback(_release_result)
        try:
            # shield: a client that goes away must not cancel a load other requests share.
            loaded = await asyncio.shield(asyncio.wrap_future(future))
        except Exception:
            if self._future is future:
                self._future = None
            raise
        if self.loaded_at is None:
            self.loaded_at = time.time()
        return loaded

    def loaded(self) -> LoadedModel | None:
        f = self._future
        return f.result() if f is not None and f.done() and not f.cancelled() and f.exception() is None else None

    def __del__(self) -> None:
        """Serve calls this when it evicts the id (and then replaces it on the instance: call release())."""
        self.release()

    def release(self) -> None:
        """Give back the cache lease (the files stay on disk for the next load). Idempotent."""
        if getattr(self, "_released", True):
            return
        self._released = True
        future = getattr(self, "_future", None)
        if future is not None:
            future.add_done_callback(_release_result)


def _release_result(future: concurrent.futures.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()


class MultiplexedModel(RegistryModel):
    """Base class for Serve deployments serving many registry models, a few per replica (module docstring)."""

    def __init__(self, **config):
        super().__init__()
        self._mux: dict | None = None
        self._get: Callable | None = None          # this generation's @serve.multiplexed loader
        self._slots: dict[str, _Slot] = {}          # this generation's ids, for status()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._gen_lock = threading.Lock()
        if config:
            self._configure(config)

    # -- configuration ------------------------------------------------------------------------------------
    async def reconfigure(self, config: dict) -> None:
        try:
            self._configure(config)
        except BadURI as e:
            if self._mux is None:
                raise            # a first deploy with a bad config should fail, as RegistryModel's does
            # A bad change keeps the current models serving (DESIGN.md "Traps": never fail a reconfigure).
            logger.error("user_config rejected, keeping the previous one: %s", e)
            self._error = {"uri": None, "message": str(e), "type": type(e).__name__, "at": time.time()}
            self._publish()

    def _configure(self, raw: Any) -> None:
        config = parse_multiplex_config(raw, self.default_format)
        with self._gen_lock:
            if config == self._mux:
                return
            old_slots, old_pool = self._slots, self._pool
            self._mux, self._error = config, None
            self._slots = {}
            most = config["max_models_per_replica"]
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(2, most if most > 0 else 8), thread_name_prefix="multiplex-load")
            self._get = self._new_loader(config, self._slots, self._pool)
        for slot in old_slots.values():   # the old LRU's models: leases back
            slot.release()
        if old_pool is not None:
            old_pool.shutdown(wait=False)
        logger.info("multiplexing %s, at most %s models per replica",
                    "a mapping of %d ids" % len(config["model_uri_template"])
                    if isinstance(config["model_uri_template"], dict) else config["model_uri_template"], most)
        self._publish()

    def _new_loader(self, config: dict, slots: dict, pool) -> Callable:
        from ray import serve

        async def load_model_slot(model_id: str) -> _Slot:
            # Runs under Serve's per-replica lock: keep it short. The registry check is here so that an
            # unknown id raises (Serve then caches nothing) instead of taking a place in the LRU.
            uri = uri_for(config["model_uri_template"], model_id)
            await asyncio.to_thread(_check_exists, uri, model_id)
            slot = _Slot(model_id, uri, lambda: pool.submit(self.load, {**config, "model_uri": uri}))
            slots[model_id] = slot
            return slot

        return serve.multiplexed(max_num_models_per_replica=config["max_models_per_replica"])(load_model_slot)

    # -- requests ------------------------------------------------------------------------------------------
    async def model_for(self, model_id: str) -> LoadedModel:
        """The loaded model of `model_id` (loading it if needed), for DeploymentHandle callers too."""
        if self._get is None:
            raise BadURI("no model_uri_template configured (set user_config: {model_uri_template: ...})")
        slot = await self._get(model_id)
        fresh = slot.loaded_at is None
        model = await slot.model()
        if fresh:
            self._publish()   # what this replica holds changed (a load, and maybe Serve's eviction before it)
        return model

    async def __call__(self, request):
        from ray import serve
        from starlette.responses import Response

        if request.method == "GET":
            return _json(self.status())
        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            return _json({"error": f"name the model with the '{HEADER}' header"}, 400)
        if self._get is None:
            return _json({"error": "no model_uri_template configured"}, 503)
        try:
            body = await request.json()
        except ValueError:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return _json({"error": "the request body is not valid JSON"}, 400)
        try:
            model = await self.model_for(model_id)
        except NotFound as e:    # UnknownModel, or a pinned version the registry does not have
            return _json({"error": e.message, "model_id": model_id}, 404)
        except Exception as e:
            logger.error("loading model %r failed: %s", model_id, _first_line(e))
            return _json({"error": f"model '{model_id}' failed to load: {_first_line(e)}", "model_id": model_id},
                         503)
        try:
            answer = await self._call_handle(body, model)
        except Exception as e:
            if isinstance(e, (BadRequest, KeyError, TypeError, ValueError)) or is_client_error(e):
                return _json({"error": _first_line(e), "model_id": model_id, "model": model.name,
                              "version": model.version}, 400)
            logger.exception("prediction failed on %s v%s", model.name, model.version)
            return _json({"error": f"{type(e).__name__}: {_first_line(e)}", "model_id": model_id}, 500)
        if isinstance(answer, dict):
            answer.setdefault("model_id", model_id)
        return answer if isinstance(answer, Response) else _json(answer)

    async def predict(self, data: Any, params: dict | None = None, model_id: str | None = None) -> Any:
        """Predictions for DeploymentHandle callers: `handle.options(multiplexed_model_id=id).predict.remote(x)`."""
        from ray import serve

        model = await self.model_for(model_id or serve.get_multiplexed_model_id())
        return model.predict(data, params)

    # -- status --------------------------------------------------------------------------------------------
    def status(self) -> dict:
        """Which ids this replica holds now (Serve's LRU decides), with where each came from. Never raises."""
        models = {}
        for model_id, slot in list(self._slots.items()):
            if slot._released:
                continue
            loaded = slot.loaded()
            models[model_id] = {"uri": slot.uri, "state": "loaded" if loaded else "loading",
                                **(loaded.info() if loaded else {})}
        return {**self._identity, "healthy": self._mux is not None, "config": self._mux, "models": models,
                "error": self._error}

    def __del__(self):
        for slot in list(getattr(self, "_slots", {}).values()):
            slot.release()
        super().__del__()


def _check_exists(uri: str, model_id: str) -> None:
    """Identify `uri` (for an alias or `latest`, one registry call, or none while the node's ref of it is
    fresh; never a storage listing): a model the registry does not have is UnknownModel."""
    from prefetch.config import Settings
    from prefetch.store import Store
    from prefetch.uri import identify

    settings = Settings.load()
    try:
        identify(uri, settings, Store(settings.cache_dir))
    except NotFound as e:
        raise UnknownModel(f"no model '{model_id}': {e.message}", uri) from None
