"""S3 (and S3-compatible servers) through boto3 directly: one listing call per 1,000 keys, ranged GETs.

Endpoint: MLFLOW_S3_ENDPOINT_URL (what MLflow users already set), else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL,
else AWS. Credentials: boto3's own chain (AWS_* env, ~/.aws, instance roles).
"""
from __future__ import annotations

import os
import random
import threading
import time
from typing import Iterator
from urllib.parse import urlparse

from ..config import Settings
from ..errors import BadSetting, IntegrityError, NotFound, Unreachable
from ..integrity import OriginChanged, OriginFacts, plan
from .base import FileEntry, TransientError, safe_relpath

_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken", "403"}
_MISSING = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
# A stored checksum (CRC32: 0.16 CPU-s per GiB) is cheaper to check than the ETag's MD5 (1.29): from this size on,
# one HEAD (ChecksumMode=ENABLED) to learn it costs less than hashing the file with MD5 (8 MiB: 10 ms of MD5).
HEAD_FROM = 8 << 20
HEADS_TRIED = 4
# HEAD fields -> the check they allow (prefetch/integrity.py); SHA-1 and CRC64NVME are not checked here.
_CHECKSUM_FIELDS = {"ChecksumSHA256": "sha256", "ChecksumCRC32C": "crc32c", "ChecksumCRC32": "crc32"}
_clients: dict = {}
_clients_lock = threading.Lock()


def endpoint_url() -> str | None:
    for var in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def proxy_for(url: str) -> str | None:
    """The proxy a request to `url` goes through, as boto3 and the native client choose it: HTTPS_PROXY /
    HTTP_PROXY (either case) by the URL's scheme, unless NO_PROXY names its host. None: a direct connection."""
    if not any(k.lower().endswith("_proxy") for k in os.environ):
        return None
    from urllib.request import getproxies_environment, proxy_bypass_environment

    proxies = getproxies_environment()
    parsed = urlparse(url)
    proxy = proxies.get(parsed.scheme)
    if not proxy or proxy_bypass_environment(parsed.netloc, proxies):
        return None
    return proxy


def ignore_tls() -> bool:
    """MLFLOW_S3_IGNORE_TLS=true: MLflow's switch for not verifying the S3 endpoint's certificate."""
    return os.environ.get("MLFLOW_S3_IGNORE_TLS", "").lower() == "true"


def ca_bundle(configured: str | None) -> str | None:
    """The CA bundle to verify the endpoint with (`configured`: AWS_CA_BUNDLE, or a profile's ca_bundle), checked
    up front: a missing or unreadable file, or one with no PEM certificate in it, is a setting to fix (exit 2),
    not an S3 server that cannot be reached. None when none is set, or verification is off (MLFLOW_S3_IGNORE_TLS)."""
    if not configured or ignore_tls():
        return None
    name = "AWS_CA_BUNDLE" if os.environ.get("AWS_CA_BUNDLE") else "ca_bundle (AWS config)"
    path = os.path.expanduser(configured)
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise BadSetting(f"{name}={configured!r}: {e.strerror or e}") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise BadSetting(f"{name}={configured!r}: no PEM certificate in it") from None
    return path


def untrusted_certificate(uri: str) -> Unreachable:
    """The one line for an S3 endpoint whose TLS certificate we do not trust, whichever client met it (not
    retried: every connection would be refused the same way)."""
    return Unreachable(f"TLS to S3 at {endpoint_url()} failed: its certificate is not trusted (a private CA: set "
                       "AWS_CA_BUNDLE to its PEM file; or MLFLOW_S3_IGNORE_TLS=true to skip verification)", uri)


def unreachable_endpoint(uri: str, what: str) -> Unreachable:
    """No connection at all to the S3 endpoint, or to the proxy in front of it (named: it is what to check)."""
    from ..redact import redact_uri

    endpoint = endpoint_url()
    proxy = proxy_for(endpoint or "https://s3.amazonaws.com")
    through = f" through the proxy {redact_uri(proxy)} (HTTP(S)_PROXY; NO_PROXY to bypass it)" if proxy else ""
    return Unreachable(f"cannot reach S3 at {endpoint or 'AWS'}{through} ({what})", uri)


def s3_client(settings: Settings):
    """One client per (endpoint, credentials, pool size) per process: clients are thread-safe and costly."""
    import boto3
    import botocore.session
    from botocore.config import Config

    endpoint = endpoint_url()
    cache_key = (endpoint, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"),
                 os.environ.get("AWS_PROFILE"), os.environ.get("AWS_CA_BUNDLE"),
                 os.environ.get("MLFLOW_S3_IGNORE_TLS"), settings.max_concurrency)
    with _clients_lock:
        if cache_key not in _clients:
            config = Config(
                max_pool_connections=max(10, settings.max_concurrency + 4),
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
                retries={"max_attempts": 2, "mode": "standard"},  # our transfer retries on top, per range
                s3={"addressing_style": "path"} if endpoint else {},
            )
            from botocore.exceptions import BotoCoreError, ProfileNotFound

            try:
                core = botocore.session.Session()
                # (boto3 reads AWS_CA_BUNDLE itself; checked here so a bad one is one clear line, as natively)
                bundle = ca_bundle(core.get_config_variable("ca_bundle"))
                _clients[cache_key] = boto3.session.Session(botocore_session=core).client(
                    "s3", endpoint_url=endpoint, config=config, verify=False if ignore_tls() else bundle,
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
                                     IncompleteReadError, NoCredentialsError, ProxyConnectionError,
                                     ResponseStreamingError, SSLError)
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
    if isinstance(error, SSLError):
        return untrusted_certificate(uri) if "CERTIFICATE_VERIFY_FAILED" in str(error) else \
            Unreachable(f"TLS to S3 at {endpoint_url()} failed ({what}: {error})", uri)
    if isinstance(error, NoCredentialsError):
        return Unreachable("no S3 credentials found; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY", uri)
    if isinstance(error, ProxyConnectionError):
        return unreachable_endpoint(uri, what)
    if isinstance(error, (EndpointConnectionError, ConnectTimeoutError)):
        return unreachable_endpoint(uri, what)
    if isinstance(error, (HTTPClientError, ResponseStreamingError, IncompleteReadError, Urllib3Error,
                          ConnectionError, TimeoutError)):
        # A reset, a timeout or a body cut short mid-stream: the transfer retries from the byte it reached.
        return TransientError(f"S3 connection failed ({what}: {type(error).__name__})", uri)
    return error


