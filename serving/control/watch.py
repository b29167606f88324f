"""`prefetch watch`: follow a mutable registry URI (an alias, `latest`, a stage) and roll each move out.

Every `interval` seconds the registry is asked where the URI points now (ref TTL 0: one registry call, no
bytes). When that version differs from what the app's replicas serve (or, with once_moved, from where the URI
pointed when the watch started), the watch runs `serving.control.rollout.rollout` with the URI as asked, which pins
the version it resolves: every replica gets the same bytes even if the alias moves again meanwhile.

Nothing stops the loop but the caller: a registry outage (the registry cannot be reached, or answers with an
error), a Serve or Ray hiccup, and a failed rollout are logged as events and retried at the next poll (a version
whose rollout failed is retried with a growing back-off, so a version that cannot be served does not rebuild
the cache every interval). The caller stops it with `stop` (an Event), `max_rollouts` or `duration`.
Event lines for humans are drawn by prefetch.render (the same function as the rollout's).
"""
from __future__ import annotations

import threading
import time
from typing import Any

from prefetch.errors import BadURI, one_line

from .apps import AppView, inspect_app, replica_rows, replica_summary
from .rollout import DEFAULT_TIMEOUT_S, MODES, Event, _no_event, rollout

RETRY_BACKOFF_MAX_S = 600.0


def check_watchable(uri: str) -> None:
    """A registry URI that can move: models:/<name>@<alias>, models:/<name>/latest or models:/<name>/<stage>."""
    from prefetch.uri import parse

    target = parse(uri)
    if target.kind not in ("model_alias", "model_latest", "model_stage"):
        raise BadURI("watch follows a registry URI that can move: models:/<name>@<alias>, models:/<name>/latest "
                     "or models:/<name>/<stage>", uri)


def current_version(uri: str) -> dict:
    """Where the URI points now: one registry call, no cached ref, nothing written. Raises on an outage."""
    from prefetch.registry import model_version
    from prefetch.uri import parse

    target = parse(uri)
    mv = model_version(uri, target.name, stage=target.stage, alias=target.alias)
    return {"name": mv["name"], "version": mv["version"]}


class _Watch:
    """One watch's state between polls; poll() is one turn of the loop and says whether to wait before the next."""

    def __init__(self, uri: str, app: str, view: AppView, interval: float, once_moved: bool, rollout_args: dict,
                 emit: Event, stop: threading.Event):
        self.uri, self.app, self.view, self.interval, self.once_moved = uri, app, view, interval, once_moved
        self.rollout_args, self.emit, self.stop = rollout_args, emit, stop
        self.summary: dict[str, Any] = {"uri": uri, "app": app, "mode": rollout_args["mode"], "polls": 0,
                                        "errors": 0, "rollouts": [], "failures": [], "moves": [],
                                        "last_version": None, "stopped_by": None}
        self.baseline: str | None = None                  # once_moved: the version seen at the first good poll
        self.failed: dict[str, tuple[int, float]] = {}    # version -> (failures, monotonic time of the next try)
        self.quiet_state: tuple | None = None             # the last "nothing to do" state announced

    def poll(self) -> bool:
        """Ask the registry, compare with the replicas, roll out when wanted. True: wait an interval first."""
        self.summary["polls"] += 1
        try:
            now = current_version(self.uri)
        except Exception as e:  # noqa: BLE001 - an outage: log, wait, ask again
            return self._error("registry-error", {"uri": self.uri, "error": one_line(e), "retry_in": self.interval})
        version = now["version"]
        self._note_move(version)
        try:
            rows = replica_rows(self.app, self.view.targets)
        except Exception as e:  # noqa: BLE001 - Ray/Serve hiccup: same treatment as an outage
            return self._error("serve-error", {"app": self.app, "error": one_line(e), "retry_in": self.interval})
        served = sorted({f"v{r.get('version')}" if r.get("name") == now["name"]
                         else f"{r.get('name')} v{r.get('version')}" for r in rows})
        in_sync = bool(rows) and all(r.get("name") == now["name"] and str(r.get("version")) == version for r in rows)
        if in_sync or (self.once_moved and version == self.baseline):
            state = ("in-sync" if in_sync else "waiting-for-move", version, tuple(served))
            if state != self.quiet_state:   # one line per state, not one per poll
                self.quiet_state = state
                self.emit(state[0], {"uri": self.uri, "version": version, "served": served})
            return True
        self.quiet_state = None
        count, next_try = self.failed.get(version, (0, 0.0))
        if time.monotonic() < next_try:
            return True
        return self._roll_out(version, served, count)

    def _error(self, kind: str, fields: dict) -> bool:
        self.summary["errors"] += 1
        self.emit(kind, fields)
        return True

    def _note_move(self, version: str) -> None:
        last = self.summary["last_version"]
        if version != last:
            if last is not None:
                self.summary["moves"].append({"from": last, "to": version, "seen_at": time.time()})
                self.emit("moved", {"uri": self.uri, "from": last, "to": version})
            self.summary["last_version"] = version
        if self.baseline is None:
            self.baseline = version

    def _roll_out(self, version: str, served: list[str], count: int) -> bool:
        """A rollout of the URI as asked (it pins what it resolves); a failure backs off, never ends the watch."""
        self.emit("rolling-out", {"uri": self.uri, "version": version, "served": served})
        t0 = time.monotonic()
        try:
            report = rollout(self.app, self.uri, on_event=self.emit, **self.rollout_args)
        except Exception as e:  # noqa: BLE001 - a failed rollout is retried later, never the end of the watch
            count += 1
            backoff = min(RETRY_BACKOFF_MAX_S, self.interval * (2 ** count))
            self.failed[version] = (count, time.monotonic() + backoff)
            fail = {"version": version, "error": one_line(e), "exit_code": getattr(e, "exit_code", 1),
                    "at": time.time(), "retry_in": backoff}
            self.summary["failures"].append(fail)
            self.emit("rollout-failed", fail)
            return True
        self.failed.pop(version, None)
        self.baseline = report["target"]["version"] or version
        self.summary["rollouts"].append({"version": report["target"]["version"],
                                         "pinned": report["target"]["pinned"],
                                         "seconds": round(time.monotonic() - t0, 3), "at": time.time(),
                                         "changed": report["changed"], "replicas": report.get("replicas", [])})
        self.emit("rolled-out", {"version": report["target"]["version"], "seconds": round(time.monotonic() - t0, 3)})
        return False


