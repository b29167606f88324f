"""The harness itself: real S3 with enforced credentials, honest counters, a link emulator that
really delays and throttles, and MLflow set-ups that serve the seed model from where they should."""
from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests import harness
from tests.harness.proxy import LinkProxy, _RequestParser

MiB = 1024 * 1024


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# --- a tiny local HTTP origin for the proxy tests -----------------------------------------------
class _BlobHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    blob = b""

    def do_GET(self):
        n = int(self.path.rsplit("/", 1)[-1]) if self.path.startswith("/bytes/") else len(self.blob)
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        view = memoryview(self.blob)
        left = n
        while left:
            k = min(left, len(view))
            self.wfile.write(view[:k])
            left -= k

    def do_PUT(self):
        n = int(self.headers.get("Content-Length", 0))
        self.rfile.read(n)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def origin():
    _BlobHandler.blob = os.urandom(MiB)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BlobHandler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _http_get(port: int, path: str, conn: socket.socket | None = None) -> bytes:
    """A minimal keep-alive GET; returns the body."""
    own = conn is None
    s = conn or socket.create_connection(("127.0.0.1", port))
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        head, body = buf.split(b"\r\n\r\n", 1)
        length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
        chunks = [body]
        got = len(body)
        while got < length:
            c = s.recv(MiB)
            if not c:
                break
            chunks.append(c)
            got += len(c)
        return b"".join(chunks)
    finally:
        if own:
            s.close()


# --- ports, processes ------------------------------------------------------------------------------
def test_free_port_is_bindable():
    p = harness.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", p))
    ports = harness.free_ports(16)
    assert len(set(ports)) == 16


def test_managed_process_kills_whole_group(tmp_path):
    p = harness.ManagedProcess(["sh", "-c", "sleep 300 & echo $! > child.pid; wait"], tmp_path / "log", cwd=tmp_path)
    p.start()
    deadline = time.monotonic() + 10
    pid_file = tmp_path / "child.pid"
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert _pid_alive(child)
    p.stop(timeout=5)
    time.sleep(0.2)
    assert not p.alive()
    assert not _pid_alive(child), "grandchild survived stop()"