def stored_checksums(head: dict, multipart: bool) -> dict[str, str]:
    """The checksums of a HEAD answer (ChecksumMode=ENABLED) that prefetch/integrity.py can check.

    A single-part upload's checksum is of the whole object (some servers leave ChecksumType out for it). A
    multipart upload's is FULL_OBJECT (of the bytes in order) only when the upload asked for that; otherwise it is
    COMPOSITE, written "<base64>-N": the checksum of the parts' checksums, checked over the parts. A multipart
    value that says neither (no type, no "-N") is not trusted to be either, and is left out."""
    kind = head.get("ChecksumType")
    out = {}
    for field, name in _CHECKSUM_FIELDS.items():
        value = head.get(field)
        if not value:
            continue
        if "-" in value:            # '-' is no base64 digit: a "-N" composite suffix
            if kind != "FULL_OBJECT":
                out[name] = value
        elif not multipart or kind == "FULL_OBJECT":
            out[name] = value
    return out


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

    def _head(self, key: str, *, part_number: int | None = None, checksums: bool = False,
              if_match: str | None = None) -> dict:
        """One HEAD in boto3's answer shape; errors are ours (NotFound, Unreachable, OriginChanged, TransientError)."""
        raise NotImplementedError

    def _head_retried(self, key: str, **options) -> dict:
        """_head(), a 5xx or a broken connection retried (HEADS_TRIED times in all, with backoff), as the engine
        retries its GETs."""
        attempt = 1
        while True:
            try:
                return self._head(key, **options)
            except TransientError:
                if attempt >= HEADS_TRIED:
                    raise
                time.sleep(0.2 * 2 ** (attempt - 1) * (0.5 + random.random()))
                attempt += 1

    def origin_facts(self, entry: FileEntry) -> OriginFacts:
        """What S3 says about the content, the same for both transports. A small file with an MD5 ETag needs no
        request (its MD5 is cheap); any other file gets one HEAD with ChecksumMode=ENABLED, for a checksum the
        uploader stored (boto3 >= 1.36 stores a CRC32 by default), which is cheaper to check than the MD5.
        A multipart upload's part sizes are not asked for here: the engine guesses them (integrity.py) and asks
        only if a guessed check fails (part_sizes())."""
        key, etag = self._key(entry.path)
        etag = etag or entry.etag
        facts = OriginFacts(etag=etag)
        if plan(facts, entry.size) == "md5" and entry.size < HEAD_FROM:
            return facts
        try:
            head = self._head_retried(key, checksums=True, if_match=etag)
        except (OriginChanged, TransientError, Unreachable, NotFound, BadSetting):
            raise
        except Exception:  # noqa: BLE001 - an answer we cannot read: the ETag alone is the check
            return facts
        return OriginFacts(etag=etag, version_id=head.get("VersionId"),
                           checksums=stored_checksums(head, multipart=facts.multipart_parts is not None))

    def part_sizes(self, entry: FileEntry, parts: int) -> tuple[int, ...]:
        """Each part's size, from one HEAD per part (?partNumber=k, in parallel): asked only when a check over
        guessed part sizes failed, to tell a wrong guess from a corruption."""
        from concurrent.futures import ThreadPoolExecutor

        key, etag = self._key(entry.path)
        etag = etag or entry.etag

        def head(n: int) -> int:
            return int(self._head_retried(key, part_number=n, if_match=etag)["ContentLength"])

        with ThreadPoolExecutor(min(parts, 16), thread_name_prefix="prefetch-head") as pool:
            return tuple(pool.map(head, range(1, parts + 1)))

    def _key(self, path: str) -> tuple[str, str | None]:
        if path in self._keys:
            return self._keys[path]
        # Not listed by this instance (a repair of files named by a manifest): the path is the key's tail.
        return (self.prefix if self._single else (f"{self.prefix}/{path}" if self.prefix else path)), None


class S3Source(S3Prefix):
    def __init__(self, uri: str, settings: Settings):
        super().__init__(uri)
        self.client = s3_client(settings)

    def _head(self, key: str, *, part_number: int | None = None, checksums: bool = False,
              if_match: str | None = None) -> dict:
        kwargs: dict = {"Bucket": self.bucket, "Key": key}
        if part_number:
            kwargs["PartNumber"] = part_number
        if checksums:
            kwargs["ChecksumMode"] = "ENABLED"
        if if_match:
            kwargs["IfMatch"] = f'"{if_match}"'
        try:
            return self.client.head_object(**kwargs)
        except Exception as e:  # noqa: BLE001
            raise translate(e, self.uri, f"HEAD {key}") from None

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
