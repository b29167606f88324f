"""What a Ray Serve deployment imports to serve registry models from the node-local cache.

    from serving import RegistryModel, load_model, memory_for, actor_options

- load_model(uri, format="native") -> LoadedModel: warm once per node, load from the local path.
- RegistryModel: base class for @serve.deployment classes; model URI in user_config, hot swap on reconfigure.
- MultiplexedModel: many models per deployment (Serve's multiplexing), ids -> URIs by a template in user_config.
- load_model(..., share_weights=True): weights mapped from the cache where the format allows (serving.mapping),
  so K replicas on a node share one copy; each load's private/shared cost is recorded (serving.memory_profile).
- memory_for(uri, factor=2.0, replicas=K, format=...) -> bytes per replica (measured private part once a load
  was profiled, else factor x size), with .shared_bytes / .total_bytes; actor_options(uri, ...) -> ray_actor_options.
- replica_status(app) -> what every live replica of a Serve app serves (from a connected Ray driver;
  serving.control holds the rollout, the watch and the rest of Serve control).
"""
from __future__ import annotations

from .control.replicas import replica_status
from .deployment import RegistryModel, parse_config
from .loader import LoadedModel, ModelLoadError, load_model, prepare_runtime, warm_local
from .memory import actor_options, memory_for, model_size, plan
from .multiplex import MultiplexedModel

__all__ = ["LoadedModel", "ModelLoadError", "MultiplexedModel", "RegistryModel", "actor_options", "load_model",
           "memory_for", "model_size", "parse_config", "plan", "prepare_runtime", "replica_status", "warm_local"]