def watch(uri: str, app: str, *, interval: float = 10.0, mode: str = "user_config", config_path: str | None = None,
          format: str | None = None, convert_options: dict | None = None, deployment: str | None = None,
          address: str | None = None, timeout: float = DEFAULT_TIMEOUT_S, once_moved: bool = False,
          max_rollouts: int | None = None, duration: float | None = None, stop: threading.Event | None = None,
          on_event: Event | None = None) -> dict:
    """Poll `uri` and roll it out to `app` whenever it points elsewhere than what the app serves.

    Returns a summary when stopped: {polls, errors, rollouts: [reports], failures: [...], moves: [...],
    last_version, stopped_by}. Raises only for bad arguments or an app that does not exist at start.
    """
    from prefetch.cluster.fanout import connect

    check_watchable(uri)
    if mode not in MODES:
        raise BadURI(f"unknown --mode '{mode}' (user_config or redeploy)")
    if not interval > 0:
        raise BadURI(f"--interval must be a positive number of seconds, not {interval:g}")
    if mode == "redeploy" and config_path is None:
        raise BadURI("--mode redeploy needs --config <serve config file>")
    emit = on_event or _no_event
    stop = stop or threading.Event()
    connect(address)
    view = inspect_app(app, deployment)           # a typo'd app name fails now, not at the first move
    started = time.monotonic()
    rollout_args = {"mode": mode, "config_path": config_path, "format": format, "convert_options": convert_options,
                    "deployment": deployment, "address": address, "timeout": timeout}
    w = _Watch(uri, app, view, interval, once_moved, rollout_args, emit, stop)
    emit("watching", {"uri": uri, "app": app, "interval": interval, "deployments": view.targets})

    def should_stop() -> str | None:
        if stop.is_set():
            return "stop"
        if max_rollouts is not None and len(w.summary["rollouts"]) >= max_rollouts:
            return "max_rollouts"
        if duration is not None and time.monotonic() - started >= duration:
            return "duration"
        return None

    while (why := should_stop()) is None:
        if w.poll():
            stop.wait(interval)
    summary = w.summary
    summary["stopped_by"] = why
    summary["seconds"] = round(time.monotonic() - started, 3)
    try:
        summary["replicas"] = [replica_summary(r) for r in replica_rows(app, view.targets)]
    except Exception:  # noqa: BLE001
        pass
    return summary
