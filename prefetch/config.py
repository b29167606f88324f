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

from .errors import BadSetting

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
    "min_rate": "PREFETCH_MIN_RATE",
    "min_rate_window": "PREFETCH_MIN_RATE_WINDOW",
    "lock_timeout": "PREFETCH_LOCK_TIMEOUT",
    "transport": "PREFETCH_TRANSPORT",
    "peers": "PREFETCH_PEERS",
    "peer_timeout": "PREFETCH_PEER_TIMEOUT",
}
TRANSPORTS = ("native", "boto3")


def default_transport() -> str:
    """native (obstore: the bytes move outside the interpreter, with the same origin checks as boto3) when obstore
    is installed; boto3 otherwise, or when PREFETCH_TRANSPORT=boto3 asks for it."""
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
    read_timeout: float = 60.0            # no byte for this long: the connection is abandoned, the range retried
    min_rate: int = 64 << 10              # bytes/s a connection must average over min_rate_window, or be retried
    min_rate_window: float = 30.0
    lock_timeout: float = 3600.0          # a waiter for another process's download of the same key gives up (exit 4)
    transport: str = dataclasses.field(default_factory=default_transport)   # S3 client: "native" | "boto3"
    peers: bool = True                    # a node agent's miss takes chunks from other nodes (prefetch/cluster/peers)
    peer_timeout: float = 30.0            # a peer that does not deliver a chunk within this is routed around

    @classmethod
    def load(cls, **overrides) -> "Settings":
        """Settings from the TOML file, the environment and overrides, every knob validated: a bad value is
        one BadSetting naming where it came from (the variable, or the file and key), like s3transfer's
        TransferConfig refusing a bad knob up front instead of failing mid-transfer."""
        values: dict = {}
        origin: dict = {}     # field -> where its value came from (for the error line)
        toml_path = Path(os.environ.get("PREFETCH_CONFIG", "~/.config/prefetch/config.toml")).expanduser()
        if toml_path.is_file():
            values.update(_read_toml(toml_path, {f.name for f in dataclasses.fields(cls)}))
            origin.update({k: f"{toml_path}: {k}" for k in values})
        for field, env in _ENV.items():
            if os.environ.get(env):
                values[field] = os.environ[env]
                origin[field] = env
        if "ray" in sys.modules:   # never import ray here: a CLI hit must stay fast
            from .cluster.node import in_ray_worker, node_cache_dir

            # Inside a Ray worker (the node agent, a replica) the node's label names the node's cache dir,
            # so every process on the node finds the same directory the same way (prefetch/cluster/node.py).
            label_dir = node_cache_dir() if in_ray_worker() else None
            if label_dir is not None:
                values["cache_dir"] = label_dir
        values.update({k: v for k, v in overrides.items() if v is not None})
        origin.update({k: k for k, v in overrides.items() if v is not None})
        coerced = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                coerced[f.name] = _checked(f, values[f.name], origin.get(f.name, f.name))
        settings = cls(**coerced)
        lease_ttl()   # PREFETCH_LEASE_TTL is read where records are written; a bad value fails here, up front
        if settings.low_watermark > settings.high_watermark:
            raise BadSetting(f"low_watermark ({settings.low_watermark:g}) must not exceed high_watermark "
                             f"({settings.high_watermark:g}) (PREFETCH_LOW_WATERMARK / PREFETCH_HIGH_WATERMARK)")
        return settings


DEFAULT_LEASE_TTL = 60.0   # seconds a holder record lives without a heartbeat (prefetch/store/records.py)
_LEASE_TTL_ENV = "PREFETCH_LEASE_TTL"


def lease_ttl() -> float:
    """PREFETCH_LEASE_TTL in seconds (validated: one BadSetting line naming the variable)."""
    raw = os.environ.get(_LEASE_TTL_ENV, "").strip()
    if not raw:
        return DEFAULT_LEASE_TTL
    try:
        ttl = float(raw)
    except ValueError:
        ttl = float("nan")
    if not ttl >= 0.5 or ttl == float("inf"):
        raise BadSetting(f"{_LEASE_TTL_ENV}={raw!r} is not a number of seconds >= 0.5")
    return ttl


def _coerce(field: dataclasses.Field, value):
    if field.name == "cache_dir":
        return Path(value).expanduser().resolve()
    if field.name == "min_rate":
        return parse_bytes(str(value))
    if field.name in ("max_bytes", "chunk_bytes", "multipart_threshold"):
        return None if value in (None, "", "0", 0) and field.name == "max_bytes" else parse_bytes(str(value))
    if field.name == "transport":
        if str(value).strip().lower() not in TRANSPORTS:
            from .errors import BadURI

            raise BadURI(f"PREFETCH_TRANSPORT must be one of {', '.join(TRANSPORTS)}, not {value!r}")
        return str(value).strip().lower()
    if field.name == "peers":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word not in _BOOLEANS:
            raise ValueError(value)
        return _BOOLEANS[word]
    if field.name in ("max_concurrency", "max_attempts"):
        if isinstance(value, float) or (isinstance(value, str) and not value.strip().lstrip("+-").isdigit()):
            raise ValueError(value)   # "1.5" concurrency is a typo, not 1
        return int(value)
    if isinstance(value, bool):
        raise ValueError(value)
    number = float(value)
    if number != number:   # NaN
        raise ValueError(value)
    return number


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


# -- validation ---------------------------------------------------------------------------------------------------
# field -> (what it must be, check). Fields other modules add without an entry here are coerced, not range-checked.
_RULES = {
    "max_bytes": ("a size (e.g. 200GiB, 0 for no cap)", lambda v: v is None or v >= 0),
    "high_watermark": ("a fraction in (0, 1]", lambda v: 0 < v <= 1),
    "low_watermark": ("a fraction in (0, 1]", lambda v: 0 < v <= 1),
    "ref_ttl": ("a number of seconds >= 0", lambda v: v >= 0),
    "max_concurrency": ("an integer from 1 to 1024", lambda v: 1 <= v <= 1024),
    "chunk_bytes": ("a size of at least 64KiB (e.g. 8MiB)", lambda v: v >= 64 << 10),
    "multipart_threshold": ("a size >= 0 (e.g. 16MiB)", lambda v: v >= 0),
    "max_attempts": ("an integer from 1 to 100", lambda v: 1 <= v <= 100),
    "connect_timeout": ("a number of seconds > 0", lambda v: v > 0),
    "read_timeout": ("a number of seconds > 0", lambda v: v > 0),
    "peers": ("1 or 0 (true/false, yes/no, on/off)", lambda v: isinstance(v, bool)),
    "peer_timeout": ("a number of seconds > 0", lambda v: v > 0),
}


def _read_toml(path: Path, known: set[str]) -> dict:
    import tomllib

    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise BadSetting(f"config file {path} is not valid TOML ({e}) (PREFETCH_CONFIG)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadSetting(f"config file {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    unknown = sorted(set(data) - known)
    if unknown:
        raise BadSetting(f"config file {path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return data


def _checked(field: dataclasses.Field, value, where: str):
    rule = _RULES.get(field.name)
    try:
        coerced = _coerce(field, value)
    except (TypeError, ValueError, OverflowError):
        what = rule[0] if rule else f"a valid {field.name}"
        raise BadSetting(f"{where}={value!r} is not {what}") from None
    if rule and not rule[1](coerced):
        raise BadSetting(f"{where}={value!r} is out of range: expected {rule[0]}")
    return coerced

