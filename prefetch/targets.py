"""What a user typed on the command line (a key, a unique key prefix, or a URI) -> a store key.

Out of prefetch.store.lifecycle because naming a URI needs uri.identify (the registry, the sources): the store
stays below all of that.
"""
from __future__ import annotations

from pathlib import Path

from .config import Settings
from .errors import BadURI, PrefetchError
from .store import Store
from .store.lifecycle import pinned_keys, pins, unpin
from .uri import identify


def key_for(store: Store, settings: Settings, target: str) -> tuple[str, str | None, bool]:
    """(key, uri or None, cached) for what a user typed: a key or unique key prefix among cached and pinned keys,
    else a URI (resolved with uri.identify: no network for pinned registry versions)."""
    if ":" not in target and "/" not in target:
        known = set(store.keys()) | pinned_keys(store)
        if target in known:
            return target, None, store.paths.manifest(target).exists()
        matches = sorted(k for k in known if k.startswith(target))
        if len(matches) > 1 and not Path(target).exists():
            raise BadURI(f"key prefix is ambiguous ({len(matches)} keys match)", target)
        if len(matches) == 1 and not Path(target).exists():
            return matches[0], None, store.paths.manifest(matches[0]).exists()
    resolved = identify(target, settings, store)
    return resolved.key, target, store.paths.manifest(resolved.key).exists()


def unpin_target(store: Store, settings: Settings, target: str) -> list[str]:
    """Unpin what target names: a key, or a URI (the pins made with that very URI, e.g. an older version that
    models:/m/latest pointed to when it was pinned, and the key it names now). Returns the keys unpinned."""
    from .redact import redact_uri

    keys = {p["key"] for p in pins(store) if p.get("uri") in (target, redact_uri(target))}
    try:
        keys.add(key_for(store, settings, target)[0])
    except PrefetchError:
        if not keys:          # nothing recorded under that URI either: say why it could not be named
            raise
    return sorted(k for k in keys if unpin(store, k))
