"""S3 (and S3-compatible servers) through boto3 directly: one listing call per 1,000 keys, ranged GETs.

Endpoint: MLFLOW_S3_ENDPOINT_URL (what MLflow users already set), else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL,
else AWS. Credentials: boto3's own chain (AWS_* env, ~/.aws, instance roles).
"""
from __future__ import annotations

import os
import threading
from typing import Iterator
from urllib.parse import urlparse

from ..config import Settings
from ..errors import BadSetting, NotFound, Unreachable
from ..store import FileEntry, safe_relpath
from . import TransientError

_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken", "403"}
_MISSING = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
_clients: dict = {}
_clients_lock = threading.Lock()


def endpoint_url() -> str | None:
    for var in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def s3_client(settings: Settings):
    """One client per (endpoint, credentials, pool size) per process: clients are thread-safe and costly."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url()
    cache_key = (endpoint, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"),
                 os.environ.get("AWS_PROFILE"), settings.max_concurrency)
    with _clients_lock:
        if cache_key not in _clients:
            config = Config(
                max_pool_connections=max(10, settings.max_concurrency + 4),
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
                retries={"max_attempts": 2, "mode": "standard"},  # our transfer retries on top, per range
                s3={"addressing_style": "path"} if endpoint else {},
            )
            verify = None if os.environ.get("MLFLOW_S3_IGNORE_TLS", "").lower() != "true" else False
            from botocore.exceptions import BotoCoreError, ProfileNotFound

            try:
                _clients[cache_key] = boto3.session.Session().client(
                    "s3", endpoint_url=endpoint, config=config, verify=verify,
                    region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
                )
            except ProfileNotFound:
                raise BadSetting(f"AWS_PROFILE={os.environ.get('AWS_PROFILE')!r}: no such profile in the AWS "
                                 "config files (~/.aws/config, ~/.aws/credentials)") from None
            except (BotoCoreError, ValueError) as e:   # a malformed endpoint URL, region or AWS config
                raise BadSetting(f"the S3 client cannot be set up: {e}") from None
        return _clients[cache_key]


def translate(error: Exception, uri: str, what: str) -> Exception:
    """botocore exceptions -> our errors (refused credentials and missing buckets are not retried)."""
    from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError, HTTPClientError,
                                     IncompleteReadError, NoCredentialsError, ResponseStreamingError)
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "NoSuchBucket":
            return NotFound(f"S3 bucket does not exist ({what})", uri)
        if code in _MISSING or status == 404:
            return NotFound(f"no such S3 object or prefix ({what})", uri)
        if code in _REFUSED or status in (401, 403):
            return Unreachable(f"S3 refused the credentials ({code or status}); check AWS_ACCESS_KEY_ID / "
                               f"AWS_SECRET_ACCESS_KEY", uri)
        if status >= 500 or code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"):
            return TransientError(f"S3 answered {code or status} ({what})", uri)
        return Unreachable(f"S3 error {code or status} ({what})", uri)
    if isinstance(error, NoCredentialsError):
        return Unreachable("no S3 credentials found; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY", uri)
    if isinstance(error, (EndpointConnectionError, ConnectTimeoutError)):
        return Unreachable(f"cannot reach S3 at {endpoint_url() or 'AWS'} ({what})", uri)
    if isinstance(error, (HTTPClientError, ResponseStreamingError, IncompleteReadError, Urllib3Error,
                          ConnectionError, TimeoutError)):
        # A reset, a timeout or a body cut short mid-stream: the transfer retries from the byte it reached.
        return TransientError(f"S3 connection failed ({what}: {type(error).__name__})", uri)
    return error


class S3Source:
    supports_ranges = True

    def __init__(self, uri: str, settings: Settings):
        parsed = urlparse(uri)
        self.uri = uri
        self.bucket = parsed.netloc
        self.prefix = parsed.path.lstrip("/").rstrip("/")
        self.client = s3_client(settings)
        self._single = False  # the URI names one object, not a prefix

    def identity(self) -> dict:
        return {"origin": "s3", "endpoint": endpoint_url() or "aws", "bucket": self.bucket}

    def list(self) -> list[FileEntry]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        entries: list[FileEntry] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix):]
                    if not rel or rel.endswith("/"):
                        continue  # directory markers
                    entries.append(FileEntry(safe_relpath(rel, self.uri), int(obj["Size"]), obj.get("ETag", "").strip('"')))
            if not entries and self.prefix:
                head = self.client.head_object(Bucket=self.bucket, Key=self.prefix)
                self._single = True
                entries.append(FileEntry(self.prefix.rsplit("/", 1)[-1], int(head["ContentLength"]),
                                         head.get("ETag", "").strip('"')))
        except Exception as e:  # noqa: BLE001 - translated, or re-raised as is
            raise translate(e, self.uri, "listing") from None
        return sorted(entries, key=lambda f: f.path)

    def read(self, path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        key = self.prefix if self._single else (f"{self.prefix}/{path}" if self.prefix else path)
        kwargs = {"Bucket": self.bucket, "Key": key}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            body = self.client.get_object(**kwargs)["Body"]
            while chunk := body.read(1 << 20):
                yield chunk
        except Exception as e:  # noqa: BLE001
            raise translate(e, self.uri, f"GET {key}") from None
