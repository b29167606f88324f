"""ray-model-prefetch: a node-local model artifact cache for Ray Serve.

    import prefetch
    warmed = prefetch.warm("models:/fraud/Production")   # -> Warmed(path, key, bytes, from_cache, resolved)
    prefetch.resolve("models:/fraud@champion")           # -> Resolved (no bytes moved)

Imports are lazy so `import prefetch` (and a CLI cache hit) stays cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import (BadURI, ConversionError, IntegrityError, NoSpace, NotFound, PrefetchError,  # noqa: F401
                     Unreachable, UnsupportedFormat)

if TYPE_CHECKING:
    from .api import Warmed, warm  # noqa: F401
    from .config import Settings  # noqa: F401
    from .store import Store  # noqa: F401
    from .uri import Resolved, resolve  # noqa: F401

_LAZY = {"warm": "api", "Warmed": "api", "resolve": "uri", "Resolved": "uri", "Settings": "config", "Store": "store"}

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
