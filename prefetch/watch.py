"""Deprecated: prefetch.watch moved to serving.control.watch; this shim re-exports it for one release.

Architecture test: prefetch/rollout.py and prefetch/watch.py (these two deprecation shims, by name) are the only
prefetch modules besides cli.py allowed to import serving. Delete both after the release.
"""
from __future__ import annotations

import warnings

from prefetch.render import serve_event_line
from serving.control.watch import RETRY_BACKOFF_MAX_S, check_watchable, current_version, watch  # noqa: F401

warnings.warn("prefetch.watch moved to serving.control.watch", DeprecationWarning, stacklevel=2)


def describe_event(kind: str, f: dict) -> str | None:
    """Was watch.describe_event: one line per watch or rollout event, behind the time of day."""
    return serve_event_line(kind, f, timestamped=True)
