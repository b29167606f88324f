"""Prometheus metrics (prometheus-client): what the node agent exposes on a port.

Counters and histograms count what happened in this process (the agent does the node's warms):
  prefetch_origin_bytes_total, prefetch_peer_bytes_total{direction="in"|"out"} (chunks got from / served to
  other nodes' agents), prefetch_cache_hits_total, prefetch_cache_misses_total,
  prefetch_evictions_total, prefetch_evicted_bytes_total,
  prefetch_download_seconds (histogram), prefetch_conversion_seconds (histogram).
Gauges describe the node's store, read from disk at each scrape (so they hold whoever wrote the bytes):
  prefetch_bytes_on_disk, prefetch_inflight_downloads, prefetch_max_bytes, prefetch_pinned_objects,
  prefetch_objects.

Importing prometheus_client costs ~0.1 s, which a CLI cache hit should not pay. So the metrics exist only once
something asks for them (start_http_server, render, enable(), PREFETCH_METRICS=1), or when the process has
imported prometheus_client anyway; until then the record_* calls are no-ops.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
from pathlib import Path

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

_lock = threading.Lock()
_m: "_Metrics | None" = None
_cache_dir: Path | None = None   # the store the gauges describe (default: Settings.load().cache_dir)


class _Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.origin_bytes = Counter("prefetch_origin_bytes", "Bytes downloaded from artifact origins.", registry=r)
        self.peer_bytes = Counter("prefetch_peer_bytes", "Bytes of chunks got from (in) or served to (out) other "
                                  "nodes.", ["direction"], registry=r)
        for direction in ("in", "out"):
            self.peer_bytes.labels(direction)   # both series exist from the start (0 until peers are used)
        self.hits = Counter("prefetch_cache_hits", "warm() calls answered from the local store.", registry=r)
        self.misses = Counter("prefetch_cache_misses", "warm() calls that had to download.", registry=r)
        self.evictions = Counter("prefetch_evictions", "Objects evicted to respect the cap or free disk.", registry=r)
        self.evicted_bytes = Counter("prefetch_evicted_bytes", "Bytes freed by eviction.", registry=r)
        self.download_seconds = Histogram("prefetch_download_seconds", "Time to download and commit one object.",
                                          buckets=BUCKETS, registry=r)
        self.conversion_seconds = Histogram("prefetch_conversion_seconds",
                                            "Time to convert and validate one derived artifact.",
                                            buckets=BUCKETS, registry=r)
        r.register(_StoreCollector())


class _StoreCollector:
    """Node-wide gauges, computed from the store when scraped."""

    def describe(self):
        return []   # computed at collect time only: registering must not walk the disk

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from .config import Settings
        from .store import Store, lifecycle

        settings = Settings.load()
        store = Store(_cache_dir or settings.cache_dir)
        u = lifecycle.usage(store)
        yield GaugeMetricFamily("prefetch_bytes_on_disk", "Bytes held by the store (objects, derived, staging).",
                                value=u.objects + u.derived + u.staging)
        yield GaugeMetricFamily("prefetch_inflight_downloads", "Downloads in progress on this node.", value=u.inflight)
        yield GaugeMetricFamily("prefetch_objects", "Committed objects in the store.", value=len(store.keys()))
        yield GaugeMetricFamily("prefetch_pinned_objects", "Pinned keys.", value=len(lifecycle.pinned_keys(store)))
        yield GaugeMetricFamily("prefetch_max_bytes", "The cache cap (0: none).", value=settings.max_bytes or 0)


def _get(create: bool = False) -> _Metrics | None:
    global _m
    if _m is None and (create or os.environ.get("PREFETCH_METRICS", "") not in ("", "0")
                       or "prometheus_client" in sys.modules):
        with _lock:
            if _m is None:
                _m = _Metrics()
    return _m


def enable(cache_dir: Path | str | None = None) -> None:
    """Start counting in this process (and describe the store at cache_dir in the gauges)."""
    global _cache_dir
    if cache_dir is not None:
        _cache_dir = Path(cache_dir).expanduser()
    _get(create=True)


def registry():
    """The CollectorRegistry holding prefetch's metrics (to merge into an app's own exposition)."""
    return _get(create=True).registry


# -- recording (called by the library) -----------------------------------------------------------------------
def record_hit() -> None:
    if (m := _get()) is not None:
        m.hits.inc()


def record_miss() -> None:
    if (m := _get()) is not None:
        m.misses.inc()


def record_download(seconds: float, origin_bytes: int) -> None:
    if (m := _get()) is not None:
        m.download_seconds.observe(seconds)
        m.origin_bytes.inc(origin_bytes)


def record_peer_bytes(direction: str, n: int) -> None:
    if (m := _get()) is not None:
        m.peer_bytes.labels(direction).inc(n)


def record_eviction(freed_bytes: int) -> None:
    if (m := _get()) is not None:
        m.evictions.inc()
        m.evicted_bytes.inc(freed_bytes)


def observe_conversion(seconds: float) -> None:
    """For the conversion engine: one finished conversion (convert + validate + commit) took `seconds`."""
    if (m := _get()) is not None:
        m.conversion_seconds.observe(seconds)


# -- exposing --------------------------------------------------------------------------------------------------
def render() -> bytes:
    """The Prometheus text exposition of everything above."""
    from prometheus_client import generate_latest

    return generate_latest(registry())


@dataclasses.dataclass
class MetricsServer:
    port: int
    addr: str
    _httpd: object
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.addr in ("0.0.0.0", "") else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start_http_server(port: int = 0, addr: str = "0.0.0.0", cache_dir: Path | str | None = None) -> MetricsServer:
    """Serve /metrics on addr:port from a daemon thread (port 0: pick a free one; see .port). For the node
    agent; on a cluster Prometheus scrapes each node, so the default listens on every interface."""
    from prometheus_client import start_http_server as _start

    enable(cache_dir)
    httpd, thread = _start(port, addr=addr, registry=registry())
    return MetricsServer(httpd.server_port, addr, httpd, thread)
