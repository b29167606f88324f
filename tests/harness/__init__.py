"""Real-component test harness: SeaweedFS S3, MLflow servers, a link-emulating proxy, models.

Everything runs on free 127.0.0.1 ports and is stopped on stop()/exit (process groups, atexit).
"""
from .mlflow_server import EmbeddedRegistry, MlflowServer, RegistryServer, start_all, stop_all_servers
from .models import (
    SEED_MODEL_NAME,
    SKOPS_TRUSTED_TYPES,
    apply_env,
    mlflow_env,
    register_large_model,
    register_seed_versions,
    reset_mlflow_uris,
    restore_env,
    train_seed_model,
    write_random_file,
)
from .ports import free_port, free_ports
from .procs import ManagedProcess, stop_all
from .proxy import LinkProxy
from .seaweed import SeaweedS3, find_weed
from .serve import LINKS, start_serve, stop_bench
from .fronts import ForwardProxy, TlsFront, make_private_ca

__all__ = [
    "EmbeddedRegistry",
    "ForwardProxy",
    "LINKS",
    "LinkProxy",
    "ManagedProcess",
    "MlflowServer",
    "RegistryServer",
    "SEED_MODEL_NAME",
    "SKOPS_TRUSTED_TYPES",
    "SeaweedS3",
    "TlsFront",
    "apply_env",
    "find_weed",
    "free_port",
    "free_ports",
    "make_private_ca",
    "mlflow_env",
    "register_large_model",
    "register_seed_versions",
    "reset_mlflow_uris",
    "restore_env",
    "start_all",
    "start_serve",
    "stop_all_servers",
    "stop_all",
    "stop_bench",
    "train_seed_model",
    "write_random_file",
]
