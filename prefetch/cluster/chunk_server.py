"""The agent's chunk server: other nodes' downloads read chunks of this node's store over HTTP ranges.

The data plane of peer-to-peer (prefetch/cluster/peers.py); the control plane (who holds what) stays Ray's. Bytes
go from the page cache to the socket with sendfile and are read straight into the receiver's buffer: no object
store copies on either side, no pickling.

- Bound to the node's IP (the one Ray uses), on a free port or PREFETCH_PEER_PORT.
- Only cluster members: each server has a random secret, handed out over Ray only (to the tracker, which gives it
  with a route to the nodes it sends here). A request without it gets 401. Plain HTTP, like Ray's own transfers
  between nodes without TLS.
- Only files of keys in this node's store: a committed object's manifest, or the listing of this process's running
  download (`peers.locate`); only inside their artifact dir; symlinks never followed.
"""
from __future__ import annotations

import hmac
import os
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

# (key, path) -> the file to serve, or None when this node does not hold it
Locate = Callable[[str, str], "Path | None"]
OnSent = Callable[[int], None]


class ChunkServer:
    def __init__(self, host: str, locate: Locate, on_sent: OnSent, port: int = 0):
        self.secret = secrets.token_urlsafe(32)
        handler = _handler(self.secret, locate, on_sent)
        self._server = _Server((host, port), handler)
        self.url = f"http://{host}:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="prefetch-chunk-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A reader that went away mid-chunk (timed out, its node removed) is its own business: no traceback on
        the agent's stderr. It routes around us and the chunk is fetched elsewhere."""


def _handler(secret: str, locate: Locate, on_sent: OnSent):
    expected = f"Bearer {secret}".encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"     # keep-alive: one connection per (reader thread, holder)

        def log_message(self, *args) -> None:   # no access log on the agent's stderr
            pass

        def do_GET(self) -> None:
            given = (self.headers.get("Authorization") or "").encode()
            if not hmac.compare_digest(given, expected):
                return self._empty(401)
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            try:
                key, path = query["key"][0], query["path"][0]
                start, end = int(query["start"][0]), int(query["end"][0])
            except (KeyError, IndexError, ValueError):
                return self._empty(400)
            if url.path != "/chunk" or not 0 <= start < end:
                return self._empty(400)
            try:
                found = locate(key, path)
            except Exception:  # noqa: BLE001 - an unsafe or unknown path is simply not held here
                found = None
            if found is None:
                return self._empty(404)
            try:
                fd = os.open(found, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                return self._empty(404)
            try:
                if os.fstat(fd).st_size < end:
                    return self._empty(416)
                self.send_response(200)
                self.send_header("Content-Length", str(end - start))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                self.wfile.flush()
                offset = start
                while offset < end:
                    sent = os.sendfile(self.connection.fileno(), fd, offset, end - offset)
                    if sent == 0:
                        break
                    offset += sent
                on_sent(offset - start)
            finally:
                os.close(fd)

        def _empty(self, code: int) -> None:
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