def test_no_orphan_when_parent_is_sigkilled(tmp_path):
    """PDEATHSIG: a server started by a process that dies hard dies with it."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from tests.harness.procs import ManagedProcess
        p = ManagedProcess(["sleep", "300"], {str(tmp_path / 'log')!r}).start()
        print(p.pid, flush=True)
        time.sleep(300)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _pid_alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _pid_alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = _pid_alive(child)
        if alive:
            os.kill(child, signal.SIGKILL)
        assert not alive, "child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()


# --- request framing ---------------------------------------------------------------------------------
def test_parser_counts_requests_not_body_bytes():
    seen = []
    p = _RequestParser(lambda m, t, h: seen.append((m, t)))
    fake = b"GET /inside-body HTTP/1.1\r\nHost: x\r\n\r\n"
    put = b"PUT /obj HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(fake) + fake
    chunked_body = b"5\r\nhello\r\n" + b"%x\r\n" % len(fake) + fake + b"\r\n0\r\n\r\n"
    chunked = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked_body
    get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    stream = get + put + chunked + b"HEAD /h HTTP/1.1\r\n\r\n" + get
    # Feed in awkward pieces so that every state sees a split.
    starts_total = 0
    for i in range(0, len(stream), 7):
        starts_total += len(p.feed(stream[i : i + 7]))
    assert seen == [(b"GET", b"/a"), (b"PUT", b"/obj"), (b"POST", b"/c"), (b"HEAD", b"/h"), (b"GET", b"/a")]
    assert starts_total == 5
    assert not p.opaque


def test_parser_gives_up_on_non_http():
    p = _RequestParser(lambda *a: None)
    p.feed(b"\x16\x03\x01 not http at all\r\n\r\n")
    assert p.opaque


# --- LinkProxy ------------------------------------------------------------------------------------
def test_proxy_counts_and_passes_64_concurrent_connections(origin):
    with LinkProxy("127.0.0.1", origin) as proxy:
        with ThreadPoolExecutor(64) as ex:
            bodies = list(ex.map(lambda _: _http_get(proxy.port, "/blob"), range(64)))
        assert all(b == _BlobHandler.blob for b in bodies)
        st = proxy.stats()
        assert st["get_requests"] == 64 and st["requests"] == 64
        assert st["connections"] == 64
        assert st["bytes_out"] >= 64 * MiB
        proxy.reset()
        assert proxy.stats()["requests"] == 0 and proxy.stats()["bytes_out"] == 0


def test_proxy_keepalive_requests_counted_separately(origin):
    with LinkProxy("127.0.0.1", origin) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            for _ in range(3):
                assert len(_http_get(proxy.port, "/bytes/1000", conn=s)) == 1000
        st = proxy.stats()
        assert st["get_requests"] == 3 and st["connections"] == 1
        assert [r[1] for r in proxy.request_log()] == ["/bytes/1000"] * 3


def test_proxy_latency_delays_each_request(origin):
    # A lower bound only: it proves the emulator delays each keep-alive request, not a speed.
    with LinkProxy("127.0.0.1", origin, latency_s=0.05) as slow:
        with socket.create_connection(("127.0.0.1", slow.port)) as s:
            t0 = time.monotonic()
            for _ in range(3):
                _http_get(slow.port, "/bytes/10", conn=s)
            assert time.monotonic() - t0 >= 3 * 0.05
        assert slow.stats()["get_requests"] == 3


def test_proxy_rate_cap(origin):
    with LinkProxy("127.0.0.1", origin, rate_bytes_per_s=4 * MiB) as proxy:
        t0 = time.monotonic()
        body = _http_get(proxy.port, f"/bytes/{8 * MiB}")
        elapsed = time.monotonic() - t0
    assert len(body) == 8 * MiB
    assert elapsed >= 1.5, f"8 MiB at 4 MiB/s took only {elapsed:.2f}s"


# --- S3 ---------------------------------------------------------------------------------------------
def _settled_server_stats(s3, ready, timeout: float = 5.0) -> dict:
    """weed may bump its counters just after the client has the response: give it a moment."""
    deadline = time.monotonic() + timeout
    st = s3.server_stats()
    while not ready(st) and time.monotonic() < deadline:
        time.sleep(0.05)
        st = s3.server_stats()
    return st


def test_s3_put_get_counted_at_proxy_and_server(s3):
    c = s3.client()
    data = os.urandom(3 * MiB + 17)
    s3.reset_stats()
    c.put_object(Bucket=s3.bucket, Key="harness/blob.bin", Body=data)
    st = s3.stats()
    assert st["put_requests"] == 1 and st["get_requests"] == 0
    assert st["bytes_in"] >= len(data)

    s3.reset_stats()
    assert c.get_object(Bucket=s3.bucket, Key="harness/blob.bin")["Body"].read() == data
    st = s3.stats()
    assert st["get_requests"] == 1, st
    assert st["requests"] == 1, st
    assert len(data) <= st["bytes_out"] < len(data) + 4096
    srv = _settled_server_stats(s3, lambda st: st["get_requests"] >= 1 and st["bytes_out"] >= len(data))
    assert srv["get_requests"] == 1 and srv["bytes_out"] == len(data), srv

    # A ranged GET is one more GET, and only the range goes out.
    s3.reset_stats()
    part = c.get_object(Bucket=s3.bucket, Key="harness/blob.bin", Range="bytes=0-999")["Body"].read()
    assert part == data[:1000]
    st = s3.stats()
    assert st["get_requests"] == 1 and 1000 <= st["bytes_out"] < 1000 + 4096
    assert s3.proxy.request_log()[-1][2] == "bytes=0-999"


def test_s3_direct_endpoint_bypasses_proxy(s3):
    s3.reset_stats()
    c = s3.client(endpoint=s3.direct_endpoint)
    c.put_object(Bucket=s3.bucket, Key="harness/direct.bin", Body=b"abc")
    assert c.get_object(Bucket=s3.bucket, Key="harness/direct.bin")["Body"].read() == b"abc"
    assert s3.stats()["requests"] == 0
    assert _settled_server_stats(s3, lambda st: st["get_requests"] >= 1)["get_requests"] == 1


def test_s3_wrong_credentials_rejected(s3):
    from botocore.exceptions import ClientError

    s3.client().put_object(Bucket=s3.bucket, Key="harness/secret.bin", Body=b"secret")
    for kwargs, code in [
        ({"access_key": "not-the-key"}, "InvalidAccessKeyId"),
        ({"secret_key": "not-the-secret"}, "SignatureDoesNotMatch"),
    ]:
        with pytest.raises(ClientError) as ei:
            s3.client(**kwargs).get_object(Bucket=s3.bucket, Key="harness/secret.bin")
        assert ei.value.response["Error"]["Code"] == code
    # Anonymous (unsigned) requests are refused too.
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(f"{s3.endpoint}/{s3.bucket}/harness/secret.bin", timeout=10)
    assert ei.value.code == 403


def test_s3_env_and_create_bucket(s3):
    env = s3.env()
    assert env["AWS_ACCESS_KEY_ID"] == "prefetch-test" and env["AWS_SECRET_ACCESS_KEY"] == "prefetch-secret"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL_S3"] == s3.endpoint
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    s3.create_bucket("harness-extra")
    s3.create_bucket("harness-extra")  # idempotent
    names = {b["Name"] for b in s3.client().list_buckets()["Buckets"]}
    assert {"models", "harness-extra"} <= names


def test_isolated_env_is_clean(cache_dir):
    assert os.environ["PREFETCH_CACHE_DIR"] == str(cache_dir)
    assert cache_dir.is_dir() and not any(cache_dir.iterdir())
    assert not [k for k in os.environ if k.startswith("AWS_")]
    assert "MLFLOW_TRACKING_URI" not in os.environ


# --- MLflow set-ups ------------------------------------------------------------------------------
SETUPS = {
    "direct": ("mlflow_direct", "seed_direct", "s3://"),
    "proxied": ("mlflow_proxied", "seed_proxied", "mlflow-artifacts:"),
    "embedded": ("embedded", "seed_embedded", "file://"),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_seed_model_served_by_each_setup(setup, request, use_env, s3):
    import mlflow
    from mlflow import MlflowClient

    reg_fixture, seed_fixture, scheme = SETUPS[setup]
    reg = request.getfixturevalue(reg_fixture)
    seed = request.getfixturevalue(seed_fixture)
    name = harness.SEED_MODEL_NAME
    assert [v["version"] for v in seed["versions"]] == [1, 2]
    for v in seed["versions"]:
        assert v["model_id"].startswith("m-") and v["model_uri"] == f"models:/{v['model_id']}"
        assert v["artifact_location"].startswith(scheme), v

    use_env(reg.env())
    if setup == "proxied":
        assert not [k for k in os.environ if k.startswith("AWS_")]
        assert "MLFLOW_S3_ENDPOINT_URL" not in os.environ
    assert mlflow.get_tracking_uri() == reg.tracking_uri

    client = MlflowClient()
    mv1 = client.get_model_version(name, "1")
    assert mv1.current_stage == "Production"
    assert set(mv1.aliases) == {"stable"}
    # str(): the sqlite store returns int versions, the REST store strings.
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"

    s3.reset_stats()
    m1 = mlflow.pyfunc.load_model(f"models:/{name}/1")
    np.testing.assert_allclose(m1.predict(seed["X_test"]), seed["expected"][1])
    m2 = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    np.testing.assert_allclose(m2.predict(seed["X_test"]), seed["expected"][2])
    assert not np.allclose(seed["expected"][1], seed["expected"][2])
    m_prod = mlflow.pyfunc.load_model(f"models:/{name}/Production")
    np.testing.assert_allclose(m_prod.predict(seed["X_test"]), seed["expected"][1])

    st = s3.stats()
    if setup == "embedded":
        assert st["requests"] == 0  # nothing of it lives in S3
    else:
        # direct: this process read S3; proxied: the server did. Both go through the proxy.
        assert st["get_requests"] >= 3 and st["bytes_out"] > 100_000, st


def test_direct_mode_client_needs_s3_credentials(mlflow_direct, seed_direct, use_env, tmp_path):
    """Direct mode really reads S3 from the client: with a wrong secret the download fails."""
    import mlflow

    env = dict(mlflow_direct.env())
    env["AWS_SECRET_ACCESS_KEY"] = "wrong"
    use_env(env)
    # Also proves use_env() really switches credentials: MLflow's cached boto3 client and boto3's
    # default session would otherwise keep the right ones from an earlier test.
    with pytest.raises(Exception, match="(?i)signature"):
        mlflow.artifacts.download_artifacts(
            f"models:/{harness.SEED_MODEL_NAME}/1", dst_path=str(tmp_path / "dl")
        )


def test_register_large_model_loads(mlflow_direct, use_env, s3, tmp_path):
    import mlflow

    rec = harness.register_large_model(
        mlflow_direct.env(), "harness-large", large_files=[("a.bin", 3 * MiB), ("b.bin", MiB + 5)],
        n_small=20, small_size=1000,
    )
    assert rec["total_bytes"] == 4 * MiB + 5 + 20 * 1000
    assert rec["artifact_location"].startswith("s3://")
    use_env(mlflow_direct.env())
    s3.reset_stats()
    local = mlflow.artifacts.download_artifacts(f"models:/harness-large/{rec['version']}", dst_path=str(tmp_path / "dl"))
    st = s3.stats()
    assert st["bytes_out"] >= rec["total_bytes"]
    for rel, size in rec["files"].items():
        assert os.path.getsize(os.path.join(local, rel)) == size, rel
    model = mlflow.pyfunc.load_model(local)
    assert list(model.predict(__import__("pandas").DataFrame({"x": [1.0, 2.0]}))) == [rec["total_bytes"]] * 2


def test_seaweed_stop_leaves_nothing(tmp_path):
    s = harness.SeaweedS3(workdir=tmp_path / "sw", counting_proxy=True).start()
    pid, port = s.process.pid, s.s3_port
    assert _pid_alive(pid)
    s.stop()
    assert not _pid_alive(pid)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
