"""Credentials never reach the disk or the screen: one place strips them from URIs and from text naming URIs.

What counts as a credential in a URI:
- userinfo: `scheme://user:password@host/...` (requests and MLflow turn it into Basic auth);
- query parameters that carry a secret: `token`, `access_token`, `sig`, pre-signed S3 (`X-Amz-Signature`,
  `X-Amz-Credential`, `X-Amz-Security-Token`), Azure SAS (`sig`, `se`...), `password`, `api_key`, ...

Every URI that is stored (manifests, refs, pins, in-flight records, cache keys) or printed (errors, `--json`,
status, metrics, replica status routes) goes through `redact_uri` / `redact_text` / `redact_obj`. Redacting is
idempotent, so calling it twice on the way out costs nothing. The key of a model therefore does not depend on
the credentials used to reach it: the same model under two credentials is one object.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Query parameter names (lower case) whose value is a secret. Prefix matches catch `x-amz-*` variants.
_SECRET_PARAMS = frozenset({
    "token", "access_token", "refresh_token", "id_token", "auth", "authorization", "password", "passwd", "pwd",
    "secret", "client_secret", "api_key", "apikey", "key", "sig", "signature", "credential", "credentials",
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential",
    "sv", "se", "sp", "skoid", "sktid", "sks", "skv",       # Azure SAS: together they authorise a request
})
_SECRET_PREFIXES = ("x-amz-", "x-goog-")

# `scheme://userinfo@` inside any text (an error message, a log line). Userinfo never holds `/`, `@` or blanks.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@?#'\"]+)@")
# `?name=value` / `&name=value` with a secret name, inside any text.
_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[A-Za-z0-9_.-]+)=(?P<value>[^&\s#'\"]*)")


def is_secret_param(name: str) -> bool:
    low = name.lower()
    return low in _SECRET_PARAMS or low.startswith(_SECRET_PREFIXES)


def userinfo(uri: str) -> tuple[str, str] | None:
    """(user, password) from `scheme://user:password@host`, or None: what a client may send as auth to that
    very host, and nowhere else."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return None
    if parts.username is None and parts.password is None:
        return None
    from urllib.parse import unquote

    return unquote(parts.username or ""), unquote(parts.password or "")


def redact_uri(uri: str) -> str:
    """uri without userinfo and without secret query parameters (removed, so keys do not depend on them)."""
    if not isinstance(uri, str) or ("@" not in uri and "=" not in uri):
        return uri
    try:
        parts = urlsplit(uri)
        netloc = parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
        query = parts.query
        if query:
            kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if not is_secret_param(k)]
            query = urlencode(kept)
        if not parts.scheme:
            return redact_text(uri)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:   # not parseable as a URI (`s3://[b/x`): still strip what looks like a credential
        return redact_text(uri)


def redact_text(text: str) -> str:
    """text with the credentials of every URI it names removed (userinfo) or masked (secret parameters)."""
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: m.group("scheme"), text)

    def param(m: re.Match) -> str:
        return f"{m.group('sep')}{m.group('name')}=***" if is_secret_param(m.group("name")) else m.group(0)

    return _PARAM.sub(param, text)


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-like document (dicts, lists, tuples, strings) with every string passed through
    redact_text. For whole reports on their way out (--json, status)."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj) if isinstance(obj, list) else tuple(redact_obj(v) for v in obj)
    return obj


def same_host(a: str, b: str) -> bool:
    """Do two http(s) URLs name the same server (scheme, host and port)? Credentials for one never go to the
    other (an artifact URI may name any host)."""
    try:
        pa, pb = urlsplit(a), urlsplit(b)
        default = {"http": 80, "https": 443}
        return (pa.scheme.lower() == pb.scheme.lower() and (pa.hostname or "") == (pb.hostname or "")
                and (pa.port or default.get(pa.scheme.lower())) == (pb.port or default.get(pb.scheme.lower())))
    except ValueError:
        return False
