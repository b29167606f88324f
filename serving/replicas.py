"""Moved to serving.control.replicas. Kept (without a warning: replicas import it) only until serving/deployment.py
imports `from .control import replicas`; delete it then."""
from __future__ import annotations

from .control.replicas import (NAMESPACE, last_good, publish, remember_last_good, replica_identity,  # noqa: F401
                               replica_status, unpublish)
