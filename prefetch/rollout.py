"""Deprecated: prefetch.rollout moved to serving.control.rollout; this shim re-exports it for one release.

Architecture test: prefetch/rollout.py and prefetch/watch.py (these two deprecation shims, by name) are the only
prefetch modules besides cli.py allowed to import serving. Delete both after the release.
"""
from __future__ import annotations

import warnings

from prefetch.render import serve_event_line as describe_event  # noqa: F401  (was rollout.describe_event)
from serving.control.rollout import (DEFAULT_TIMEOUT_S, MODES, POLL_S, Event, RolloutError, Target, confirm,  # noqa: F401
                                     finish_validation, pinned_uri, resolve_target, rollout, start_validation,
                                     warm_everywhere)

warnings.warn("prefetch.rollout moved to serving.control.rollout", DeprecationWarning, stacklevel=2)
