"""S3 (and S3-compatible servers) through obstore, the Python binding of Rust's `object_store`: the bytes move
outside the interpreter (HTTP, TLS, signing and the socket reads run in Rust with the GIL released), and a ranged
GET comes back as one buffer the engine can pwrite and hash without copying it again.

Same protocol as sources/s3.py (list / read / identity / supports_ranges / origin_facts, shared through S3Prefix),
plus `read_range`: one request, the client's own buffer. Endpoint, credentials and TLS are taken the way MLflow users
set them (s3.py's `endpoint_url()`; boto3's credential chain, so profiles, SSO and instance roles work; a private
CA through AWS_CA_BUNDLE or the profile's ca_bundle; MLFLOW_S3_IGNORE_TLS), and errors are translated to the same
errors and exit codes as s3.py's `translate()`.
"""
from __future__ import annotations

import collections
import os
import re
import threading
from datetime import datetime, timedelta, timezone
from typing import Iterator, NamedTuple

from ..config import Settings
from ..errors import BadSetting, NotFound, OriginChanged, PrefetchError, Unreachable
from .base import FileEntry, TransientError
from .s3 import (S3Prefix, S3Source, ca_bundle, endpoint_url, ignore_tls, unreachable_endpoint,
                 untrusted_certificate)

# read() yields blocks of at least this size as they arrive (the last may be shorter): the engine's offset follows
# the socket, so a reset mid-range is resumed from the byte reached, and memory stays a few blocks per request.
# (Measured: streaming in 1 MiB blocks costs no more CPU per GiB than one buffer per 8 MiB range.)
STREAM_BLOCK = 1 << 20
MIN_STREAM_BLOCK = 16 << 10
# How long a refreshable credential (instance role, SSO, assumed role) is trusted before obstore asks boto3 again;
# boto3 refreshes it itself inside its own advisory window when asked.
CREDENTIAL_TTL = timedelta(minutes=5)

_stores: dict = {}
_stores_lock = threading.Lock()


def _region(session) -> str:
    return (session.region_name or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
            or "us-east-1")


class _Boto3Credentials:
    """obstore credential provider over a boto3 credential object that expires (called by obstore, rarely)."""

    def __init__(self, credentials):
        self.credentials = credentials

    def __call__(self) -> dict:
        frozen = self.credentials.get_frozen_credentials()
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token or None, "expires_at": datetime.now(timezone.utc) + CREDENTIAL_TTL}


_Frozen = collections.namedtuple("_Frozen", "access_key secret_key token")   # botocore's shape, for env keys


class Access(NamedTuple):
    """How to reach and sign for S3, as boto3 would: static frozen credentials or a refreshable boto3 credential
    (one of the two), the region, and the CA bundle to trust for TLS (a PEM file's path) if one is set."""
    frozen: object
    refreshable: object
    region: str
    ca_bundle: str | None


def _resolve_credentials(uri: str) -> Access:
    """The credentials, region and CA bundle boto3 would use (see Access).

    Keys in the environment are what boto3's chain would pick first (before any profile or role), so they are
    used as they are, without importing boto3 (0.15 CPU-s and a second of wall time per process on a loaded
    node); anything else (AWS_PROFILE, ~/.aws, SSO, instance or container roles) goes through boto3's chain."""
    env_key, env_secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if env_key and env_secret and not os.environ.get("AWS_PROFILE"):   # (a named profile must exist: boto3 says)
        frozen = _Frozen(env_key, env_secret, os.environ.get("AWS_SESSION_TOKEN") or None)
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        return Access(frozen, None, region, ca_bundle(os.environ.get("AWS_CA_BUNDLE")))
    import boto3
    import botocore.session
    from botocore.credentials import RefreshableCredentials
    from botocore.exceptions import BotoCoreError, ProfileNotFound

    try:
        core = botocore.session.Session()
        session = boto3.session.Session(botocore_session=core)
        credentials = session.get_credentials()
        bundle = ca_bundle(core.get_config_variable("ca_bundle"))   # AWS_CA_BUNDLE, else the profile's
    except ProfileNotFound:
        raise BadSetting(f"AWS_PROFILE={os.environ.get('AWS_PROFILE')!r}: no such profile in the AWS "
                         "config files (~/.aws/config, ~/.aws/credentials)") from None
    except (BotoCoreError, ValueError) as e:   # a broken AWS config file
        raise BadSetting(f"the S3 credentials cannot be read: {e}") from None
    if credentials is None:
        raise Unreachable("no S3 credentials found; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY", uri)
    if isinstance(credentials, RefreshableCredentials):
        return Access(None, credentials, _region(session), bundle)
    return Access(credentials.get_frozen_credentials(), None, _region(session), bundle)


