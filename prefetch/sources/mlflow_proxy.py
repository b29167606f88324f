"""A tracking server that proxies artifacts (`mlflow server --artifacts-destination ...`): `mlflow-artifacts:/` URIs.

Talks the server's REST routes directly (list: GET .../mlflow-artifacts/artifacts?path=, read: GET
.../mlflow-artifacts/artifacts/<path> with a Range header) so files and ranges go in parallel.
"""
from __future__ import annotations

import os
import posixpath
from typing import Iterator
from urllib.parse import quote, urlparse

from ..config import Settings
from ..errors import BadURI, NotFound, Unreachable
from ..redact import redact_uri, same_host, userinfo
from .base import FileEntry, TransientError, safe_relpath

ROUTE = "/api/2.0/mlflow-artifacts/artifacts"


def split_artifact_uri(uri: str, tracking_uri: str | None) -> tuple[str, str]:
    """(server base URL, artifact root path) for `mlflow-artifacts:/p`, `mlflow-artifacts://host:port/p`
    or an already expanded `http://host/api/2.0/mlflow-artifacts/artifacts/p`."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        # The path only: a query string (a token pasted with the URL) is not part of the artifact path.
        base, _, path = uri.split("?", 1)[0].split("#", 1)[0].partition(ROUTE)
        return base.rstrip("/"), path.strip("/")
    if parsed.netloc:
        scheme = urlparse(tracking_uri or "").scheme if tracking_uri else "http"
        return f"{scheme if scheme in ('http', 'https') else 'http'}://{parsed.netloc}", parsed.path.strip("/")
    if not tracking_uri or urlparse(tracking_uri).scheme not in ("http", "https"):
        raise BadURI("mlflow-artifacts:/ URIs need MLFLOW_TRACKING_URI to point at the tracking server (http://...)", uri)
    return tracking_uri.rstrip("/"), parsed.path.strip("/")


class MlflowProxySource:
    supports_ranges = True

    def __init__(self, uri: str, settings: Settings, tracking_uri: str | None):
        import requests
        from requests.adapters import HTTPAdapter

        self.uri = uri
        base, self.root = split_artifact_uri(uri, tracking_uri)
        # URLs we build never carry userinfo (they end up in logs and errors); it becomes session auth instead.
        self.base = redact_uri(base)
        self.timeout = (settings.connect_timeout, settings.read_timeout)
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=settings.max_concurrency + 4, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if tracking_uri and same_host(self.base, tracking_uri):
            # MLflow's credentials belong to the tracking server: sent only when the artifact URL is that server
            # (an artifact URI may name any host, and must not collect the token).
            if os.environ.get("MLFLOW_TRACKING_TOKEN"):
                self.session.headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
            elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
                self.session.auth = (os.environ["MLFLOW_TRACKING_USERNAME"],
                                     os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
            elif userinfo(tracking_uri):
                self.session.auth = userinfo(tracking_uri)
        elif userinfo(base):
            self.session.auth = userinfo(base)   # the artifact URI's own userinfo, for its own host
        self._single = False

    def identity(self) -> dict:
        return {"origin": "mlflow-artifacts", "server": self.base}   # base has no userinfo: keys ignore credentials

    def _get(self, url: str, **kwargs):
        import requests

        try:
            resp = self.session.get(url, timeout=self.timeout, **kwargs)
        except requests.ConnectionError as e:
            raise Unreachable(f"cannot reach the tracking server at {self.base} ({type(e).__name__})", self.uri) from None
        except requests.Timeout:
            raise TransientError(f"tracking server at {self.base} timed out", self.uri) from None
        if resp.status_code == 404:
            raise NotFound("no such artifact on the tracking server", self.uri)
        if resp.status_code in (401, 403):
            raise Unreachable(f"the tracking server refused us (HTTP {resp.status_code})", self.uri)
        if resp.status_code >= 500:
            raise TransientError(f"the tracking server answered HTTP {resp.status_code}", self.uri)
        if resp.status_code >= 400:
            raise Unreachable(f"the tracking server answered HTTP {resp.status_code}: {resp.text[:200]}", self.uri)
        return resp

    def _ls(self, path: str) -> list[dict]:
        return self._get(f"{self.base}{ROUTE}", params={"path": path}).json().get("files", [])

    def list(self) -> list[FileEntry]:
        entries: list[FileEntry] = []
        pending = [""]
        while pending:
            rel_dir = pending.pop()
            for f in self._ls(posixpath.join(self.root, rel_dir) if rel_dir else self.root):
                rel = safe_relpath(posixpath.join(rel_dir, f["path"]) if rel_dir else f["path"], self.uri)
                if f.get("is_dir"):
                    pending.append(rel)
                else:
                    entries.append(FileEntry(rel, int(f.get("file_size", 0)), None))
        if not entries:
            # Either an empty/missing dir or the root names a single file: the server lists a file as itself.
            raise NotFound("no artifacts under this path on the tracking server", self.uri)
        self.supports_ranges = self._server_honours_ranges(entries)
        return sorted(entries, key=lambda e: e.path)

    def _server_honours_ranges(self, entries: list[FileEntry]) -> bool:
        """A 1-byte ranged GET of the smallest file. `mlflow server` 3.x answers a Range with the whole body (200):
        fetching a big file in N ranges would then send it N times over, so such a server gets whole-file reads."""
        probe = min((e for e in entries if e.size > 1), key=lambda e: e.size, default=None)
        if probe is None:
            return False
        url = f"{self.base}{ROUTE}/{quote(posixpath.join(self.root, probe.path))}"
        resp = self._get(url, headers={"Range": "bytes=0-0"}, stream=True)
        resp.close()
        return resp.status_code == 206

    def read(self, path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        url = f"{self.base}{ROUTE}/{quote(posixpath.join(self.root, path))}"
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        resp = self._get(url, headers=headers, stream=True)
        skip = start if (resp.status_code == 200 and start) else 0  # server ignored Range
        remaining = None if end is None else end - start
        try:
            for chunk in resp.iter_content(1 << 20):
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                if remaining is not None:
                    chunk = chunk[:remaining]
                    remaining -= len(chunk)
                yield chunk
                if remaining == 0:
                    break
        except Exception as e:  # noqa: BLE001 - a broken stream is retried from where it stopped
            raise TransientError(f"download of {path} broke off ({type(e).__name__})", self.uri) from None
        finally:
            resp.close()
