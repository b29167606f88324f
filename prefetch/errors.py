"""Every failure a user can cause or meet, each with its CLI exit code (DESIGN.md: Interfaces).

The CLI prints `str(error)` as one line and exits with `error.exit_code`; library callers catch
`PrefetchError` (or a subclass) and get the same message.
"""
from __future__ import annotations


class PrefetchError(Exception):
    """Base class: one clear line naming the URI and what was wrong. A subclass states its exit code in its
    class line (`class NotFound(PrefetchError, exit_code=3)`); one that does not keeps its base's."""

    exit_code = 1

    def __init_subclass__(cls, exit_code: int | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if exit_code is not None:
            cls.exit_code = exit_code

    def __init__(self, message: str, uri: str | None = None):
        from .redact import redact_text, redact_uri

        # Credentials never reach an error line (the message often names the tracking server or a URI).
        uri = redact_uri(uri) if isinstance(uri, str) else uri
        message = redact_text(str(message))
        self.uri = uri
        self.message = message
        super().__init__(f"{uri}: {message}" if uri else message)


# The exit codes of DESIGN.md, one class each.
class BadURI(PrefetchError, exit_code=2):
    """Malformed URI or bad usage."""


class BadSetting(BadURI):
    """A setting (PREFETCH_* variable, config file, AWS_PROFILE...) has a value that cannot work."""


class NotFound(PrefetchError, exit_code=3):
    """The registry or the storage answered, and the thing is not there."""


class Unreachable(PrefetchError, exit_code=4):
    """The tracking server or the artifact store could not be reached or refused us."""


class IntegrityError(PrefetchError, exit_code=5):
    """Sizes or hashes do not match, or a listing tries to escape its artifact dir."""


class NoSpace(PrefetchError, exit_code=6):
    """The node-local disk cannot hold the artifact, even after eviction."""


# Kinds of failure that share a code with one above (and are caught apart from it).
class OriginChanged(PrefetchError, exit_code=4):
    """The origin's object changed while we read it (HTTP 412 on an If-Match GET): the transfer restarts that
    file; it reaches the user (exit 4) only when the object keeps changing."""

    def __init__(self, message: str, uri: str | None = None, path: str | None = None):
        super().__init__(message, uri)
        self.path = path


class LocalIOError(PrefetchError):
    """The node's own disk refused us (unwritable cache dir, read-only mount...): the generic exit 1."""


class ConversionError(PrefetchError, exit_code=5):
    """A model could not be converted, or the converted model failed validation (exit 5, as integrity)."""


class UnsupportedFormat(BadURI):
    """The model's flavor cannot be converted to the asked format (exit 2, as bad usage)."""


# Failures where the origin may come back: a partial download is kept in staging to resume.
TransientOrUnreachable = (Unreachable,)


def one_line(e: BaseException, limit: int = 300, typed: bool = False) -> str:
    """The one line a user sees for an error: its first line, white space folded, at most `limit` characters.
    typed=True prefixes the exception's type for errors that are not ours (a bare KeyError says nothing)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    text = " ".join(lines[0].split()) if lines else ""
    if typed and not isinstance(e, PrefetchError):
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    text = text or type(e).__name__
    from .redact import redact_text

    text = redact_text(text)   # errors that are not ours (a requests exception) may name a URI with userinfo
    return text if len(text) <= limit else text[: limit - 3] + "..."


def exit_code_for(e: BaseException) -> int:
    """The CLI exit code for any exception: ours carry theirs; a full local disk is 6; anything else 1."""
    import errno

    if isinstance(e, PrefetchError):
        return e.exit_code
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace.exit_code
    return 1


def error_fields(e: BaseException) -> dict:
    """ok=False fields of a result row (a per-node table, a --json document) for an exception."""
    return {"ok": False, "error": one_line(e, limit=1000, typed=True), "exit_code": exit_code_for(e),
            "error_type": type(e).__name__}
