"""The desired set: URIs a node keeps warm and pinned, mutable ones re-resolved every interval.

`DesiredSetLoop` is the background pass a node agent runs (one thread); it owns the set, the last result of each
URI and the pins it took (through lifecycle's pin()/unpin(): the pin files are the record, so an agent that was
restarted still finds what its predecessor pinned). The warming itself is the agent's: the loop is handed a
`warm_row(uri, format, settings) -> row` callable. Also here: what a models file or PREFETCH_MODELS declares
(`parse_models`, `load_models`) and the no-network URI check every entry point runs first (`validate_uris`).

Nothing here imports ray.
"""
from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ..config import Settings
from ..errors import BadURI, PrefetchError
from ..store.lifecycle import pin, pins, unpin
from ..store import Store
from ..uri import recheck

WarmRow = Callable[[str, str, Settings], dict]    # (uri, format, settings) -> a row with ok, key, ...


@dataclasses.dataclass(frozen=True)
class DesiredSet:
    uris: tuple[str, ...] = ()
    interval: float = 60.0
    format: str = "native"
    updated_at: float | None = None

    def to_dict(self) -> dict:
        return {"uris": list(self.uris), "interval": self.interval, "format": self.format,
                "updated_at": self.updated_at}


# -- pins kept by the desired set ------------------------------------------------------------------------------
def _pin(store: Store, key: str, uri: str) -> None:
    """Pin what the daemon keeps warm, so eviction never takes the desired set."""
    try:
        pin(store, key, uri=uri)
    except OSError:
        pass   # a pin is a protection, not a precondition of warming


def _unpin_stale(store: Store, uri: str, keep: str | None) -> list[str]:
    """Unpin the objects this URI was pinned for before (its alias moved, or it left the desired set).

    The pin files (`pins/<key>.json`, written by lifecycle.pin with the URI) are the record, so an agent that
    was restarted still finds what its predecessor pinned."""
    released = []
    for doc in pins(store):
        key = doc.get("key")
        if key and doc.get("uri") == uri and key != keep:
            try:
                if unpin(store, key):
                    released.append(key)
            except OSError:
                pass
    return released


def _mutable(uri: str) -> bool:
    try:
        from ..uri import parse

        return parse(uri).mutable
    except PrefetchError:
        return False


# -- the loop ----------------------------------------------------------------------------------------------------
class DesiredSetLoop:
    """The desired set of one node and the thread that keeps it warm. Thread safe."""

    def __init__(self, warm_row: WarmRow, settings: Settings):
        self._warm_row = warm_row
        self._settings = settings
        self._lock = threading.Lock()
        self._desired = DesiredSet()
        self._rows: dict[str, dict] = {}
        self._passes = 0
        self._last_pass: dict | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch-desired-set", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def set(self, uris: Iterable[str], interval: float = 60.0, format: str = "native") -> dict:
        """Keep these URIs warm (and pinned), re-resolving mutable ones every `interval` seconds.
        Idempotent: the same set again changes nothing (the controller pushes it on every tick)."""
        new = DesiredSet(tuple(dict.fromkeys(uris)), float(interval), format, time.time())
        with self._lock:
            old = self._desired
            changed = (new.uris, new.interval, new.format) != (old.uris, old.interval, old.format)
            if changed:
                self._desired = new
                for uri in set(old.uris) - set(new.uris):
                    self._rows.pop(uri, None)
        if changed:
            store = Store(self._settings.cache_dir)
            for uri in set(old.uris) - set(new.uris):
                _unpin_stale(store, uri, keep=None)
            self._wake.set()
        return self.current()

    def current(self) -> dict:
        with self._lock:
            return self._desired.to_dict()

    def status(self) -> dict:
        """The set, the passes so far, the last pass's summary and each URI's last row (for `prefetch status`)."""
        with self._lock:
            return self._desired.to_dict() | {"passes": self._passes, "last_pass": self._last_pass,
                                              "results": [dict(r) for r in self._rows.values()]}

    def sync(self, uris: Iterable[str] | None = None, format: str | None = None) -> dict:
        """One pass now over `uris` (default: the desired set), waited for: what `prefetch daemon --once` runs."""
        with self._lock:
            d = self._desired
        return self._pass(tuple(uris) if uris is not None else d.uris, format or d.format)

    def _pass(self, uris: tuple[str, ...], format: str) -> dict:
        # ref_ttl=0: each pass asks the registry where a mutable URI points now (one cheap call per URI), so a
        # moved alias is noticed within one interval; when the registry is down, the last ref is used.
        settings = dataclasses.replace(self._settings, ref_ttl=0.0)
        store = Store(settings.cache_dir)
        rows = []
        for uri in uris:
            if not _mutable(uri):
                recheck(uri, settings, store)   # a re-registered version becomes a new key (prefetch/uri.py)
            row = self._warm_row(uri, format, settings)
            if row["ok"]:
                _pin(store, row["key"], uri)
                if _mutable(uri):
                    row["unpinned"] = _unpin_stale(store, uri, keep=row["key"])
            rows.append(row)
            with self._lock:
                if uri in self._desired.uris:
                    self._rows[uri] = row
        summary = {"at": time.time(), "ok": all(r["ok"] for r in rows), "uris": len(rows),
                   "failed": sum(not r["ok"] for r in rows),
                   "origin_bytes": sum(r.get("origin_bytes") or 0 for r in rows)}
        with self._lock:
            self._passes += 1
            self._last_pass = summary
        return summary | {"rows": rows}

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                d = self._desired
            if d.uris:
                try:
                    self._pass(d.uris, d.format)
                except Exception as e:  # noqa: BLE001 - the loop must outlive any one bad pass
                    with self._lock:
                        self._last_pass = {"at": time.time(), "ok": False, "error": f"{type(e).__name__}: {e}"}
            self._wake.wait(d.interval if d.uris else 3600.0)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


