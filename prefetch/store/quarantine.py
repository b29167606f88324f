"""Quarantine, not collapse: an object whose manifest cannot be read is moved aside, and the node keeps working.

A manifest is unreadable when it is truncated or garbled (a disk that lied about fsync, a hand edit), when
it lacks what a manifest must hold, or when it was written in a newer `version` of the format than this code
knows (a newer prefetch on the same cache dir). Such an object cannot be trusted, nor served: it is moved to

    quarantine/<key>.<random>/                 the object tree, as it was
    quarantine/<key>.<random>/.quarantine.json why (reason, time, the manifest's first bytes)

under the key's lock (skipped when the lock is busy: whoever holds it is replacing the object anyway), so the
key is a miss again and the next warm downloads it afresh. `ls`, `verify` and `status` report what is there;
`prefetch gc` does not delete it (an operator may want to look), `rm -r` of the directory does.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

REASON = ".quarantine.json"
MANIFEST_FORMAT = 1        # the newest manifest `version` this code reads


class ManifestError(Exception):
    """A manifest that cannot be read: its text is broken, or its format is not one this code knows."""


def parse_manifest(text: str, manifest_cls):
    """manifest_cls.from_json(text), or ManifestError saying why not (never a KeyError or a TypeError)."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"unreadable manifest ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(doc, dict):
        raise ManifestError("unreadable manifest (not a JSON object)")
    version = doc.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ManifestError(f"unreadable manifest (version {version!r})")
    if version > MANIFEST_FORMAT:
        raise ManifestError(f"manifest format {version} is newer than this prefetch reads ({MANIFEST_FORMAT})")
    try:
        return manifest_cls.from_json(text)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(f"unreadable manifest (missing or unexpected field: {e})") from None


def quarantine(store, key: str, reason: str) -> Path | None:
    """Move objects/<key> (and what was derived from it) to quarantine/; returns where it went, or None if the
    key's lock is busy or the object is already gone."""
    lock = store.try_lock(key)
    if lock is None:
        return None
    try:
        src = store.paths.object_dir(key)
        if not src.is_dir() or src.is_symlink():
            return None
        dest = store.paths.quarantine() / f"{key}.{uuid.uuid4().hex[:8]}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            head = (src / ".prefetch.json").read_bytes()[:200].decode("utf-8", "replace")
        except OSError:
            head = ""
        os.rename(src, dest)     # atomic: readers see the object or a miss, never a half-moved tree
        derived = store.paths.derived_key_dir(key)
        if derived.is_dir():
            os.rename(derived, dest.with_name(dest.name + ".derived"))
        try:
            os.chmod(dest, 0o700)
            (dest / REASON).write_text(json.dumps({"key": key, "reason": reason, "at": time.time(),
                                                   "manifest_head": head}, sort_keys=True))
        except OSError:
            pass                 # the move is what matters; the note is a courtesy
        return dest
    finally:
        lock.release()


def quarantined(store) -> list[dict]:
    """What quarantine/ holds: key, reason, at, path (newest first)."""
    root = store.paths.quarantine()
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        if not d.is_dir() or d.name.endswith(".derived"):
            continue
        try:
            doc = json.loads((d / REASON).read_text())
        except (OSError, json.JSONDecodeError):
            doc = {"key": d.name.rsplit(".", 1)[0], "reason": "unknown", "at": d.stat().st_mtime}
        out.append({"key": doc.get("key"), "reason": doc.get("reason"), "at": doc.get("at"), "path": str(d)})
    return sorted(out, key=lambda r: -(r.get("at") or 0))
