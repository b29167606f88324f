"""Issue I: the native transport (obstore) against the real SeaweedFS and MLflow servers of the harness.

Ranges give the exact bytes uploaded, If-Match with a stale ETag is the distinct OriginChanged error, refused
credentials and missing keys exit as with boto3 (4, 3), 503 bursts and resets are retried, the endpoint is the one
MLflow users set, TLS to a private CA (AWS_CA_BUNDLE, MLFLOW_S3_IGNORE_TLS) and proxies (HTTP(S)_PROXY, NO_PROXY)
work as with boto3, so do a role's expiring credentials from boto3's chain, and a whole `prefetch warm` gives the
same manifest as PREFETCH_TRANSPORT=boto3 (S3, and the proxied `mlflow-artifacts:/` mode, whose server ignores
Range: each file is then sent once, not once per range). Speed is scripts/bench_fetch.py's business, not these
tests'.
"""
from __future__ import annotations

import datetime
import hashlib
import http.server
import io
import json
import os
import re
import threading
from pathlib import Path

import pytest

import prefetch
from prefetch.config import Settings
from prefetch.errors import NotFound, OriginChanged
from prefetch.sources import open_source
from prefetch.sources import s3_native
from prefetch.sources.mlflow_proxy import MlflowProxySource
from prefetch.sources.s3 import S3Source
from prefetch.sources.s3_native import NativeS3Source
from prefetch.store import Store
from tests import harness
from tests.helpers import assert_clean_error, cli_json, objects_in, run_cli, sha256_per_chunk

MiB = 1 << 20


@pytest.fixture
def fresh_pool(monkeypatch):
    """A new obstore client (and connection pool) for this test: faults are injected on new connections."""
    monkeypatch.setattr(s3_native, "_stores", {})


@pytest.fixture
def blob(s3, tmp_path):
    """A 5 MiB + 3 bytes random object (and a small one) under s3://models/transport/, and its bytes."""
    path = tmp_path / "w.bin"
    harness.write_random_file(path, 5 * MiB + 3, seed=11)
    s3.client().upload_file(str(path), "models", "transport/w.bin")
    s3.client().put_object(Bucket="models", Key="transport/sub/conf.json", Body=b'{"a": 1}')
    return path.read_bytes()