# -- what the daemon is told to keep warm ------------------------------------------------------------------------
def parse_models(text: str) -> list[str]:
    """A desired set from a models file or PREFETCH_MODELS: URIs separated by newlines or commas; blank lines
    and `#` comments ignored; duplicates dropped, order kept."""
    uris: list[str] = []
    for line in text.splitlines():
        line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]   # a comment starts a line or follows a space
        for part in line.split(","):
            part = part.strip()
            if part:
                uris.append(part)
    return list(dict.fromkeys(uris))


def load_models(models_file: str | os.PathLike | None = None, env: dict[str, str] | Any = None) -> list[str]:
    """The daemon's desired set: the models file's URIs, then PREFETCH_MODELS's."""
    env = os.environ if env is None else env
    uris: list[str] = []
    if models_file is not None:
        path = Path(models_file).expanduser()
        try:
            uris += parse_models(path.read_text())
        except FileNotFoundError:
            raise BadURI("no such models file", str(path)) from None
        except OSError as e:
            raise BadURI(f"cannot read models file: {e.strerror or e}", str(path)) from None
    uris += parse_models(env.get("PREFETCH_MODELS", "") or "")
    return list(dict.fromkeys(uris))


def desired_uris(models_file: str | os.PathLike | None = None, model_template: str | None = None,
                 model_ids: str | None = None, env: dict[str, str] | Any = None) -> list[str]:
    """The daemon's whole desired set, checked (no network): the models file, the template's ids, PREFETCH_MODELS.
    BadURI when it is empty, when only one of template/ids is given, or when a URI does not parse."""
    from ..templates import expand, split_ids

    uris = load_models(models_file, env)
    if model_template is not None or model_ids is not None:
        if model_template is None or not split_ids(model_ids or ""):
            raise BadURI("--model-template and --model-ids go together (e.g. --model-ids a,b,c)")
        uris = list(dict.fromkeys(uris + expand(model_template, split_ids(model_ids))))
    if not uris:
        raise BadURI("no models to keep warm: give --models-file FILE, --model-template with --model-ids, "
                     "or set PREFETCH_MODELS")
    validate_uris(uris)
    return uris


def validate_uris(uris: Iterable[str]) -> None:
    """Parse each URI (no network): a typo fails here, on the caller, not on every node."""
    from ..uri import parse

    for uri in uris:
        parse(uri)
