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
from ..errors import BadSetting, IntegrityError, NotFound, Unreachable
from ..integrity import OriginChanged, OriginFacts, plan
from .base import FileEntry, TransientError, safe_relpath

_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken", "403"}
_MISSING = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
# A multipart ETag ("<md5 of part md5s>-N") is checked by recomputing it, which needs every part's size: one HEAD
# per part. Past this many parts that costs more requests than it is worth, and the object's stored full-object
# checksum (if any) is asked for instead.
MAX_PART_HEADS = 64
# HEAD fields -> the check they allow (prefetch/integrity.py); SHA-1 and CRC64NVME are not checked here.
_CHECKSUM_FIELDS = {"ChecksumSHA256": "sha256", "ChecksumCRC32C": "crc32c", "ChecksumCRC32": "crc32"}
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
        if code == "PreconditionFailed" or status == 412:
            return OriginChanged(f"the object changed at the origin while we read it ({what})", uri)
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


def full_object_checksums(head: dict, multipart: bool) -> dict[str, str]:
    """The checksums of a HEAD/GET answer (ChecksumMode=ENABLED) that cover the whole object's bytes.

    A multipart upload's checksum is COMPOSITE unless it was uploaded with ChecksumType=FULL_OBJECT: then it is a
    checksum of the part checksums, written "<base64>-N", and no hash of the bytes in order can match it. A
    single-part upload's checksum is always of the whole object (some servers leave ChecksumType out for it); a
    multipart object whose answer does not say FULL_OBJECT is not trusted to be one."""
    kind = head.get("ChecksumType")
    if kind == "COMPOSITE" or (kind != "FULL_OBJECT" and multipart):
        return {}
    return {name: head[field] for field, name in _CHECKSUM_FIELDS.items()
            if head.get(field) and "-" not in head[field]}   # '-' is no base64 digit: a "-N" composite suffix


class S3Prefix:
    """What both S3 transports share: the bucket and prefix a URI names, the origin's identity (the same for both,
    so switching transports keeps the cache), and the exact key + ETag of every listed path: a listing's key is
    fetched as listed, never re-built from the normalised path ('a//b' and 'a/b' are different objects), and
    every GET is pinned to the ETag (If-Match), so all ranges of a file come from one version of it."""

    supports_ranges = True

    def __init__(self, uri: str):
        parsed = urlparse(uri)
        self.uri = uri
        self.bucket = parsed.netloc
        self.prefix = parsed.path.lstrip("/").rstrip("/")
        self._single = False  # the URI names one object, not a prefix
        self._keys: dict[str, tuple[str, str | None]] = {}

    def identity(self) -> dict:
        return {"origin": "s3", "endpoint": endpoint_url() or "aws", "bucket": self.bucket}

    def _record(self, rel: str, key: str, etag: str | None) -> str:
        """Remember a listed key under its checked path; two keys that are one path here are refused."""
        path = safe_relpath(rel, self.uri)
        if path in self._keys:
            raise IntegrityError(f"listing keys {self._keys[path][0]!r} and {key!r} are one path {path!r} here; "
                                 "refusing to guess which one is meant", self.uri)
        self._keys[path] = (key, etag)
        return path

    def _head_client(self):
        """The boto3 client that sends the few HEADs a transport may not (part sizes, stored checksums)."""
        raise NotImplementedError

    def origin_facts(self, entry: FileEntry) -> OriginFacts:
        """What S3 says about the content, the same for both transports, asking only when the ETag alone gives no
        check. A single-part ETag is the MD5 already (no request); a multipart one is checkable once each part's
        size is known: one HEAD per part (PartNumber), for up to MAX_PART_HEADS parts, sent in parallel. Otherwise
        (more parts, no ETag, an ETag that is no MD5): one HEAD with ChecksumMode=ENABLED, for the full-object
        checksum the uploader may have stored (full_object_checksums: never a COMPOSITE one)."""
        key, etag = self._key(entry.path)
        etag = etag or entry.etag
        facts = OriginFacts(etag=etag)
        if plan(facts, entry.size) != "none":
            return facts
        parts = facts.multipart_parts
        pin = {"IfMatch": f'"{etag}"'} if etag else {}
        try:
            client = self._head_client()
            if parts and parts <= MAX_PART_HEADS:
                from concurrent.futures import ThreadPoolExecutor

                def head(n: int) -> dict:
                    return client.head_object(Bucket=self.bucket, Key=key, PartNumber=n, **pin)

                with ThreadPoolExecutor(min(parts, 16), thread_name_prefix="prefetch-head") as pool:
                    heads = list(pool.map(head, range(1, parts + 1)))   # in parallel: one round trip, not N
                return OriginFacts(etag=etag, version_id=heads[0].get("VersionId"),
                                   part_sizes=tuple(int(h["ContentLength"]) for h in heads))
            head = client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED", **pin)
        except Exception as e:  # noqa: BLE001
            err = translate(e, self.uri, f"HEAD {key}")
            if isinstance(err, (OriginChanged, TransientError, Unreachable, NotFound, BadSetting)):
                raise err from None
            return facts
        return OriginFacts(etag=etag, version_id=head.get("VersionId"),
                           checksums=full_object_checksums(head, multipart=parts is not None))

    def _key(self, path: str) -> tuple[str, str | None]:
        if path in self._keys:
            return self._keys[path]
        # Not listed by this instance (a repair of files named by a manifest): the path is the key's tail.
        return (self.prefix if self._single else (f"{self.prefix}/{path}" if self.prefix else path)), None


class S3Source(S3Prefix):
    def __init__(self, uri: str, settings: Settings):
        super().__init__(uri)
        self.client = s3_client(settings)

    def _head_client(self):
        return self.client

    def list(self) -> list[FileEntry]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        entries: list[FileEntry] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix):]
                    if not rel or rel.endswith("/"):
                        continue  # directory markers
                    etag = obj.get("ETag", "").strip('"') or None
                    entries.append(FileEntry(self._record(rel, obj["Key"], etag), int(obj["Size"]), etag))
            if not entries and self.prefix:
                head = self.client.head_object(Bucket=self.bucket, Key=self.prefix)
                self._single = True
                path, etag = self.prefix.rsplit("/", 1)[-1], head.get("ETag", "").strip('"') or None
                self._keys[path] = (self.prefix, etag)
                entries.append(FileEntry(path, int(head["ContentLength"]), etag))
        except IntegrityError:
            raise
        except Exception as e:  # noqa: BLE001 - translated, or re-raised as is
            raise translate(e, self.uri, "listing") from None
        return sorted(entries, key=lambda f: f.path)

    def read(self, path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        key, etag = self._key(path)
        kwargs = {"Bucket": self.bucket, "Key": key}
        if etag:
            kwargs["IfMatch"] = f'"{etag}"'   # every range of one file from one version (412 if it changed)
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            body = self.client.get_object(**kwargs)["Body"]
            raw = getattr(body, "_raw_stream", None)
            # read1: what the socket has, up to 1 MiB, so a trickling link is seen (and dropped) at its real rate
            # instead of blocking until a whole block arrives; the transfer checks the byte count itself.
            read = raw.read1 if raw is not None and hasattr(raw, "read1") else body.read
            while chunk := read(1 << 20):
                yield chunk
        except Exception as e:  # noqa: BLE001
            raise translate(e, self.uri, f"GET {key}") from None
