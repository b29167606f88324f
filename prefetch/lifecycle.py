"""Cache lifecycle: size cap, eviction, pins, leases. (Filled in by the lifecycle work; until then the only
rule is the free-space guard in api._ensure_space.)"""
from __future__ import annotations

from .config import Settings
from .store import Store


def make_room(store: Store, settings: Settings, needed: int, protect: set[str]) -> None:
    """Evict least-recently-used objects so `needed` more bytes fit under the cap. No cap: nothing to do."""
    return None
