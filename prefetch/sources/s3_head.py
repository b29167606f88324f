"""One S3 HEAD request, signed with AWS Signature Version 4, without boto3.

The native transport moves bytes through obstore, whose HEAD sends no options; the few HEADs the origin checks
need (a stored checksum: `x-amz-checksum-mode: ENABLED`; a part's size: `?partNumber=k`) are sent from here.
boto3 could send them, but importing it and building an S3 client costs ~0.37 CPU-s per process (as much as
the MD5 of 290 MiB); this module's imports cost 0.04 (hmac, hashlib, http.client). The signature is the one botocore's
S3SigV4Auth computes for the same request (tests/test_transport.py compares the two).

The answer comes back in boto3's shape (ContentLength, ETag, VersionId, ChecksumCRC32, ChecksumType, ...), so
S3Prefix.origin_facts reads either transport's HEAD the same way; a failure is one of our errors, with the exit
codes of the other S3 paths (404 -> NotFound, 401/403 -> Unreachable, 412 -> OriginChanged, 5xx and a broken
connection -> TransientError, which the caller may retry).
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.client
import ssl
from urllib.parse import quote, unquote, urlparse

from ..errors import BadSetting, NotFound, OriginChanged, Unreachable
from ..redact import redact_uri
from .base import TransientError
from .s3 import proxy_for, untrusted_certificate

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# response header -> boto3's name for it
_FIELDS = {"content-length": "ContentLength", "etag": "ETag", "x-amz-version-id": "VersionId",
           "x-amz-mp-parts-count": "PartsCount", "x-amz-checksum-crc32": "ChecksumCRC32",
           "x-amz-checksum-crc32c": "ChecksumCRC32C", "x-amz-checksum-sha256": "ChecksumSHA256",
           "x-amz-checksum-sha1": "ChecksumSHA1", "x-amz-checksum-crc64nvme": "ChecksumCRC64NVME",
           "x-amz-checksum-type": "ChecksumType"}


def object_url(endpoint: str | None, region: str, bucket: str, key: str) -> tuple[str, str, str]:
    """(scheme, host[:port], path) of an object: path-style at a custom endpoint (as the other S3 paths address
    S3-compatible servers), virtual-hosted at AWS (path-style for a bucket name with dots, which TLS cannot
    name as a host). The key is percent-encoded once, '/' kept, as S3's canonical URI wants."""
    path_key = quote(key, safe="/~")
    if endpoint:
        parts = urlparse(endpoint)
        return parts.scheme or "https", parts.netloc, f"{parts.path.rstrip('/')}/{quote(bucket)}/{path_key}"
    if "." in bucket:
        return "https", f"s3.{region}.amazonaws.com", f"/{bucket}/{path_key}"
    return "https", f"{bucket}.s3.{region}.amazonaws.com", f"/{path_key}"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sign(method: str, host: str, path: str, query: dict[str, str], headers: dict[str, str], region: str,
         access_key: str, secret_key: str, token: str | None = None,
         now: datetime.datetime | None = None) -> dict[str, str]:
    """`headers` plus x-amz-date, x-amz-content-sha256 (of an empty body), the session token if any, and the
    Authorization header that signs them all (every header sent is signed)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    out = {**headers, "x-amz-date": amz_date, "x-amz-content-sha256": EMPTY_SHA256}
    if token:
        out["x-amz-security-token"] = token
    signed = {name.lower(): " ".join(str(value).split()) for name, value in out.items()}
    signed["host"] = host
    names = sorted(signed)
    canonical = "\n".join([
        method, path,
        "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())),
        "".join(f"{n}:{signed[n]}\n" for n in names), ";".join(names), EMPTY_SHA256])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret_key}".encode(), day), region), "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={';'.join(names)}, "
                            f"Signature={signature}")
    return out


def _connect(scheme: str, host: str, timeout: float, context: ssl.SSLContext | None):
    """A connection to scheme://host, through the proxy the environment names for it (s3.proxy_for), as boto3
    and the native client go: a CONNECT tunnel for https, an absolute-form request for http. Returns the
    connection, what the request target starts with (the absolute URL's origin, through an http proxy) and the
    headers the proxy needs (Proxy-Authorization from the proxy URL's userinfo)."""
    proxy = proxy_for(f"{scheme}://{host}")
    if proxy is None:
        if scheme == "https":
            return http.client.HTTPSConnection(host, timeout=timeout, context=context), "", {}
        return http.client.HTTPConnection(host, timeout=timeout), "", {}
    parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    if parsed.scheme != "http":
        raise BadSetting(f"proxy {redact_uri(proxy)}: the native transport's HEAD requests go through http:// "
                         "proxies only (PREFETCH_TRANSPORT=boto3 for others)")
    auth = {}
    if parsed.username:
        token = base64.b64encode(f"{unquote(parsed.username)}:{unquote(parsed.password or '')}".encode()).decode()
        auth["Proxy-Authorization"] = f"Basic {token}"
    if scheme == "https":
        conn = http.client.HTTPSConnection(parsed.hostname, parsed.port or 80, timeout=timeout, context=context)
        conn.set_tunnel(host, headers=auth)
        return conn, "", {}
    return http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=timeout), f"http://{host}", auth


def head_object(endpoint: str | None, region: str, bucket: str, key: str, credentials, *, uri: str,
                part_number: int | None = None, checksums: bool = False, if_match: str | None = None,
                timeout: float = 30.0, verify_tls: bool = True, ca_bundle: str | None = None) -> dict:
    """HEAD one object (or one part of it); the answer's fields in boto3's shape. `credentials` has
    access_key / secret_key / token (botocore's frozen credentials, or the env keys in that shape); `ca_bundle`,
    a PEM file of CAs trusted beside the system's."""
    scheme, host, path = object_url(endpoint, region, bucket, key)
    query = {"partNumber": str(part_number)} if part_number else {}
    headers = {"Host": host}
    if checksums:
        headers["x-amz-checksum-mode"] = "ENABLED"
    if if_match:
        headers["If-Match"] = f'"{if_match}"'
    headers = sign("HEAD", host, path, query, headers, region, credentials.access_key, credentials.secret_key,
                   credentials.token)
    what = f"HEAD {key}" + (f" part {part_number}" if part_number else "")
    context = None
    if scheme == "https":
        context = ssl.create_default_context() if verify_tls else ssl._create_unverified_context()
        if verify_tls and ca_bundle:
            context.load_verify_locations(cafile=ca_bundle)
    conn, target_prefix, proxy_headers = _connect(scheme, host, timeout, context)
    target = path + ("?" + "&".join(f"{k}={quote(v)}" for k, v in query.items()) if query else "")
    try:
        conn.request("HEAD", target_prefix + target, headers={**headers, **proxy_headers})
        response = conn.getresponse()
        response.read()
        status, answer = response.status, {name.lower(): value for name, value in response.getheaders()}
    except ssl.SSLCertVerificationError:
        raise untrusted_certificate(uri) from None
    except (OSError, http.client.HTTPException) as e:
        raise TransientError(f"S3 connection failed ({what}: {type(e).__name__})", uri) from None
    finally:
        conn.close()
    if status == 412:
        raise OriginChanged(f"the object changed at the origin while we read it ({what})", uri)
    if status == 404:
        raise NotFound(f"no such S3 object ({what})", uri)
    if status in (401, 403):
        raise Unreachable(f"S3 refused the credentials ({status}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
                          uri)
    if status >= 500:
        raise TransientError(f"S3 answered {status} ({what})", uri)
    if status not in (200, 206):    # (a part's HEAD is answered 206, Partial Content)
        raise Unreachable(f"S3 error {status} ({what})", uri)
    out: dict = {field: answer[name] for name, field in _FIELDS.items() if name in answer}
    if "ContentLength" in out:
        out["ContentLength"] = int(out["ContentLength"])
    return out