def test_ranges_are_the_exact_bytes_uploaded(s3, use_env, blob, tmp_path):
    use_env(s3.env())
    src = open_source("s3://models/transport", Settings.load(transport="native"))
    assert isinstance(src, NativeS3Source)
    listed = src.list()
    # The same listing (paths, sizes, ETags) as the boto3 transport.
    assert listed == S3Source("s3://models/transport", Settings.load(transport="boto3")).list()
    assert [(f.path, f.size) for f in listed] == [("sub/conf.json", 8), ("w.bin", len(blob))]
    for start, end in [(0, len(blob)), (0, 1), (1, 4 * MiB + 7), (len(blob) - 1, len(blob)), (MiB, 2 * MiB)]:
        got = src.read_range("w.bin", start, end)
        assert bytes(memoryview(got)) == blob[start:end], (start, end)
        assert b"".join(bytes(b) for b in src.read("w.bin", start, end)) == blob[start:end], (start, end)
    assert b"".join(bytes(b) for b in src.read("w.bin", 3 * MiB)) == blob[3 * MiB:]     # open-ended
    assert b"".join(bytes(b) for b in src.read("sub/conf.json")) == b'{"a": 1}'
    # The engine pwrites the client's buffer as it is (buffer protocol, no bytes() copy).
    target = tmp_path / "pwrite.bin"
    fd = os.open(target, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        assert os.pwrite(fd, src.read_range("w.bin", 0, 2 * MiB), 0) == 2 * MiB
    finally:
        os.close(fd)
    assert target.read_bytes() == blob[: 2 * MiB]


def test_if_match_with_a_stale_etag_is_origin_changed(s3, use_env, blob):
    use_env(s3.env())
    src = NativeS3Source("s3://models/transport", Settings.load(transport="native"))
    etag = {f.path: f.etag for f in src.list()}["w.bin"]
    assert bytes(src.read_range("w.bin", 0, 10, if_match=etag)) == blob[:10]    # the current ETag passes
    with pytest.raises(OriginChanged) as stale:
        src.read_range("w.bin", 0, 10, if_match="0" * 32)
    assert stale.value.exit_code == 4 and "changed" in str(stale.value)
    # A change after the listing: every read is pinned to the listed ETag, so the new bytes are never mixed in.
    s3.client().put_object(Bucket="models", Key="transport/w.bin", Body=b"other bytes")
    with pytest.raises(OriginChanged):
        list(src.read("w.bin", 0, 10))
    with pytest.raises(OriginChanged):
        src.read_range("w.bin", 0, 10)
    assert bytes(NativeS3Source("s3://models/transport", Settings()).read_range("w.bin", 0, 11, if_match="")) \
        == b"other bytes"


def test_refused_credentials_and_missing_keys_exit_as_with_boto3(s3, use_env, blob):
    use_env(s3.env())
    uri = "s3://models/transport"
    for transport in ("native", "boto3"):
        env = {"PREFETCH_TRANSPORT": transport}
        wrong = run_cli("warm", uri, env={**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret"})
        assert_clean_error(wrong, 4, uri, "refused the credentials", "SignatureDoesNotMatch")
        assert_clean_error(run_cli("warm", uri, env={**env, "AWS_ACCESS_KEY_ID": "nobody"}), 4, uri,
                           "InvalidAccessKeyId")
        assert_clean_error(run_cli("warm", "s3://models/transport/no/such/key", env=env), 3,
                           "s3://models/transport/no/such/key", "no such S3 object")
        assert_clean_error(run_cli("warm", "s3://no-such-bucket-x/m", env=env), 3, "bucket does not exist")
        assert_clean_error(run_cli("warm", uri, env={**env, "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9"}), 4,
                           uri, "cannot reach S3")
    assert_clean_error(run_cli("warm", uri, env={"PREFETCH_TRANSPORT": "carrier-pigeon"}), 2, "PREFETCH_TRANSPORT")
    # A missing key read through the library: NotFound (not retried).
    src = NativeS3Source(uri, Settings.load(transport="native"))
    with pytest.raises(NotFound):
        src.read_range("no-such.bin", 0, 10)


@pytest.mark.parametrize("transport", ["native", "boto3"])
def test_503_bursts_and_resets_are_retried(transport, s3, use_env, cache_dir, blob, fresh_pool):
    flaky = harness.LinkProxy("127.0.0.1", s3.s3_port).start()
    try:
        use_env({**s3.env(flaky.url), "PREFETCH_TRANSPORT": transport, "PREFETCH_MAX_CONCURRENCY": "2",
                 "PREFETCH_CHUNK_BYTES": str(MiB), "PREFETCH_MULTIPART_THRESHOLD": str(2 * MiB)})
        flaky.inject_faults(answer_503=4, cut=2, cut_after_bytes=256 << 10, match=b"w.bin")
        w = prefetch.warm("s3://models/transport")
        stats = flaky.stats()
        # The way without the engine's retries: one attempt per range fails, exit 4 (a burst longer than what the
        # clients' own quick retry, one per request, could absorb over the file's ranges however they interleave).
        flaky.inject_faults(answer_503=40, match=b"w.bin")
        proc = run_cli("warm", "s3://models/transport", env={"PREFETCH_MAX_ATTEMPTS": "1",
                                                            "PREFETCH_CACHE_DIR": str(cache_dir / "no-retry")})
    finally:
        flaky.stop()
    assert (w.path / "w.bin").read_bytes() == blob
    assert Store(cache_dir).verify(w.key) == []
    assert stats["faults_served"] == 6, stats
    assert_clean_error(proc, 4, "s3://models/transport", "giving up")


def _upload_multipart(s3, key: str) -> bytes:
    """10 MiB + 1 random bytes uploaded by boto3 in 5 MiB parts (so with its default COMPOSITE CRC32); the bytes."""
    import boto3.s3.transfer

    data = os.urandom(10 * MiB + 1)
    s3.client(endpoint=s3.direct_endpoint).upload_fileobj(
        io.BytesIO(data), "models", key,
        Config=boto3.s3.transfer.TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
    return data


@pytest.mark.parametrize("transport", ["native", "boto3"])
def test_endpoint_and_credentials_as_mlflow_users_set_them(transport, s3, use_env, cache_dir, blob, fresh_pool,
                                                           tmp_path):
    counting = harness.LinkProxy("127.0.0.1", s3.s3_port).start()
    try:
        # MLFLOW_S3_ENDPOINT_URL wins over AWS_ENDPOINT_URL* (as in the boto3 transport and MLflow itself), and
        # the credentials come from a profile through boto3's chain (no AWS_ACCESS_KEY_ID in the environment).
        creds = tmp_path / "aws-credentials"
        creds.write_text(f"[bench]\naws_access_key_id = {s3.access_key}\naws_secret_access_key = {s3.secret_key}\n")
        use_env({"MLFLOW_S3_ENDPOINT_URL": counting.url, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
                 "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_PROFILE": "bench",
                 "AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_DEFAULT_REGION": s3.region,
                 "PREFETCH_TRANSPORT": transport})
        w = prefetch.warm("s3://models/transport")
        through = counting.stats()
        # A multipart object: its HEAD (the stored checksum) goes the same way, signed with the profile's keys.
        big = _upload_multipart(s3, "creds/big.bin")
        counting.reset()
        big_warm = prefetch.warm("s3://models/creds")
        big_through = counting.stats()
    finally:
        counting.stop()
    assert (w.path / "w.bin").read_bytes() == blob
    assert through["get_requests"] >= 3, through      # the listing and both files went to MLFLOW_S3_ENDPOINT_URL
    assert (big_warm.path / "big.bin").read_bytes() == big
    assert big_through["head_requests"] == 1, big_through
    assert [f.origin_check for f in Store(cache_dir).lookup(big_warm.key).files] == ["crc32"]


@pytest.fixture
def no_proxy_set(monkeypatch):
    """No proxy variable from the outer environment: each test sets the ones it means."""
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                "no_proxy"):
        monkeypatch.delenv(var, raising=False)


def _warmed_path(doc: dict) -> Path:
    """Where `prefetch warm --json` (one URI) put the files."""
    return Path(doc["results"][0]["path"])


@pytest.fixture
def private_ca_s3(s3, tmp_path):
    """SeaweedFS behind HTTPS, its certificate signed by a CA made for this test (as a self-hosted store behind a
    company CA), and a counting proxy between the TLS front and the server, where the requests are in clear."""
    pki = harness.make_private_ca(tmp_path / "pki")
    counting = harness.LinkProxy("127.0.0.1", s3.s3_port).start()
    front = harness.TlsFront("127.0.0.1", counting.port, pki["cert"], pki["key"]).start()
    yield front, counting, pki
    front.stop()
    counting.stop()


@pytest.mark.parametrize("transport", ["native", "boto3"])
def test_an_https_endpoint_behind_a_private_ca(transport, s3, private_ca_s3, use_env, cache_dir, fresh_pool,
                                               tmp_path, no_proxy_set):
    front, counting, pki = private_ca_s3
    data = _upload_multipart(s3, "tls/big.bin")    # multipart: its stored checksum is read by a signed HEAD
    uri = "s3://models/tls"
    use_env({**s3.env(front.url), "PREFETCH_TRANSPORT": transport})   # (use_env drops any AWS_CA_BUNDLE)

    # The system's CAs only: refused before any request reaches the server, one line naming both settings.
    refused = run_cli("warm", uri)
    assert_clean_error(refused, 4, uri, "certificate is not trusted", "AWS_CA_BUNDLE", "MLFLOW_S3_IGNORE_TLS")
    assert front.stats()["handshakes"] == 0 and counting.stats()["requests"] == 0, (front.stats(), counting.stats())
    assert objects_in(cache_dir) == [] and not list((cache_dir / "staging").glob("*"))

    # The private CA through AWS_CA_BUNDLE: the listing, the HEAD and the GETs over verified TLS.
    trusted = cli_json("warm", uri, env={"AWS_CA_BUNDLE": str(pki["ca"])})
    seen = counting.stats()
    assert seen["head_requests"] == 1 and seen["get_requests"] >= 2, seen
    assert front.stats()["handshakes"] >= 1
    assert (_warmed_path(trusted) / "big.bin").read_bytes() == data

    # MLFLOW_S3_IGNORE_TLS=true: no verification (MLflow's switch), the same bytes into another cache.
    unverified = cli_json("warm", uri, env={"MLFLOW_S3_IGNORE_TLS": "true",
                                            "PREFETCH_CACHE_DIR": str(tmp_path / "unverified")})
    assert (_warmed_path(unverified) / "big.bin").read_bytes() == data

    # Through a proxy (HTTPS_PROXY): a CONNECT tunnel per connection, TLS verified end to end inside it.
    forward = harness.ForwardProxy().start()
    counting.reset()
    try:
        tunnelled = cli_json("warm", uri, env={
            "AWS_CA_BUNDLE": str(pki["ca"]), "HTTPS_PROXY": forward.url, "NO_PROXY": "",
            "PREFETCH_CACHE_DIR": str(tmp_path / "tunnelled")})
        via_proxy = forward.stats()
    finally:
        forward.stop()
    assert set(via_proxy["first_lines"]) == {("CONNECT", f"127.0.0.1:{front.port}")}, via_proxy
    assert via_proxy["connections"] == counting.stats()["connections"] >= 1   # (none went around the proxy)
    assert (_warmed_path(tunnelled) / "big.bin").read_bytes() == data

    # A bad AWS_CA_BUNDLE is a setting to fix: exit 2 naming it, before any connection.
    counting.reset()
    for bad, says in ((tmp_path / "no-such.pem", "No such file"), (pki["key"], "no PEM certificate")):
        proc = run_cli("warm", uri, env={"AWS_CA_BUNDLE": str(bad), "PREFETCH_CACHE_DIR": str(tmp_path / "bad")})
        assert_clean_error(proc, 2, "AWS_CA_BUNDLE", str(bad), says)
    assert counting.stats()["requests"] == 0
    assert not (tmp_path / "bad" / "objects").exists() or objects_in(tmp_path / "bad") == []


@pytest.mark.parametrize("transport", ["native", "boto3"])
def test_a_proxy_named_in_the_environment(transport, s3, use_env, cache_dir, fresh_pool, tmp_path, no_proxy_set,
                                          monkeypatch):
    counting = harness.LinkProxy("127.0.0.1", s3.s3_port).start()    # the endpoint: it counts what reaches it
    forward = harness.ForwardProxy().start()
    try:
        data = _upload_multipart(s3, "proxied/big.bin")   # multipart: its stored checksum is read by a HEAD
        uri = "s3://models/proxied"
        use_env({**s3.env(counting.url), "PREFETCH_TRANSPORT": transport})
        monkeypatch.setenv("HTTP_PROXY", forward.url)
        proxied = cli_json("warm", uri)
        via_proxy, at_endpoint = forward.stats(), counting.stats()

        # NO_PROXY naming the endpoint's host: straight to it, the proxy sees nothing.
        counting.reset()
        direct = cli_json("warm", uri, env={"NO_PROXY": "127.0.0.1", "PREFETCH_CACHE_DIR": str(tmp_path / "direct")})
        after_direct, direct_at_endpoint = forward.stats(), counting.stats()

        # A proxy that is not there: one line naming it, exit 4 (not a traceback, not the endpoint's fault).
        dead = f"http://127.0.0.1:{harness.free_port()}"
        unreachable = run_cli("warm", uri, env={"HTTP_PROXY": dead, "PREFETCH_CACHE_DIR": str(tmp_path / "dead")})
    finally:
        forward.stop()
        counting.stop()
    # Every connection that reached the endpoint came through the proxy: the listing, the GETs and the HEAD of
    # the origin check (the native transport signs that one itself, on its own connection).
    assert via_proxy["connections"] >= 1 and via_proxy["connections"] == at_endpoint["connections"], \
        (via_proxy, at_endpoint)
    assert at_endpoint["head_requests"] == 1 and at_endpoint["get_requests"] >= 2, at_endpoint
    assert {hostport for _, hostport in via_proxy["first_lines"]} == {f"127.0.0.1:{counting.port}"}
    if transport == "native":   # (boto3 may send its HEAD on a connection a GET opened)
        assert ("HEAD", f"127.0.0.1:{counting.port}") in via_proxy["first_lines"], via_proxy
    for warm in (proxied, direct):
        assert (_warmed_path(warm) / "big.bin").read_bytes() == data
    assert after_direct["connections"] == via_proxy["connections"] and direct_at_endpoint["connections"] >= 1
    assert_clean_error(unreachable, 4, uri, "cannot reach S3", f"through the proxy {dead}")
    assert not (tmp_path / "dead" / "objects").exists() or objects_in(tmp_path / "dead") == []


@pytest.mark.parametrize("transport", ["native", "boto3"])
def test_a_role_s_expiring_credentials_through_boto3_s_chain(transport, s3, use_env, cache_dir, fresh_pool,
                                                             tmp_path):
    """Instance, container and assumed roles reach boto3's chain as expiring credentials (RefreshableCredentials),
    which the native transport hands to obstore as a credential provider and signs its own HEADs with. The
    container role endpoint (what ECS and EKS Pod Identity serve) stands in for them: a real HTTP server on
    loopback answering what that endpoint answers (the instance metadata service is turned off)."""
    secret = {"value": s3.secret_key}
    asked = []

    class RoleEndpoint(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
            body = json.dumps({"AccessKeyId": s3.access_key, "SecretAccessKey": secret["value"],
                               # (no session token: SeaweedFS takes a token for an STS session it never made)
                               "Token": "", "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                               "RoleArn": "arn:aws:iam::000000000000:role/test"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    role = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RoleEndpoint)
    threading.Thread(target=role.serve_forever, daemon=True).start()
    try:
        data = _upload_multipart(s3, "role/big.bin")   # multipart: its stored checksum is read by a signed HEAD
        use_env({"MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "AWS_DEFAULT_REGION": s3.region,
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"http://127.0.0.1:{role.server_port}/role",
                 "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
                 "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "PREFETCH_TRANSPORT": transport})
        warmed = cli_json("warm", "s3://models/role")
        asked_for_the_warm = len(asked)
        secret["value"] = "not-the-secret"    # the role's next credentials are refused by the server
        refused = run_cli("warm", "s3://models/role", env={"PREFETCH_CACHE_DIR": str(tmp_path / "refused")})
    finally:
        role.shutdown()
    assert asked_for_the_warm >= 1 and set(asked) == {"/role"}
    assert (_warmed_path(warmed) / "big.bin").read_bytes() == data
    assert_clean_error(refused, 4, "s3://models/role", "refused the credentials")


def _manifest_hashes(cache, key: str) -> dict[str, tuple]:
    """{path: (size, whole-file sha256 or None, per-chunk sha256s)} as the manifest records them."""
    return {f.path: (f.size, f.sha256, tuple(f.chunks["sha256"])) for f in Store(cache).lookup(key).files}


def _expected_hashes(data: bytes, chunk: int = 8 * MiB) -> tuple:
    """What a manifest must record for these bytes, computed here with hashlib: the whole file's sha256 only for a
    file of one chunk (a bigger one is recorded by its chunks alone), and each chunk's."""
    chunks = tuple(sha256_per_chunk(data, chunk))
    return len(data), hashlib.sha256(data).hexdigest() if len(chunks) <= 1 else None, chunks


def _manifest_checks(cache, key: str) -> dict[str, tuple]:
    """What each file was checked against: the origin check, the ETag, and its per-chunk sha256s."""
    return {f.path: (f.origin_check, f.etag, f.chunks["sha256"]) for f in Store(cache).lookup(key).files}


def test_warm_native_gives_the_same_manifest_as_boto3(mlflow_direct, use_env, tmp_path, fresh_pool):
    """A model of 2 big + many small files, warmed through each transport into its own cache."""
    use_env(mlflow_direct.env())
    large = [("weights-0.bin", 40 * MiB + 5), ("weights-1.bin", 24 * MiB)]
    rec = harness.register_large_model(mlflow_direct.env(), "transport-model", large_files=large, n_small=150,
                                       small_size=4096, workdir=tmp_path)
    uri = f"models:/transport-model/{rec['version']}"
    out, checks = {}, {}
    for transport in ("boto3", "native"):
        settings = Settings.load(cache_dir=tmp_path / f"cache-{transport}", transport=transport)
        assert type(open_source(rec["artifact_location"], settings)).__name__ == \
            {"boto3": "S3Source", "native": "NativeS3Source"}[transport]
        w = prefetch.warm(uri, settings=settings)
        assert not w.from_cache
        out[transport] = _manifest_hashes(settings.cache_dir, w.key)
        checks[transport] = _manifest_checks(settings.cache_dir, w.key)
        assert Store(settings.cache_dir).verify(w.key) == []
    assert out["native"] == out["boto3"]
    # The same origin checks: the big files (multipart: "-N") by the COMPOSITE CRC32 that MLflow's boto3 upload
    # stored, over their parts; the small ones by the MD5 of their ETag (no HEAD).
    assert checks["native"] == checks["boto3"]
    assert {k: c[0] for k, c in checks["native"].items() if "weights" in k} == {
        "artifacts/weights-0.bin": "crc32", "artifacts/weights-1.bin": "crc32"}
    assert {c[0] for k, c in checks["native"].items() if "weights" not in k} == {"md5"}
    assert all(re.search(r"^[0-9a-f]{32}-\d+$", c[1]) for k, c in checks["native"].items() if "weights" in k)
    assert len(out["native"]) >= 150 + 2
    # And the hashes are the uploaded bytes' (independent of both transports): recompute the big files'.
    for name, size in large:
        path = tmp_path / "expected.bin"
        harness.write_random_file(path, size, seed=large.index((name, size)))
        want = _expected_hashes(path.read_bytes())
        assert len(want[2]) > 1 and [v for k, v in out["native"].items() if k.endswith(name)] == [want]


def test_proxied_mlflow_artifacts_are_sent_once(mlflow_proxied, use_env, tmp_path, monkeypatch):
    """`mlflow server` ignores Range on artifact GETs: the proxied source notices (one 1-byte probe) and reads each
    file whole, instead of having the server send a big file once per range. Same manifest for both transports."""
    rec = harness.register_large_model(mlflow_proxied.env(), "transport-proxied",
                                       large_files=[("weights.bin", 20 * MiB + 1)], n_small=20, small_size=2048,
                                       workdir=tmp_path)
    port = int(mlflow_proxied.tracking_uri.rsplit(":", 1)[1])
    link = harness.LinkProxy("127.0.0.1", port).start()
    try:
        use_env({**mlflow_proxied.env(), "MLFLOW_TRACKING_URI": link.url, "PREFETCH_CHUNK_BYTES": str(8 * MiB),
                 "PREFETCH_MULTIPART_THRESHOLD": str(16 * MiB)})
        uri = f"models:/transport-proxied/{rec['version']}"
        sent, out = {}, {}
        for run, transport in (("probed-boto3", "boto3"), ("probed-native", "native"), ("ranged", "native")):
            if run == "ranged":   # the way without the probe: trust Range, as before
                monkeypatch.setattr(MlflowProxySource, "_server_honours_ranges", lambda self, entries: True)
            settings = Settings.load(cache_dir=tmp_path / f"cache-{run}", transport=transport)
            link.reset()
            w = prefetch.warm(uri, settings=settings)
            sent[run] = link.stats()["bytes_out"]
            out[run] = _manifest_hashes(settings.cache_dir, w.key)
    finally:
        link.stop()
    assert out["probed-native"] == out["probed-boto3"] == out["ranged"] and len(out["ranged"]) >= 21
    expected = tmp_path / "expected.bin"
    harness.write_random_file(expected, 20 * MiB + 1, seed=0)
    want = _expected_hashes(expected.read_bytes())
    assert [v for k, v in out["ranged"].items() if k.endswith("weights.bin")] == [want]
    total = rec["total_bytes"]
    assert sent["probed-native"] < 1.2 * total, (sent, total)
    assert sent["ranged"] > 1.8 * total, (sent, total)


def _multipart_with_crc32(client, key: str, kind: str, bodies: list[bytes]) -> None:
    """A multipart upload with a CRC32 per part, and for FULL_OBJECT the whole object's CRC32 stored by S3."""
    import base64
    import zlib

    up = client.create_multipart_upload(Bucket="models", Key=key, ChecksumAlgorithm="CRC32", ChecksumType=kind)
    parts = []
    for n, body in enumerate(bodies, 1):
        r = client.upload_part(Bucket="models", Key=key, PartNumber=n, UploadId=up["UploadId"], Body=body,
                               ChecksumAlgorithm="CRC32")
        parts.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]})
    full = base64.b64encode(zlib.crc32(b"".join(bodies)).to_bytes(4, "big")).decode()
    client.complete_multipart_upload(Bucket="models", Key=key, UploadId=up["UploadId"],
                                     MultipartUpload={"Parts": parts},
                                     **({"ChecksumCRC32": full, "ChecksumType": kind} if kind == "FULL_OBJECT" else {}))


def _multipart_plain(client, key: str, bodies: list[bytes]) -> None:
    """A multipart upload with no checksums (client built with checksums=False): only its MD5 ETag checks it."""
    up = client.create_multipart_upload(Bucket="models", Key=key)
    parts = [{"PartNumber": n, "ETag": client.upload_part(Bucket="models", Key=key, PartNumber=n,
                                                          UploadId=up["UploadId"], Body=body)["ETag"]}
             for n, body in enumerate(bodies, 1)]
    client.complete_multipart_upload(Bucket="models", Key=key, UploadId=up["UploadId"],
                                     MultipartUpload={"Parts": parts})


@pytest.mark.parametrize("transport", ["native", "boto3"])
def test_stored_checksums_and_guessed_part_sizes(transport, s3, use_env, tmp_path, fresh_pool):
    """Each multipart file costs one HEAD (ChecksumMode=ENABLED), never one per part while the guessed part sizes
    check out: a FULL_OBJECT CRC32 is checked over the bytes, a COMPOSITE one over the parts, an object with no
    stored checksum by its ETag's MD5 over the parts. Parts the guess gets wrong (6 MiB parts with 5 MiB chunks)
    cost one HEAD per part, after which the file on disk is checked again and committed, not fetched again; parts
    no common size can give (7 parts of 6 MiB) are asked before the first GET, one HEAD each. A byte
    flipped in transit is caught either way: in a file whose guess was right (its real part sizes are the guessed
    ones: a corruption, fetched again) and in one whose guess was wrong (the check with the real sizes fails)."""
    client = s3.client(endpoint=s3.direct_endpoint)
    five = [os.urandom(5 * MiB), os.urandom(1000)]
    six = [os.urandom(6 * MiB), os.urandom(6 * MiB), os.urandom(1000)]
    _multipart_with_crc32(client, "guess/full.bin", "FULL_OBJECT", five)
    _multipart_with_crc32(client, "guess/composite.bin", "COMPOSITE", five)
    _multipart_plain(s3.client(endpoint=s3.direct_endpoint, checksums=False), "guess/plain.bin", five)
    _multipart_with_crc32(client, "guess/odd.bin", "COMPOSITE", six)
    seven = [os.urandom(6 * MiB) for _ in range(6)] + [os.urandom(1000)]
    _multipart_plain(s3.client(endpoint=s3.direct_endpoint, checksums=False), "guess/many.bin", seven)
    bodies = {"full.bin": five, "composite.bin": five, "plain.bin": five, "odd.bin": six, "many.bin": seven}
    proxy = harness.LinkProxy("127.0.0.1", s3.s3_port).start()
    try:
        use_env({**s3.env(proxy.url), "PREFETCH_TRANSPORT": transport, "PREFETCH_CHUNK_BYTES": str(5 * MiB),
                 "PREFETCH_MULTIPART_THRESHOLD": str(5 * MiB)})

        def warm(cache: str):
            proxy.reset()
            w = prefetch.warm("s3://models/guess", settings=Settings.load(cache_dir=tmp_path / cache))
            assert {name: (w.path / name).read_bytes() == b"".join(b) for name, b in bodies.items()} == \
                {name: True for name in bodies}
            return {f.path: f.origin_check for f in Store(tmp_path / cache).lookup(w.key).files}, w, proxy.stats()

        checks, w, stats = warm("clean")
        assert checks == {"full.bin": "crc32", "composite.bin": "crc32", "plain.bin": "md5", "odd.bin": "crc32",
                          "many.bin": "md5"}
        assert stats["head_requests"] == 5 + 3 + 7, stats  # one per file, odd.bin's 3 parts, many.bin's 7
        assert w.resolved.note is None                      # nothing fetched twice
        proxy.add_fault("flip", b"guess/composite.bin", range_start=0, after=4321)
        proxy.add_fault("flip", b"guess/odd.bin", range_start=5 * MiB, after=999)
        checks, w, stats = warm("flipped")
    finally:
        proxy.stop()
    assert stats["faults_served"] == 2
    assert checks == {"full.bin": "crc32", "composite.bin": "crc32", "plain.bin": "md5", "odd.bin": "crc32",
                      "many.bin": "md5"}
    assert "composite.bin" in w.resolved.note and "odd.bin" in w.resolved.note, w.resolved.note
    assert stats["head_requests"] == 5 + 3 + 7 + 2, stats  # and composite.bin's 2 parts, once its check failed


@pytest.mark.parametrize("transport", ["native", "boto3"])
def test_the_origin_checks_heads_are_retried(transport, s3, use_env, cache_dir, fresh_pool):
    """A 503 to the HEAD that asks for a stored checksum is retried with backoff, as GETs are; when it never ends,
    the warm exits 4 in one line, nothing committed."""
    big = _upload_multipart(s3, "heads/big.bin")
    proxy = harness.LinkProxy("127.0.0.1", s3.s3_port).start()
    try:
        env = {**s3.env(proxy.url), "PREFETCH_TRANSPORT": transport}
        use_env(env)
        proxy.add_fault("503", b"heads/big.bin", method=b"HEAD", count=2)
        w = prefetch.warm("s3://models/heads")
        assert proxy.stats()["faults_served"] == 2 and (w.path / "big.bin").read_bytes() == big
        assert [f.origin_check for f in Store(cache_dir).lookup(w.key).files] == ["crc32"]
        proxy.clear_faults()
        proxy.add_fault("503", b"heads/big.bin", method=b"HEAD", count=1000)
        proc = run_cli("warm", "s3://models/heads", env={**env, "PREFETCH_CACHE_DIR": str(cache_dir / "other")})
    finally:
        proxy.stop()
    assert_clean_error(proc, 4, "s3://models/heads", "503")
    assert not (cache_dir / "other" / "objects").exists() or not list((cache_dir / "other" / "objects").iterdir())


def test_the_signed_head_is_botocores_signature():
    """The native transport's HEADs are signed by sources/s3_head.py: the same Authorization header as botocore's
    S3SigV4Auth for the same request (a key that needs encoding, a part number, the checksum mode, If-Match and a
    session token), at the time botocore signed it."""
    import datetime

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from prefetch.sources.s3_head import object_url, sign

    scheme, host, path = object_url("http://127.0.0.1:8333", "eu-west-1", "models", "a b/ü+x=1.bin")
    assert (scheme, host) == ("http", "127.0.0.1:8333") and path == "/models/a%20b/%C3%BC%2Bx%3D1.bin"
    headers = {"x-amz-checksum-mode": "ENABLED", "If-Match": '"0123abc-2"'}
    request = AWSRequest("HEAD", f"{scheme}://{host}{path}?partNumber=2", headers=dict(headers))
    S3SigV4Auth(Credentials("AKID", "secret/key+1", "session-token"), "s3", "eu-west-1").add_auth(request)
    when = datetime.datetime.strptime(request.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.timezone.utc)
    ours = sign("HEAD", host, path, {"partNumber": "2"}, headers, "eu-west-1", "AKID", "secret/key+1",
                "session-token", now=when)
    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["x-amz-security-token"] == request.headers["X-Amz-Security-Token"]
    # and the control: another secret is another signature
    assert sign("HEAD", host, path, {"partNumber": "2"}, headers, "eu-west-1", "AKID", "other", "session-token",
                now=when)["Authorization"] != request.headers["Authorization"]


def test_the_signed_head_against_the_server(s3, blob):
    """Against real SeaweedFS (which checks signatures): the fields in boto3's shape, and each refusal our error."""
    from prefetch.errors import Unreachable
    from prefetch.sources.s3_head import head_object
    from prefetch.sources.s3_native import _Frozen

    good = _Frozen(s3.access_key, s3.secret_key, None)
    etag = s3.client().head_object(Bucket="models", Key="transport/w.bin")["ETag"].strip('"')

    def head(key="transport/w.bin", credentials=good, **kw):
        return head_object(s3.direct_endpoint, s3.region, "models", key, credentials, uri="s3://models/t", **kw)

    answer = head(checksums=True, if_match=etag)
    assert answer["ContentLength"] == 5 * MiB + 3 and answer["ETag"].strip('"') == etag
    assert answer["ChecksumCRC32"] == s3.client().head_object(Bucket="models", Key="transport/w.bin",
                                                               ChecksumMode="ENABLED")["ChecksumCRC32"]
    assert "ChecksumCRC32" not in head()             # asked for only with the checksum mode
    with pytest.raises(Unreachable, match="refused the credentials"):
        head(credentials=_Frozen(s3.access_key, "wrong-secret", None))
    with pytest.raises(NotFound):
        head("transport/missing.bin")
    with pytest.raises(OriginChanged):
        head(if_match="0" * 32)
