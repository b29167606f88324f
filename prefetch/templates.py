"""Model ids -> model URIs: one template (`models:/{model_id}@champion`) or an explicit mapping.

Used by the daemon (`prefetch daemon --model-template T --model-ids a,b,c` expands ids into its desired set)
and by `serving.MultiplexedModel` (a request's model id -> the URI it loads), so both agree on what an id
means. Syntax only: nothing here touches the network.
"""
from __future__ import annotations

import string
from typing import Iterable, Mapping

from .errors import BadURI

PLACEHOLDER = "model_id"


def check_template(template: str) -> str:
    """The template itself, or BadURI naming an unknown or malformed placeholder."""
    if not isinstance(template, str) or not template.strip():
        raise BadURI("the model template is empty (e.g. models:/{model_id}@champion)")
    template = template.strip()
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:   # an unmatched brace
        raise BadURI(f"malformed model template: {e}", template) from None
    unknown = sorted({f for f in fields if f != PLACEHOLDER})
    if unknown:
        shown = ", ".join("{" + f + "}" if f else "{}" for f in unknown)
        raise BadURI(f"unknown placeholder {shown} in the model template (only {{{PLACEHOLDER}}})", template)
    if not fields:
        raise BadURI(f"the model template has no {{{PLACEHOLDER}}} placeholder", template)
    return template


def uri_for(template: str, model_id: str) -> str:
    """The URI of one id: a syntactically valid URI, or BadURI (an id must not change the URI's shape)."""
    from .uri import parse

    if not isinstance(model_id, str) or not model_id.strip() or "/" in model_id or model_id != model_id.strip():
        raise BadURI(f"bad model id {model_id!r} (non-empty, no '/', no surrounding spaces)")
    uri = check_template(template).format(**{PLACEHOLDER: model_id})
    parse(uri)
    return uri


def expand(template: str, ids: Iterable[str]) -> list[str]:
    """The URIs of `ids` under `template`, in order, duplicates dropped. Raises BadURI on the first bad one."""
    check_template(template)
    return list(dict.fromkeys(uri_for(template, i) for i in ids))


def split_ids(text: str) -> list[str]:
    """`a,b, c` -> ["a", "b", "c"] (blanks dropped)."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def check_mapping(mapping: Mapping[str, str]) -> dict[str, str]:
    """An explicit {model_id: URI} map, every URI syntax-checked."""
    from .uri import parse

    if not isinstance(mapping, Mapping) or not mapping:
        raise BadURI("the model mapping must be a non-empty mapping of model ids to URIs")
    out: dict[str, str] = {}
    for model_id, uri in mapping.items():
        if not isinstance(model_id, str) or not model_id.strip():
            raise BadURI(f"bad model id {model_id!r} in the model mapping")
        if not isinstance(uri, str) or not uri.strip():
            raise BadURI(f"model id {model_id!r} maps to no URI")
        parse(uri.strip())
        out[model_id] = uri.strip()
    return out
