"""Every path of the node-local store's layout (DESIGN.md "Node-local store"), in one place. No I/O.

    objects/<key>/                                   committed, read-only artifact trees
    objects/<key>/.prefetch.json                     their manifests (MANIFEST)
    derived/<key>/<format id>/                       converted models (prefetch.convert)
    refs/<ref id>.json                               last resolution of a mutable URI
    staging/<key>.<rand>/                            a download in progress (.inflight.json: who, how much)
    staging/derived-<key>-<format id>.<rand>/        a conversion in progress
    locks/<name>.lock                                cross-process single flight (<key>, or <key>.<format id>)
    pins/<key>.json                                  kept whatever the cap
    leases/<key>/<host>-<pid>-<rand>.json            a live process uses <key>
    trash/<key>.<rand>                               an object on its way out (rename first, delete after)
    quarantine/                                      objects whose manifest cannot be read
"""
from __future__ import annotations

import dataclasses
import re
import uuid
from pathlib import Path

from ..sources.base import MANIFEST  # defined with the listing rules that reserve the name; re-exported

INFLIGHT = ".inflight.json"          # in a staging dir: what is being fetched, by which pid (read by `status`)

_RAND = 8                            # hex digits making a staging, trash or lease name unique
_DERIVED_PREFIX = "derived-"
_DERIVED_STAGING = re.compile(r"^derived-(?P<key>.+--[0-9a-f]{16})-(?P<fid>.+)\.[0-9a-f]{8}$")


def _rand() -> str:
    return uuid.uuid4().hex[:_RAND]


def manifest_in(tree: Path) -> Path:
    """The manifest of an artifact tree: a committed object, a derived dir, or either while still in staging."""
    return tree / MANIFEST


# The store's top-level directories (created and checked together by trust.prepare).
TOP_DIRS = ("objects", "derived", "refs", "staging", "locks", "pins", "leases", "quarantine", "trash", "profiles")


@dataclasses.dataclass(frozen=True)
class StorePaths:
    """Path arithmetic for the store, in one place. No I/O."""

    root: Path

    # -- objects and what is derived from them -----------------------------------------------------------------
    def objects_root(self) -> Path:
        return self.root / "objects"

    def object_dir(self, key: str) -> Path:
        return self.objects_root() / key

    def manifest(self, key: str) -> Path:
        return manifest_in(self.object_dir(key))

    def derived_root(self) -> Path:
        return self.root / "derived"

    def derived_key_dir(self, key: str) -> Path:
        """Everything derived from key (one subdir per format id): evicted and removed with the object."""
        return self.derived_root() / key

    def derived_dir(self, key: str, format_id: str) -> Path:
        return self.derived_key_dir(key) / format_id

    def ref(self, ref_id: str) -> Path:
        return self.root / "refs" / f"{ref_id}.json"

    # -- staging -----------------------------------------------------------------------------------------------
    def staging_root(self) -> Path:
        return self.root / "staging"

    def new_staging(self, key: str) -> Path:
        return self.staging_root() / f"{key}.{_rand()}"

    def staging_glob(self, key: str) -> str:
        """Glob pattern (below staging_root) of key's download staging dirs."""
        return f"{key}.*"

    def inflight(self, staging: Path) -> Path:
        """The in-flight record a downloader keeps in its staging dir."""
        return staging / INFLIGHT

    def derived_staging_name(self, key: str, format_id: str) -> str:
        return f"{_DERIVED_PREFIX}{key}-{format_id}"

    def new_derived_staging(self, key: str, format_id: str) -> Path:
        return self.staging_root() / f"{self.derived_staging_name(key, format_id)}.{_rand()}"

    def derived_staging_glob(self, key: str, format_id: str) -> str:
        """Glob pattern (below staging_root) of the staging dirs of key's conversion to format_id."""
        return f"{self.derived_staging_name(key, format_id)}.*"

    def staging_lock_name(self, name: str) -> str:
        """The lock a staging dir's writer holds, from the dir's name: a conversion locks "<key>.<format id>",
        a download locks "<key>"."""
        m = _DERIVED_STAGING.match(name)
        if m:
            return self.derived_lock_name(m["key"], m["fid"])
        return name.rsplit(".", 1)[0]

    # -- locks -------------------------------------------------------------------------------------------------
    def lock(self, name: str) -> Path:
        """locks/<name>.lock; name is a key, or derived_lock_name(key, format id)."""
        return self.root / "locks" / f"{name}.lock"

    def derived_lock_name(self, key: str, format_id: str) -> str:
        return f"{key}.{format_id}"

    # -- trash, quarantine -------------------------------------------------------------------------------------
    def trash(self) -> Path:
        return self.root / "trash"

    def new_trash(self, key: str) -> Path:
        return self.trash() / f"{key}.{_rand()}"

    def trash_key(self, name: str) -> str:
        """The key a trash entry came from (its lock is held while it may still be put back)."""
        return name.rsplit(".", 1)[0]

    def quarantine(self) -> Path:
        return self.root / "quarantine"

    def profiles(self, key: str) -> Path:
        """Measured memory profiles of an object, one per format (serving.memory_profile); beside objects/, which
        is read-only."""
        return self.root / "profiles" / key

    def profile(self, key: str, format: str) -> Path:
        return self.profiles(key) / f"{format}.json"

    # -- pins and leases ---------------------------------------------------------------------------------------
    def pins_root(self) -> Path:
        return self.root / "pins"

    def pin(self, key: str) -> Path:
        return self.pins_root() / f"{key}.json"

    def pin_key(self, path: Path) -> str | None:
        """The key a file in pins_root() pins, or None for what is not a pin (a temporary file being written)."""
        name = path.name
        if name.startswith(".") or not name.endswith(".json"):
            return None
        return name[: -len(".json")]

    def leases_root(self) -> Path:
        return self.root / "leases"

    def lease_dir(self, key: str) -> Path:
        return self.leases_root() / key

    def new_lease(self, key: str, host: str, pid: int) -> Path:
        return self.lease_dir(key) / f"{host}-{pid}-{_rand()}.json"
