"""The node-local store: paths.py (every path of the layout), manifest.py (what a committed object records),
store.py (commit, lookup, verify, refs), lifecycle.py (cap, LRU, pins, leases, gc; import it by name).

Imports no ray and nothing of prefetch.sources but its base (FileEntry, the reserved MANIFEST name).
"""
from __future__ import annotations

from .manifest import Manifest, sha256_file
from .paths import INFLIGHT, MANIFEST, StorePaths, manifest_in
from .store import Store, allocated_bytes, apparent_bytes, fsync_dir, fsync_tree

__all__ = ["INFLIGHT", "MANIFEST", "Manifest", "Store", "StorePaths", "allocated_bytes", "apparent_bytes",
           "fsync_dir", "fsync_tree", "manifest_in", "sha256_file"]
