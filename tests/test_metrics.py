"""Metrics (issue F, item 6): a real HTTP GET on the node's /metrics shows the counters move after a miss,
a hit, an eviction and a conversion, and the store gauges describe the disk (including a download in flight)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request

import prefetch
from prefetch import metrics
from prefetch.store import lifecycle
from prefetch.store import Store
from tests import harness
from tests.helpers import PREFETCH, REPO, cli_json

MiB = 1 << 20


def scrape(url: str) -> dict[str, float]:
    """{sample name with labels: value} from a real GET of the exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def make_model(root, name: str, size: int):
    d = root / "origin" / name
    d.mkdir(parents=True)
    (d / "weights.bin").write_bytes(os.urandom(size))
    return d


def test_endpoint_shows_counters_moving(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("PREFETCH_MAX_BYTES", str(5 * MiB))
    server = metrics.start_http_server(0, addr="127.0.0.1")
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
        m0 = scrape(server.url)
        assert m0["prefetch_bytes_on_disk"] == 0 and m0["prefetch_max_bytes"] == 5 * MiB

        seen_inflight = []

        def during(done: int, total: int) -> None:   # scrape while the download is in progress
            if not seen_inflight:
                seen_inflight.append(scrape(server.url)["prefetch_inflight_downloads"])

        a = make_model(tmp_path, "a", 3 * MiB)
        miss = prefetch.warm(str(a), progress=during)
        m1 = scrape(server.url)
        assert not miss.from_cache and seen_inflight == [1.0]
        assert delta(m1, m0, "prefetch_cache_misses_total") == 1
        assert delta(m1, m0, "prefetch_cache_hits_total") == 0
        assert delta(m1, m0, "prefetch_origin_bytes_total") == 3 * MiB == miss.origin_bytes
        assert delta(m1, m0, "prefetch_download_seconds_count") == 1
        assert delta(m1, m0, "prefetch_download_seconds_sum") > 0
        assert m1["prefetch_inflight_downloads"] == 0 and m1["prefetch_objects"] == 1
        assert m1["prefetch_bytes_on_disk"] == lifecycle.usage(Store(cache_dir)).total > 3 * MiB

        hit = prefetch.warm(str(a))
        m2 = scrape(server.url)
        assert hit.from_cache
        assert delta(m2, m1, "prefetch_cache_hits_total") == 1
        assert delta(m2, m1, "prefetch_cache_misses_total") == 0
        assert delta(m2, m1, "prefetch_origin_bytes_total") == 0
        assert delta(m2, m1, "prefetch_evictions_total") == 0

        b = make_model(tmp_path, "b", 3 * MiB)       # 3 + 3 MiB > 5 MiB cap: A is evicted
        prefetch.warm(str(b))
        m3 = scrape(server.url)
        assert delta(m3, m2, "prefetch_evictions_total") == 1
        assert 3 * MiB < delta(m3, m2, "prefetch_evicted_bytes_total") < 4 * MiB
        assert delta(m3, m2, "prefetch_cache_misses_total") == 1
        assert m3["prefetch_objects"] == 1 and m3["prefetch_bytes_on_disk"] < 4 * MiB

    finally:
        server.close()


def test_a_real_conversion_moves_the_conversion_histogram(tmp_path, cache_dir):
    """A real sklearn -> ONNX conversion (not a direct call of the recorder) is counted once, with its time;
    the second warm of the same format converts nothing and counts nothing."""
    import mlflow
    import numpy as np
    from sklearn.linear_model import LinearRegression

    X = np.random.default_rng(0).normal(size=(50, 4))
    model_dir = tmp_path / "origin" / "linear"
    model_dir.parent.mkdir(parents=True)
    mlflow.sklearn.save_model(LinearRegression().fit(X, X @ np.arange(4.0)), str(model_dir), input_example=X[:5])
    server = metrics.start_http_server(0, addr="127.0.0.1")
    try:
        m0 = scrape(server.url)
        prefetch.warm(str(model_dir), format="onnx")
        m1 = scrape(server.url)
        assert delta(m1, m0, "prefetch_conversion_seconds_count") == 1
        assert delta(m1, m0, "prefetch_conversion_seconds_sum") > 0
        assert delta(m1, m0, "prefetch_conversion_seconds_bucket{le=+Inf}") == 1
        prefetch.warm(str(model_dir), format="onnx")
        assert delta(scrape(server.url), m1, "prefetch_conversion_seconds_count") == 0
    finally:
        server.close()


def test_cli_metrics_once_and_served(tmp_path, cache_dir):
    a = make_model(tmp_path, "a", 1 * MiB)
    cli_json("warm", str(a))
    lifecycle.pin(Store(cache_dir), "some--0123456789abcdef")
    doc = cli_json("metrics")
    gauges = {m["name"]: m["value"] for m in doc["metrics"] if not m["labels"]}
    assert gauges["prefetch_objects"] == 1 and gauges["prefetch_pinned_objects"] == 1
    assert gauges["prefetch_bytes_on_disk"] >= 1 * MiB

    port = harness.free_port()
    proc = subprocess.Popen([*PREFETCH, "metrics", "--port", str(port), "--addr", "127.0.0.1", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ))
    try:
        started = json.loads(proc.stdout.readline())
        assert started["port"] == port
        served = scrape(started["url"])
        assert served["prefetch_objects"] == 1 and served["prefetch_cache_hits_total"] == 0
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
