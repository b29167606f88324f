"""A loopback TCP proxy that counts HTTP traffic and can emulate a far link.

LinkProxy sits between a client and an HTTP server (here: the S3 server) and

- counts bytes both ways and HTTP requests per method, by following the client->server byte
  stream as HTTP/1.x: a request line + headers, then a body of Content-Length bytes, or a
  chunked body (parsed chunk by chunk), or no body. Body bytes are skipped, so a PUT whose payload
  happens to contain "GET / HTTP/1.1" is not miscounted. Pipelined and keep-alive requests are
  counted one by one. If the stream stops looking like HTTP (a header block over 256 KiB, an
  unparsable chunk size), that connection is no longer parsed, and `unparsed_connections` says so.
- adds `latency_s` before forwarding each request's first byte to the server (one delay per
  request, not per packet; body bytes that follow are not delayed again);
- caps each connection's server->client throughput at `rate_bytes_per_s` (a token bucket with
  a burst of 50 ms worth of bytes);
- caps the server->client throughput of all connections together at `uplink_bytes_per_s` (one shared token
  bucket: a registry's uplink shared by every node of a cluster), changeable while running (`set_uplink`).

One thread per direction per connection; 1 MiB buffers and sendall keep it off the critical path
on loopback when no limits are set.

Faults (add_fault): each matches the next `count` GET requests (`method`: another method) whose target contains
`match` (and whose Range header starts at `range_start`, when given) and shapes that one response:
  "stall"     hold the request before it reaches the server until `release()` or `seconds` (a stall longer than
              the client's read timeout, or a pause-then-continue while the test changes the object);
  "reset"     forward `after` response bytes, then reset the connection (RST) mid-body;
  "truncate"  forward `after` response bytes, then close cleanly (FIN): a body shorter than its Content-Length;
  "trickle"   forward the response at `rate` bytes/s;
  "503"       answer 503 SlowDown and close, without asking the server;
  "flip"      invert one byte of the body, `after` bytes into it;
  "rewrite"   buffer the whole response and pass its body through `rewrite(bytes) -> bytes` (listing attacks).
"""
from __future__ import annotations

import collections
import dataclasses
import socket
import struct
import threading
import time
from typing import Any

from .ports import LOOPBACK

