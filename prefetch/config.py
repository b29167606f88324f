"""Settings: one dataclass, read once from env (and optionally a TOML file), overridable per call.

Env wins over the TOML file; explicit keyword overrides win over both. `PREFETCH_CONFIG` names the TOML file
(default `~/.config/prefetch/config.toml` if present) with the same keys as the dataclass fields.
Inside a Ray worker, the node label `prefetch-cache-dir` (prefetch/cluster/node.py) wins over both for cache_dir.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

_ENV = {
    "cache_dir": "PREFETCH_CACHE_DIR",
    "max_bytes": "PREFETCH_MAX_BYTES",
    "ref_ttl": "PREFETCH_REF_TTL",
    "max_concurrency": "PREFETCH_MAX_CONCURRENCY",
    "chunk_bytes": "PREFETCH_CHUNK_BYTES",
    "multipart_threshold": "PREFETCH_MULTIPART_THRESHOLD",
    "max_attempts": "PREFETCH_MAX_ATTEMPTS",
    "connect_timeout": "PREFETCH_CONNECT_TIMEOUT",
    "read_timeout": "PREFETCH_READ_TIMEOUT",
    "high_watermark": "PREFETCH_HIGH_WATERMARK",
    "low_watermark": "PREFETCH_LOW_WATERMARK",
    "transport": "PREFETCH_TRANSPORT",
}
TRANSPORTS = ("native", "boto3")


def default_transport() -> str:
    """S3 bytes through obstore (Rust, outside the interpreter) when it is installed, else through boto3.
    find_spec looks without importing: reading settings stays cheap."""
    import importlib.util

    return "native" if importlib.util.find_spec("obstore") is not None else "boto3"


def parse_bytes(text: str) -> int:
    """'512MiB', '2G', '1000' -> bytes. Binary units for both spellings: caches are sized in GiB."""
    t = text.strip().upper().replace("IB", "").replace("B", "")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(float(t))


def human_bytes(n: float | None) -> str:
    """bytes -> '1.5 GiB' (what every table and message prints)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclasses.dataclass(frozen=True)
class Settings:
    cache_dir: Path = Path("~/.cache/prefetch").expanduser()
    max_bytes: int | None = None          # cache size cap; None = no cap (free-space guard still applies)
    high_watermark: float = 1.0           # evict when a commit would pass max_bytes * high
    low_watermark: float = 0.8            # ... down to max_bytes * low
    ref_ttl: float = 30.0                 # seconds a resolved mutable URI (latest, stage, alias) is trusted
    max_concurrency: int = 16             # parallel GETs per warm (across files and ranges)
    chunk_bytes: int = 8 << 20            # range size for large files
    multipart_threshold: int = 16 << 20   # files at least this big are fetched in ranges
    max_attempts: int = 5                 # per request, with exponential backoff
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    transport: str = dataclasses.field(default_factory=default_transport)   # S3 client: "native" | "boto3"

    @classmethod
    def load(cls, **overrides) -> "Settings":
        values: dict = {}
        toml_path = Path(os.environ.get("PREFETCH_CONFIG", "~/.config/prefetch/config.toml")).expanduser()
        if toml_path.is_file():
            import tomllib

            values.update(tomllib.loads(toml_path.read_text()))
        for field, env in _ENV.items():
            if os.environ.get(env):
                values[field] = os.environ[env]
        if "ray" in sys.modules:   # never import ray here: a CLI hit must stay fast
            from .cluster.node import in_ray_worker, node_cache_dir

            # Inside a Ray worker (the node agent, a replica) the node's label names the node's cache dir,
            # so every process on the node finds the same directory the same way (prefetch/cluster/node.py).
            label_dir = node_cache_dir() if in_ray_worker() else None
            if label_dir is not None:
                values["cache_dir"] = label_dir
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**{f.name: _coerce(f, values[f.name]) for f in dataclasses.fields(cls) if f.name in values})


def _coerce(field: dataclasses.Field, value):
    if field.name == "cache_dir":
        return Path(value).expanduser().resolve()
    if field.name in ("max_bytes", "chunk_bytes", "multipart_threshold"):
        return None if value in (None, "", "0", 0) and field.name == "max_bytes" else parse_bytes(str(value))
    if field.name == "transport":
        if str(value).strip().lower() not in TRANSPORTS:
            from .errors import BadURI

            raise BadURI(f"PREFETCH_TRANSPORT must be one of {', '.join(TRANSPORTS)}, not {value!r}")
        return str(value).strip().lower()
    if field.name in ("max_concurrency", "max_attempts"):
        return int(value)
    return float(value)
