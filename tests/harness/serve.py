"""Ray Serve on a free loopback port, for the benchmarks (the tests start Serve their own way, per module)."""
from __future__ import annotations

from .ports import free_port

MiB = 1 << 20
# The benchmark links (DESIGN.md, Benchmark conditions): loopback as is, and a far registry (a proxy adding
# 20 ms per request and capping each connection at 64 MiB/s): {name: (latency seconds, bytes/s per connection)}.
LINKS = {"loopback": (0.0, None), "far": (0.020, 64 * MiB)}


def start_serve(attempts: int = 3) -> str:
    """serve.start on a free 127.0.0.1 port (another pick if it was taken meanwhile); returns the base URL."""
    from ray import serve

    for attempt in range(attempts):
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            return f"http://127.0.0.1:{port}"
        except Exception:
            serve.shutdown()
            if attempt == attempts - 1:
                raise
    raise RuntimeError("unreachable")


def stop_bench(server, s3, work) -> None:
    """A benchmark's teardown: Serve and Ray if this process started them, the registry and S3 servers, its dir."""
    import shutil

    import ray

    if ray.is_initialized():
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    if server is not None:
        server.stop()
    s3.stop()
    shutil.rmtree(work, ignore_errors=True)