def s3_store(bucket: str, settings: Settings, access: Access):
    """One obstore S3Store per (bucket, endpoint, credentials, TLS trust) per process: it holds the connection
    pool. `access` is what _resolve_credentials() found."""
    from obstore.store import S3Store

    endpoint = endpoint_url()
    frozen, refreshable, region, bundle = access
    cache_key = (bucket, endpoint, region, os.environ.get("MLFLOW_S3_IGNORE_TLS", ""), bundle,
                 settings.connect_timeout, settings.read_timeout,
                 # a refreshable credential is one per profile (boto3 refreshes it in place)
                 ("chain", os.environ.get("AWS_PROFILE")) if refreshable else tuple(frozen))
    with _stores_lock:
        if cache_key in _stores:
            return _stores[cache_key]
        config: dict = {"region": region}
        if endpoint:
            # S3-compatible servers (SeaweedFS, MinIO, Ceph) answer path-style requests at the endpoint itself.
            # (obstore reads AWS_ENDPOINT_URL_S3 from the environment as its own key, over `endpoint`: set both,
            # so the endpoint is the one s3.py's rule picks, MLFLOW_S3_ENDPOINT_URL first.)
            config.update(endpoint=endpoint, aws_endpoint_url_s3=endpoint, virtual_hosted_style_request=False)
        if frozen is not None:
            config.update(access_key_id=frozen.access_key, secret_access_key=frozen.secret_key)
            if frozen.token:
                config["token"] = frozen.token
        client_options: dict = {
            "connect_timeout": timedelta(seconds=settings.connect_timeout),
            # read_timeout: a stalled socket fails (and is retried by the engine from the byte reached);
            # timeout bounds a whole request, and a single-stream file may be big: deadlines are the engine's.
            "read_timeout": timedelta(seconds=settings.read_timeout),
            "timeout": timedelta(hours=6),
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
        }
        if ignore_tls():
            client_options["allow_invalid_certificates"] = True
        elif bundle:
            # (added to the system's roots; boto3 trusts the bundle alone: a private endpoint verifies either way)
            with open(bundle, encoding="ascii", errors="replace") as f:
                client_options["root_certificate"] = f.read()
        store = S3Store(
            bucket, config=config, client_options=client_options,
            # One quick retry inside the client (as s3.py's botocore config); the engine retries on top, per range,
            # with its own backoff and attempt budget.
            retry_config={"max_retries": 1, "retry_timeout": timedelta(seconds=settings.read_timeout),
                          "backoff": {"init_backoff": timedelta(milliseconds=100),
                                      "max_backoff": timedelta(seconds=1), "base": 2}},
            credential_provider=_Boto3Credentials(refreshable) if refreshable else None,
        )
        _stores[cache_key] = store
        return store


_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken"}
_MISSING = {"NoSuchBucket", "NoSuchKey", "NotFound"}
_BUSY = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"}
# rustls' words for a certificate it does not trust (UnknownIssuer, NotValidForName, Expired, ...)
_CERTIFICATE = re.compile(r"invalid peer certificate|certificate verify failed|UnknownIssuer", re.IGNORECASE)


