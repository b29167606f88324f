"""`mlflow-artifacts:/` through the native transport: the listing stays the tracking server's JSON route (through
requests, as mlflow_proxy.py), the bytes come through obstore's HTTPStore (Rust, GIL released), one ranged GET
per read, answered in the client's own buffer.

The tracking server's auth goes along as default headers of the HTTP client (MLFLOW_TRACKING_TOKEN as a bearer
token, MLFLOW_TRACKING_USERNAME/PASSWORD as basic auth), so nothing needs requests on the data path.
"""
from __future__ import annotations

import base64
import os
import posixpath
from datetime import timedelta
from typing import Iterator

from ..config import Settings
from ..errors import NotFound, OriginChanged, Unreachable
from . import TransientError
from .mlflow_proxy import ROUTE, MlflowProxySource
from .s3_native import STREAM_BLOCK, _STATUS, _first_line


def auth_headers() -> dict[str, str]:
    """The Authorization header MLflow's own client would send to the tracking server, if any."""
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
    return {}


class NativeMlflowProxySource(MlflowProxySource):
    """MlflowProxySource whose reads go through obstore (listing, identity and URI handling are inherited)."""

    def __init__(self, uri: str, settings: Settings, tracking_uri: str | None):
        super().__init__(uri, settings, tracking_uri)
        from obstore.store import HTTPStore

        client_options: dict = {
            "connect_timeout": timedelta(seconds=settings.connect_timeout),
            "read_timeout": timedelta(seconds=settings.read_timeout),
            "timeout": timedelta(hours=6),
            "allow_http": self.base.startswith("http://"),
        }
        if auth_headers():
            client_options["default_headers"] = auth_headers()
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            client_options["allow_invalid_certificates"] = True
        self.http = HTTPStore(f"{self.base}{ROUTE}", client_options=client_options,
                              retry_config={"max_retries": 1,
                                            "retry_timeout": timedelta(seconds=settings.read_timeout)})

    def _translate(self, error: Exception, path: str) -> Exception:
        from obstore.exceptions import (BaseError, GenericError, PermissionDeniedError, PreconditionError,
                                        UnauthenticatedError)

        text = str(error)
        m = _STATUS.search(text)
        status = int(m.group(1)) if m else 0
        if isinstance(error, PreconditionError) or status == 412:
            return OriginChanged(f"the artifact changed on the tracking server while we read it ({path})", self.uri)
        if isinstance(error, FileNotFoundError) or status == 404:
            return NotFound(f"no such artifact on the tracking server ({path})", self.uri)
        if isinstance(error, (PermissionDeniedError, UnauthenticatedError)) or status in (401, 403):
            return Unreachable(f"the tracking server refused us (HTTP {status or 403})", self.uri)
        if status >= 500:
            return TransientError(f"the tracking server answered HTTP {status}", self.uri)
        if status:
            return Unreachable(f"the tracking server answered HTTP {status} ({path})", self.uri)
        if "kind: Connect" in text and "timed out" not in text.lower():
            return Unreachable(f"cannot reach the tracking server at {self.base}", self.uri)
        if isinstance(error, (GenericError, ConnectionError, TimeoutError)):
            return TransientError(f"download of {path} broke off ({_first_line(text)})", self.uri)
        if isinstance(error, BaseError):
            return Unreachable(f"HTTP client error ({path}: {_first_line(text)})", self.uri)
        return error

    def _get(self, path: str, start: int, end: int | None, if_match: str | None):
        import obstore

        options: dict = {}
        if start or end is not None:
            options["range"] = (start, end) if end is not None else {"offset": start}
        if if_match:
            options["if_match"] = if_match
        return obstore.get(self.http, posixpath.join(self.root, path), options=options or None)

    def read_range(self, path: str, start: int, end: int, if_match: str | None = None):
        """Bytes [start, end) in one GET, as obstore's buffer (no copy in Python)."""
        if end <= start:
            return b""
        try:
            return self._get(path, start, end, if_match).bytes()
        except Exception as e:  # noqa: BLE001
            raise self._translate(e, path) from None

    def read(self, path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes [start, end) in blocks as they arrive (a broken stream is resumed by the engine from there)."""
        if end is not None and end <= start:
            return
        try:
            for block in self._get(path, start, end, None).stream(min_chunk_size=STREAM_BLOCK):
                yield block
        except Exception as e:  # noqa: BLE001
            raise self._translate(e, path) from None
