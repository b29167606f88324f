"""Ready-made Serve deployments, importable by `serve run` / `serve deploy` (an installed module, not a file).

- `SeedModel`: the Ray guide's example on RegistryModel. It keeps the guide's request format
  (`{"features": [[...]]}` -> `{"prediction": [...]}`) by overriding one method; the model URI is in
  user_config, so `serve deploy` with a new `model_uri` hot-swaps it without restarting replicas.
  `app` binds it; scripts/serve_config.yaml deploys it.
- `Model`: a plain RegistryModel deployment answering MLflow's scoring JSON (`model_app(args)` builds it from
  config `args`).
- `Models` / `multiplexed_app(args)`: a plain MultiplexedModel deployment (many models, ids -> URIs by the
  `model_uri_template` in user_config); `SeedMultiplexed` / `seed_multiplexed_app`: Serve's multiplexing as its
  docs write it, loading with MLflow (for comparison in tests and scripts/bench_multiplex.py).
- `MLflowModelDeployment`: the guide's deployment as the guide writes it (every replica downloads the model
  from the registry in `__init__`), kept for comparison in tests and scripts/bench_coldstart.py. The guide
  loads with `mlflow.sklearn.load_model`; this uses `mlflow.pyfunc.load_model` (the guide's hot-swap snippet)
  so that any flavor works: both download through the same MLflow artifact code.
"""
from __future__ import annotations

import time

from ray import serve

from .deployment import RegistryModel
from .loader import LoadedModel
from .multiplex import MultiplexedModel

SEED_MODEL_URI = "models:/sk-learn-random-forest-reg-model@champion"


@serve.deployment(user_config={"model_uri": SEED_MODEL_URI}, ray_actor_options={"num_cpus": 0.5})
class SeedModel(RegistryModel):
    """The guide's MLflowModelDeployment, on RegistryModel."""

    def handle(self, body: dict, model: LoadedModel) -> dict:
        import numpy as np

        return {"prediction": np.asarray(model.predict(np.asarray(body["features"], dtype=float))).tolist()}


app = SeedModel.bind()

Model = serve.deployment(RegistryModel, name="Model")


def model_app(args: dict):
    """Application builder: `import_path: serving.examples:model_app`, `args: {model_uri: ..., format: ...}`.

    Note: args are part of Serve's code version, so a new model_uri here is a rolling redeploy; put it under
    the deployment's `user_config` instead for a hot swap.
    """
    config = {k: v for k, v in (args or {}).items() if k in ("model_uri", "format", "session_options",
                                                               "convert_options", "share_weights")}
    return Model.options(user_config=config).bind() if config else Model.bind()


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class MLflowModelDeployment:
    """The Ray guide's deployment (for comparison only: it downloads the model in every replica)."""

    def __init__(self, model_uri: str):
        import mlflow.pyfunc

        from .loader import prepare_runtime

        # Not in the guide: the process-level costs (imports, MLflow's package map) are paid before the timer,
        # as RegistryModel does, so that load_seconds is the model part only (download + load). The replica's
        # total start time is the same either way.
        prepare_runtime("native")
        started = time.monotonic()
        self.model = mlflow.pyfunc.load_model(model_uri)
        self.load_seconds = time.monotonic() - started

    async def __call__(self, request):
        import numpy as np

        data = await request.json()
        prediction = self.model.predict(np.asarray(data["features"], dtype=float))
        return {"prediction": np.asarray(prediction).tolist()}

    def model_info(self) -> dict:
        import os

        return {"load_seconds": self.load_seconds, "pid": os.getpid()}


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class SeedMultiplexed:
    """Serve's multiplexing as its docs write it, loading with MLflow (for comparison only: every load of an
    id, including one evicted earlier, downloads the model again, and Serve serializes the loads)."""

    def __init__(self, model_uri_template: str = "models:/{model_id}@champion", max_models_per_replica: int = 3):
        import mlflow.pyfunc

        async def load_model(model_id: str):
            return mlflow.pyfunc.load_model(model_uri_template.format(model_id=model_id))

        # The docs decorate a method with a constant; a closure decorated here lets tests pick the maximum.
        self.get_model = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(load_model)

    async def __call__(self, request):
        import numpy as np

        model = await self.get_model(serve.get_multiplexed_model_id())
        data = await request.json()
        return {"predictions": np.asarray(model.predict(np.asarray(data["inputs"], dtype=float))).tolist()}


Models = serve.deployment(MultiplexedModel, name="Models")


def multiplexed_app(args: dict):
    """Application builder: `import_path: serving.examples:multiplexed_app`; put `model_uri_template` and
    `max_models_per_replica` under the deployment's `user_config` (a change is then a reconfigure)."""
    return Models.options(user_config=dict(args)).bind() if args else Models.bind()


def seed_multiplexed_app(args: dict):
    """Application builder for the comparison deployment: args {model_uri_template, max_models_per_replica}."""
    return SeedMultiplexed.bind(**(args or {}))