def translate(error: Exception, uri: str, what: str, reading: bool = False) -> Exception:
    """obstore exceptions -> our errors, the same kinds and exit codes as s3.py's translate():
    412 -> OriginChanged; missing bucket/key -> NotFound (3); refused credentials -> Unreachable (4);
    5xx, timeouts, resets, bodies cut short -> TransientError (retried); no connection at all -> Unreachable
    when listing (nothing was reached: fail fast, as boto3's EndpointConnectionError), but TransientError when
    reading (the listing reached it a moment ago: a refused or timed-out connect under load is retried).
    obstore carries the HTTP status and S3's error code only in its message, so they are read from there."""
    from obstore.exceptions import (BaseError, GenericError, PermissionDeniedError, PreconditionError,
                                    UnauthenticatedError)

    text = str(error)
    status_match, code_match = _STATUS.search(text), _CODE.search(text)
    status = int(status_match.group(1)) if status_match else 0
    code = code_match.group(1) if code_match else ""
    if isinstance(error, PreconditionError) or status == 412:
        return OriginChanged(f"the object changed at the origin while we read it ({what})", uri)
    if code == "NoSuchBucket":
        return NotFound(f"S3 bucket does not exist ({what})", uri)
    if isinstance(error, FileNotFoundError) or code in _MISSING or status == 404:
        return NotFound(f"no such S3 object or prefix ({what})", uri)
    if isinstance(error, (PermissionDeniedError, UnauthenticatedError)) or code in _REFUSED or status in (401, 403):
        return Unreachable(f"S3 refused the credentials ({code or status}); check AWS_ACCESS_KEY_ID / "
                           f"AWS_SECRET_ACCESS_KEY", uri)
    if status >= 500 or code in _BUSY:
        return TransientError(f"S3 answered {code or status} ({what})", uri)
    if status:
        return Unreachable(f"S3 error {code or status} ({what})", uri)
    if _CERTIFICATE.search(text):   # not retried: the next connection would be refused the same way
        return untrusted_certificate(uri)
    if "kind: Connect" in text and not reading:
        return unreachable_endpoint(uri, what)
    if isinstance(error, (GenericError, ConnectionError, TimeoutError)):
        # A reset, a timeout or a body cut short mid-stream: the engine retries from the byte it reached.
        return TransientError(f"S3 connection failed ({what}: {_first_line(text)})", uri)
    if isinstance(error, BaseError):   # a bad configuration key, an invalid path: retrying would not help
        return Unreachable(f"S3 client error ({what}: {_first_line(text)})", uri)
    return error