_BUF = 1024 * 1024
_MAX_HEADER = 256 * 1024
_NO_BODY_METHODS = {b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT"}


class _RequestParser:
    """Incremental HTTP/1.x request framing over the client->server byte stream.

    feed(data) returns a list of offsets in `data` where a new request starts (so the caller can
    delay forwarding at those points) and calls on_request(method, target, headers) for each
    complete header block.
    """

    HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILER, OPAQUE = range(7)

    def __init__(self, on_request):
        self.on_request = on_request
        self.state = self.HEAD
        self.buf = bytearray()  # header or chunk-size line being accumulated
        self.remaining = 0
        self.opaque = False
        self.in_request = False  # bytes of the current request's head already seen

    def feed(self, data: bytes) -> list[int]:
        starts: list[int] = []
        i, n = 0, len(data)
        while i < n:
            st = self.state
            if st == self.OPAQUE:
                break
            if st == self.HEAD:
                if not self.in_request:
                    # Skip stray CRLFs between requests (allowed by RFC 9112).
                    while i < n and data[i] in (13, 10) and not self.buf:
                        i += 1
                    if i >= n:
                        break
                    starts.append(i)
                    self.in_request = True
                end = data.find(b"\r\n\r\n", i)
                if end >= 0 and not self.buf:
                    block = data[i : end + 4]
                    i = end + 4
                else:
                    # Header block split across reads: accumulate.
                    self.buf += data[i:]
                    j = self.buf.find(b"\r\n\r\n")
                    if j < 0:
                        if len(self.buf) > _MAX_HEADER:
                            self._give_up()
                        break
                    consumed_here = len(data) - i - (len(self.buf) - (j + 4))
                    block = bytes(self.buf[: j + 4])
                    self.buf.clear()
                    i += consumed_here
                self._head(block)
            elif st == self.BODY:
                take = min(self.remaining, n - i)
                i += take
                self.remaining -= take
                if self.remaining == 0:
                    self._next_request()
            elif st == self.CHUNK_SIZE:
                j = data.find(b"\n", i)
                if j < 0:
                    self.buf += data[i:]
                    if len(self.buf) > 4096:
                        self._give_up()
                    break
                self.buf += data[i : j + 1]
                i = j + 1
                line = bytes(self.buf).strip()
                self.buf.clear()
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    self._give_up()
                    break
                if size == 0:
                    self.state = self.TRAILER
                else:
                    self.remaining = size
                    self.state = self.CHUNK_DATA
            elif st == self.CHUNK_DATA:
                take = min(self.remaining, n - i)
                i += take
                self.remaining -= take
                if self.remaining == 0:
                    self.remaining = 2
                    self.state = self.CHUNK_CRLF
            elif st == self.CHUNK_CRLF:
                take = min(self.remaining, n - i)
                i += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = self.CHUNK_SIZE
            elif st == self.TRAILER:
                # Trailer lines end with an empty line. Read line by line.
                j = data.find(b"\n", i)
                if j < 0:
                    self.buf += data[i:]
                    if len(self.buf) > _MAX_HEADER:
                        self._give_up()
                    break
                self.buf += data[i : j + 1]
                i = j + 1
                line = bytes(self.buf)
                self.buf.clear()
                if line in (b"\r\n", b"\n"):
                    self._next_request()
        return starts

    def _give_up(self) -> None:
        self.state = self.OPAQUE
        self.opaque = True
        self.buf.clear()

    def _next_request(self) -> None:
        self.state = self.HEAD
        self.in_request = False

    def _head(self, block: bytes) -> None:
        lines = block.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) < 3 or not parts[2].startswith(b"HTTP/"):
            self._give_up()
            return
        method, target = parts[0].upper(), parts[1]
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            if not line:
                continue
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        self.on_request(method, target, headers)
        te = headers.get(b"transfer-encoding", b"").lower()
        if b"chunked" in te:
            self.state = self.CHUNK_SIZE
            return
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                length = int(cl)
            except ValueError:
                self._give_up()
                return
            if length > 0:
                self.remaining = length
                self.state = self.BODY
                return
        # No body: GET/HEAD/DELETE and friends, or an explicit Content-Length: 0.
        self._next_request()


class _Throttle:
    """Token bucket on a virtual clock: sending n bytes advances the clock by n/rate."""

    def __init__(self, rate: float, burst_s: float = 0.05):
        self.rate = float(rate)
        self.burst_s = burst_s
        self.vt = time.monotonic()

    def piece(self) -> int:
        # Pieces small enough that pacing is smooth, big enough not to cost CPU.
        return int(max(16 * 1024, min(_BUF, self.rate / 50)))

    def wait(self, n: int) -> None:
        delay = self._reserve(n)
        if delay > 0:
            time.sleep(delay)

    def _reserve(self, n: int) -> float:
        now = time.monotonic()
        if self.vt < now - self.burst_s:
            self.vt = now - self.burst_s
        self.vt += n / self.rate
        return self.vt - now


class _SharedThrottle(_Throttle):
    """One token bucket for many connections: each reserves its bytes under a lock, then sleeps on its own."""

    def __init__(self, rate: float, burst_s: float = 0.05):
        super().__init__(rate, burst_s)
        self.lock = threading.Lock()

    def _reserve(self, n: int) -> float:
        with self.lock:
            return super()._reserve(n)


@dataclasses.dataclass
class Fault:
    kind: str
    match: bytes = b""
    range_start: int | None = None
    method: bytes = b"GET"          # the requests it matches (b"HEAD": a 503 for the origin checks' HEADs)
    count: int = 1
    after: int = 0
    seconds: float = 30.0
    rate: float = 8192.0
    rewrite: object = None
    served: int = 0
    released: threading.Event = dataclasses.field(default_factory=threading.Event)
    reached: threading.Event = dataclasses.field(default_factory=threading.Event)   # a request was held

    def matches(self, method: bytes, target: bytes, headers: dict) -> bool:
        if method != self.method or self.match not in target or self.served >= self.count:
            return False
        if self.range_start is not None:
            rng = headers.get(b"range", b"")
            return rng.startswith(b"bytes=%d-" % self.range_start)
        return True

    def release(self) -> None:
        self.released.set()