def _first_line(text: str, limit: int = 160) -> str:
    line = " ".join(text.strip().split("\n", 1)[0].split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class NativeS3Source(S3Prefix):
    """Listing and GETs through obstore. The HEADs of origin_facts (stored checksums, part sizes: obstore's head
    takes no options) are signed here (s3_head.py); keys obstore's paths cannot name ('a//b', 'a/./b': it refuses
    empty and '.' segments) are listed and read through boto3 (imported only then), as listed."""

    def __init__(self, uri: str, settings: Settings):
        super().__init__(uri)
        self.settings = settings
        self.access = _resolve_credentials(uri)
        self.store = s3_store(self.bucket, settings, self.access)
        self._boto3_source: S3Source | None = None
        # obstore hands a block over only once it is whole: a connection at half the rate floor must still
        # deliver one per rate window, or the engine could not see that it trickles (1 MiB with the defaults).
        self.block = max(MIN_STREAM_BLOCK, min(STREAM_BLOCK, int(settings.min_rate * settings.min_rate_window / 2)))

    def _head(self, key: str, *, part_number: int | None = None, checksums: bool = False,
              if_match: str | None = None) -> dict:
        """obstore's HEAD sends no options: a HEAD signed here (sources/s3_head.py), with the credentials the
        store was built with, so no boto3 client is built for it."""
        from .s3_head import head_object

        frozen, refreshable, region, bundle = self.access
        credentials = frozen if frozen is not None else refreshable.get_frozen_credentials()
        return head_object(endpoint_url(), region, self.bucket, key, credentials, uri=self.uri,
                           part_number=part_number, checksums=checksums, if_match=if_match,
                           timeout=self.settings.read_timeout, verify_tls=not ignore_tls(), ca_bundle=bundle)

    def _boto3(self) -> S3Source:
        if self._boto3_source is None:
            source = S3Source(self.uri, self.settings)
            source._keys, source._single = self._keys, self._single   # one listing, whichever client made it
            self._boto3_source = source
        return self._boto3_source

    def list(self) -> list[FileEntry]:
        import obstore

        prefix = f"{self.prefix}/" if self.prefix else ""
        entries: list[FileEntry] = []
        try:
            for chunk in obstore.list(self.store, prefix=prefix or None, chunk_size=1000):
                for obj in chunk:
                    key = obj["path"]
                    rel = key[len(prefix):]
                    if not rel or rel.endswith("/"):
                        continue  # directory markers
                    etag = (obj.get("e_tag") or "").strip('"') or None
                    entries.append(FileEntry(self._record(rel, key, etag), int(obj["size"]), etag))
            if not entries and self.prefix:
                head = obstore.head(self.store, self.prefix)
                self._single = True
                path, etag = self.prefix.rsplit("/", 1)[-1], (head.get("e_tag") or "").strip('"') or None
                self._keys[path] = (self.prefix, etag)
                entries.append(FileEntry(path, int(head["size"]), etag))
        except PrefetchError:
            raise
        except Exception as e:  # noqa: BLE001 - translated, or re-raised as is
            if _unnameable(e) or "invalid list response" in str(e):
                # A key obstore's paths cannot name, or a listing its parser refuses (an S3-compatible server
                # leaving out a field): boto3 lists it, keys exactly as listed.
                self._keys.clear()
                entries = self._boto3().list()
                self._single = self._boto3_source._single
                return entries
            raise translate(e, self.uri, "listing") from None
        return sorted(entries, key=lambda f: f.path)

    def _get(self, key: str, start: int, end: int | None, if_match: str | None):
        import obstore

        options: dict = {}
        if start or end is not None:
            options["range"] = (start, end) if end is not None else {"offset": start}
        if if_match:
            options["if_match"] = f'"{if_match}"'
        return obstore.get(self.store, key, options=options or None)

    def read_range(self, path: str, start: int, end: int, if_match: str | None = None):
        """Bytes [start, end) of one file in one GET, as the buffer obstore returns (buffer protocol: pwrite it,
        hash it, memoryview it; no copy in Python). `if_match` defaults to the ETag of this source's listing;
        a changed object raises OriginChanged."""
        key, listed = self._key(path)
        if end <= start:
            return b""
        try:
            return self._get(key, start, end, if_match or listed).bytes()
        except Exception as e:  # noqa: BLE001
            raise translate(e, self.uri, f"GET {key}", reading=True) from None

    def read(self, path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes [start, end) in blocks as they arrive, from the version listed (If-Match)."""
        if end is not None and end <= start:
            return
        key, etag = self._key(path)
        try:
            response = self._get(key, start, end, etag)
        except Exception as e:  # noqa: BLE001
            if _unnameable(e):
                yield from self._boto3().read(path, start, end)
                return
            raise translate(e, self.uri, f"GET {key}", reading=True) from None
        try:
            for block in response.stream(min_chunk_size=self.block):
                yield block
        except Exception as e:  # noqa: BLE001
            raise translate(e, self.uri, f"GET {key}", reading=True) from None


def _unnameable(error: Exception) -> bool:
    """obstore refusing a key it cannot represent as one of its paths ('a//b', 'a/./b'): not an answer from S3.
    (A ValueError when we name the key; "invalid path" when a listing holds it.)"""
    text = str(error).lower()
    return "parse path" in text or "error parsing path" in text or "invalid path" in text