class LinkProxy:
    """TCP proxy on a free loopback port in front of upstream_host:upstream_port.

    stats() -> {
        "requests": HTTP requests seen client->server,
        "get_requests", "head_requests", "put_requests", "post_requests", "delete_requests",
        "by_method": {"GET": n, ...},
        "bytes_in": bytes client->server (headers + bodies),
        "bytes_out": bytes server->client (headers + bodies),
        "connections": connections accepted, "active_connections": open now,
        "unparsed_connections": connections whose stream stopped parsing as HTTP,
    }
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        latency_s: float = 0.0,
        rate_bytes_per_s: float | None = None,
        keep_log: int = 100_000,
        uplink_bytes_per_s: float | None = None,
    ):
        self.upstream = (upstream_host, int(upstream_port))
        # Fault injection (see inject_faults): the next N GET connections answered 503, or cut mid-response.
        self._fail_503 = 0
        self._cut = 0
        self._cut_after = 0
        self._match = b""
        self._faults_served = 0
        self._faults: list[Fault] = []
        self.latency_s = float(latency_s)
        self.rate_bytes_per_s = rate_bytes_per_s
        self._uplink = _SharedThrottle(uplink_bytes_per_s) if uplink_bytes_per_s else None
        self.port: int | None = None
        self._lsock: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._log: collections.deque = collections.deque(maxlen=keep_log)
        self._reset_counters()

    # --- counters -------------------------------------------------------------------------
    def _reset_counters(self) -> None:
        self._by_method: collections.Counter = collections.Counter()
        self._bytes_in = 0
        self._bytes_out = 0
        self._connections = 0
        self._unparsed = 0
        self._log.clear()

    def reset(self) -> None:
        with self._lock:
            self._reset_counters()

    reset_stats = reset

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by = dict(self._by_method)
            return {
                "requests": sum(by.values()),
                "faults_served": self._faults_served,
                "get_requests": by.get("GET", 0),
                "head_requests": by.get("HEAD", 0),
                "put_requests": by.get("PUT", 0),
                "post_requests": by.get("POST", 0),
                "delete_requests": by.get("DELETE", 0),
                "by_method": by,
                "bytes_in": self._bytes_in,
                "bytes_out": self._bytes_out,
                "connections": self._connections,
                "active_connections": len(self._conns) // 2,
                "unparsed_connections": self._unparsed,
            }

    def request_log(self) -> list[tuple[str, str, str | None]]:
        """(method, target, Range header or None) of each request seen since the last reset."""
        with self._lock:
            return list(self._log)

    def _on_request(self, method: bytes, target: bytes, headers: dict) -> None:
        rng = headers.get(b"range")
        with self._lock:
            self._by_method[method.decode("latin-1")] += 1
            self._log.append(
                (method.decode("latin-1"), target.decode("latin-1"), rng.decode("latin-1") if rng else None)
            )

    # --- life cycle -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def set_uplink(self, rate_bytes_per_s: float | None) -> None:
        """Cap (or uncap, None) all connections together from now on, open ones included."""
        self._uplink = _SharedThrottle(rate_bytes_per_s) if rate_bytes_per_s else None

    def start(self) -> "LinkProxy":
        if self._lsock is not None:
            return self
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((LOOPBACK, 0))
        s.listen(1024)
        self._lsock = s
        self.port = s.getsockname()[1]
        self._stopping.clear()
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"linkproxy-{self.port}", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._lsock is not None:
            try:
                self._lsock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._lsock.close()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        for t in threads:
            t.join(timeout=5)
        for c in conns:
            try:
                c.close()
            except OSError:
                pass
        self._lsock = None

    def __enter__(self) -> "LinkProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def inject_faults(self, answer_503: int = 0, cut: int = 0, cut_after_bytes: int = 1 << 20,
                      match: bytes = b"") -> None:
        """Make the next `answer_503` new connections whose first request is a GET (of a target containing `match`)
        get `503 Slow Down` and close, and the next `cut` such connections be reset after `cut_after_bytes` of
        response: what a flaky origin or link does."""
        with self._lock:
            self._fail_503, self._cut, self._cut_after, self._match = answer_503, cut, cut_after_bytes, match

    def add_fault(self, kind: str, match: bytes = b"", **options) -> Fault:
        """Shape the next matching GET responses (see the module docstring); returns the Fault (release() it)."""
        fault = Fault(kind, match, **options)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            faults, self._faults = self._faults, []
        for f in faults:
            f.release()

    def _match_fault(self, method: bytes, target: bytes, headers: dict) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, target, headers):
                    fault.served += 1
                    self._faults_served += 1
                    return fault
        return None

    def _take_fault(self, first: bytes) -> str | None:
        line = first.split(b"\r\n", 1)[0]
        if not (line.startswith(b"GET ") and getattr(self, "_match", b"") in line):
            return None
        with self._lock:
            if self._fail_503 > 0:
                self._fail_503 -= 1
                self._faults_served += 1
                return "503"
            if self._cut > 0:
                self._faults_served += 1
                self._cut -= 1
                return "cut"
        return None

    # --- data path ----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        lsock = self._lsock
        while not self._stopping.is_set():
            try:
                client, _ = lsock.accept()
            except OSError:
                break
            if self._stopping.is_set():
                client.close()
                break
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            with self._lock:
                self._threads.add(t)
            t.start()

    @staticmethod
    def _tune(s: socket.socket) -> None:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, 4 * _BUF)
            except OSError:
                pass

    def _serve(self, client: socket.socket) -> None:
        me = threading.current_thread()
        try:
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                return
            self._tune(client)
            self._tune(upstream)
            first = client.recv(_BUF)
            state: dict = {"cut_after": None}   # set by _pump_up when a request is to be reset mid-response
            with self._lock:
                self._connections += 1
                self._conns.add(client)
                self._conns.add(upstream)
            back = threading.Thread(target=self._pump_down, args=(upstream, client, state), daemon=True)
            with self._lock:
                self._threads.add(back)
            back.start()
            self._pump_up(client, upstream, first, state)
            back.join()
            with self._lock:
                self._conns.discard(client)
                self._conns.discard(upstream)
                self._threads.discard(back)
            for s in (client, upstream):
                try:
                    s.close()
                except OSError:
                    pass
        finally:
            with self._lock:
                self._threads.discard(me)

    def _pump_up(self, src: socket.socket, dst: socket.socket, first: bytes = b"", state: dict | None = None) -> None:
        """client -> server: parse request framing, delay each request start, count."""
        heads: list = []

        def on_request(method, target, headers):
            self._on_request(method, target, headers)
            heads.append(self._match_fault(method, target, headers))

        parser = _RequestParser(on_request)
        buf = bytearray(_BUF)
        view = memoryview(buf)
        try:
            data = first
            while data:
                if parser.opaque:
                    starts = []
                else:
                    starts = parser.feed(data)
                    if parser.opaque:
                        with self._lock:
                            self._unparsed += 1
                with self._lock:
                    self._bytes_in += len(data)
                for fault in heads:
                    if state is not None:   # a new request: the previous response's fault is over
                        for k in ("fault", "head", "body_at"):
                            state.pop(k, None)
                    if fault is not None and state is not None:
                        if fault.kind == "503":
                            src.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                                        b"Content-Length: 61\r\nConnection: close\r\n\r\n"
                                        b"<Error><Code>SlowDown</Code><Message>fault</Message></Error>\n")
                            _shut(src, dst)
                            return
                        if fault.kind == "stall":
                            fault.reached.set()
                            fault.released.wait(fault.seconds)
                        else:
                            state["fault"] = fault
                            state["fault_bytes"] = 0
                heads.clear()
                for off in starts:
                    fault = self._take_fault(data[off:off + 2048])
                    if fault == "503":
                        src.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                                    b"Content-Length: 61\r\nConnection: close\r\n\r\n"
                                    b"<Error><Code>SlowDown</Code><Message>fault</Message></Error>\n")
                        _shut(src, dst)   # wakes the other pump; _serve closes both
                        return
                    if fault == "cut" and state is not None:
                        state["cut_after"] = self._cut_after
                if self.latency_s > 0 and starts:
                    prev = 0
                    for off in starts:
                        if off > prev:
                            dst.sendall(data[prev:off])
                        time.sleep(self.latency_s)
                        prev = off
                    dst.sendall(data[prev:])
                else:
                    dst.sendall(data)
                n = src.recv_into(buf)
                data = bytes(view[:n])
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _pump_down(self, src: socket.socket, dst: socket.socket, state: dict | None = None) -> None:
        """server -> client: count, and pace when a rate cap is set (and reset the link if told to)."""
        throttle = _Throttle(self.rate_bytes_per_s) if self.rate_bytes_per_s else None
        size = throttle.piece() if throttle else _BUF
        buf = bytearray(size)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if n == 0:
                    break
                fault = state.get("fault") if state is not None else None
                if fault is not None:
                    if self._shape(fault, state, src, dst, bytes(view[:n])):
                        return
                    continue
                if throttle:
                    throttle.wait(n)
                uplink = self._uplink
                if uplink is not None:
                    uplink.wait(n)
                # Count before sending: once a client holds the whole response, stats() must
                # already include it (counting after sendall raced with the client's next call).
                with self._lock:
                    self._bytes_out += n
                dst.sendall(view[:n])
                if state is not None and state["cut_after"] is not None:
                    state["cut_after"] -= n
                    if state["cut_after"] <= 0:   # the link dies mid-response
                        dst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        _shut(dst, src)
                        return
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


    def _send(self, dst: socket.socket, data: bytes) -> None:
        with self._lock:
            self._bytes_out += len(data)
        dst.sendall(data)

    def _shape(self, fault: Fault, state: dict, src: socket.socket, dst: socket.socket, data: bytes) -> bool:
        """Apply a response fault to the bytes `data` just read from the server; True: the connection is over."""
        done = state["fault_bytes"]
        state["fault_bytes"] = done + len(data)
        if fault.kind in ("reset", "truncate"):
            keep = max(0, fault.after - done)
            if keep >= len(data):
                self._send(dst, data)
                return False
            self._send(dst, data[:keep])
            if fault.kind == "reset":
                dst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            _shut(dst, src)
            return True
        if fault.kind == "trickle":
            piece = max(1, int(fault.rate / 10))
            for i in range(0, len(data), piece):
                self._send(dst, data[i:i + piece])
                time.sleep(len(data[i:i + piece]) / fault.rate)
            return False
        if fault.kind == "flip":
            buf = state.setdefault("head", bytearray())
            if "body_at" not in state:
                buf += data
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return False
                state["body_at"] = 0
                data, head = bytes(buf[end + 4:]), bytes(buf[:end + 4])
                self._send(dst, head)
            at = fault.after - state["body_at"]
            if 0 <= at < len(data):
                data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
            state["body_at"] += len(data)
            self._send(dst, data)
            return False
        if fault.kind == "rewrite":
            buf = state.setdefault("head", bytearray())
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(buf[:end]).decode("latin-1").split("\r\n")
            length = next((int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:")), None)
            if length is None or len(buf) - end - 4 < length:
                return False
            body = fault.rewrite(bytes(buf[end + 4:end + 4 + length]))
            head = [h for h in head if not h.lower().startswith("content-length:")] + [f"Content-Length: {len(body)}"]
            self._send(dst, "\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body)
            for k in ("fault", "head"):
                state.pop(k, None)
            return False
        self._send(dst, data)
        return False


def _shut(*socks: socket.socket) -> None:
    """shutdown (not close): a recv blocked on the socket in another thread returns at once."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
