"""`prefetch rollout`: warm a model version on every node first, then switch a running Serve app to it.

    rollout("fraud", "models:/fraud@champion")                      # hot swap: user_config + reconfigure()
    rollout("fraud", "models:/fraud/7", mode="redeploy", config_path="serve_config.yaml")   # rolling update

The steps, in order; everything before "switch" leaves the running app exactly as it was:
1. resolve the URI to an immutable version (ref TTL 0: where the alias points *now*) and pin it
   (`models:/<name>/<version>`), so every replica loads the same bytes even if the alias moves meanwhile;
2. look at the app (it exists; which deployments take `model_uri` in their user_config; their replicas publish
   what they serve, so the result can be confirmed);
3. warm the pinned version (and its format) on every alive node through the node agents, with progress;
4. validate: the conversion (if a format was asked) was validated on every node by the warm itself; then one
   throwaway Ray task loads the model from a node's cache, with the replicas' runtime_env;
5. switch: mode user_config = the app's declarative config, redeployed with the deployments' user_config
   pointing at the pinned URI (Serve calls reconfigure(), same replicas); mode redeploy = the pinned URI written
   into the Serve config file (where the file keeps it: app `args` and/or deployments' `user_config`), and that
   app's config deployed (new args = a new code version = Serve's rolling update: new replicas, then old ones
   drained);
6. confirm: every replica of those deployments reports the pinned version (serving.control.replicas)
   within the timeout. A replica that reports the swap failed, or an app that goes DEPLOY_FAILED, or the
   timeout, puts the previous config back (and the file's previous text) unless rollback=False.

How the switch reaches Serve (serving/control/apps.py): Serve's declarative API, re-applying every declarative
app's current config with only this app changed; refused if that set changed while we were warming. Apps started
with `serve.run` (imperative) keep no config to re-apply (or to roll back to): refused. The config file edit
(mode redeploy) is serving/control/config_file.py. Event lines for humans are drawn by prefetch.render.

`rollout()` composes the steps: check_args, plan (1-2), warm_and_validate (3-4), switch (5), confirm (6),
roll_back; each step takes the Plan the earlier ones filled in.

Ray and Serve are imported inside functions only (the CLI imports this module lazily anyway).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import threading
import time
from typing import Any, Callable, Iterable

from prefetch.errors import BadURI, PrefetchError, Unreachable, one_line
from prefetch.formats import FORMATS

from .apps import (AppView, apply_configs, declarative_configs, enum_value, inspect_app, replica_rows,
                   replica_summary, serve_details)
from .config_file import ConfigFile

MODES = ("user_config", "redeploy")
DEFAULT_TIMEOUT_S = 300.0
POLL_S = 0.5

Event = Callable[[str, dict], None]   # on_event(kind, fields): progress for the CLI, the watch and tests


class RolloutError(PrefetchError):
    """A rollout that did not happen (or was rolled back): one line, the exit code of the cause, the report so far."""

    def __init__(self, message: str, uri: str | None = None, *, exit_code: int = 1, stage: str = "",
                 report: dict | None = None):
        super().__init__(message, uri)
        self.exit_code = exit_code
        self.stage = stage
        self.report = report or {}


def _no_event(kind: str, fields: dict) -> None:
    pass


# -- 1. what to roll out ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    asked: str                      # the URI as given (may be an alias)
    pinned: str                     # what the app is switched to: models:/<name>/<version> when there is one
    kind: str
    name: str | None
    version: str | None
    key: str                        # the native object's cache key (as the resolving process computes it)
    format: str = "native"
    convert_options: dict = dataclasses.field(default_factory=dict)

    def label(self) -> str:
        return f"{self.name} v{self.version}" if self.version else self.pinned

    def served_by(self, row: dict, keys: Iterable[str] = ()) -> bool:
        """Does this replica status row (serving.control.replicas) serve this target?"""
        if (row.get("format") or "native") != self.format:
            return False
        if self.version is not None:
            return row.get("name") == self.name and str(row.get("version")) == str(self.version)
        return row.get("key") in set(keys) | {self.key}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def pinned_uri(resolved) -> str:
    """The immutable spelling of a resolved URI: a registry version by number; ids and paths stay as they are."""
    if resolved.kind.startswith("model_") and resolved.name and resolved.version:
        return f"models:/{resolved.name}/{resolved.version}"
    return resolved.uri


def resolve_target(uri: str, format: str = "native", convert_options: dict | None = None):
    """(Target, Resolved): ask the registry now (no cached ref), refuse a stale offline answer."""
    from prefetch.config import Settings
    from prefetch.uri import resolve

    r = resolve(uri, Settings.load(ref_ttl=0.0))
    if r.offline:
        raise Unreachable(f"the registry cannot be reached, so where this URI points now is unknown ({r.note}); "
                          "roll out a pinned version (models:/<name>/<version>) once it is back", uri)
    return Target(uri, pinned_uri(r), r.kind, r.name, r.version, r.key, format, dict(convert_options or {})), r


# -- 3. warm everywhere -------------------------------------------------------------------------------------------
def warm_everywhere(target: Target, address: str | None, emit: Event) -> dict:
    """warm_cluster for the pinned URI, with per-node progress events while it runs; raises on any failed row."""
    from prefetch.cluster.fanout import warm_cluster

    result: dict = {}

    def run():
        try:
            result["report"] = warm_cluster([target.pinned], format=target.format, address=address,
                                            convert_options=target.convert_options or None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e

    worker = threading.Thread(target=run, name="rollout-warm", daemon=True)
    worker.start()
    last = 0.0
    while worker.is_alive():
        worker.join(1.0)
        if worker.is_alive() and time.monotonic() - last >= 2.0:
            last = time.monotonic()
            progress = _warm_progress(target.pinned)
            if progress:
                emit("warm-progress", {"nodes": progress})
    if "error" in result:
        raise result["error"]
    report = result["report"]
    if not report["ok"]:
        bad = next(r for r in report["rows"] if not r.get("ok"))
        where = f"node {str(bad.get('node_id'))[:12]} ({bad.get('node_ip') or '?'})"
        more = f" (and {report['failed'] - 1} more nodes)" if report["failed"] > 1 else ""
        error = _without_uri(str(bad.get("error") or "?"), target.pinned)
        raise RolloutError(f"warm failed on {where}{more}: {error}", target.pinned,
                           exit_code=int(report.get("exit_code") or bad.get("exit_code") or 1), stage="warm",
                           report={"warm": report})
    return report


def _warm_progress(uri: str) -> list[dict]:
    """Bytes done per node for the warms of `uri` in flight now (from each agent's status); [] if unknown."""
    import ray

    from prefetch.cluster.agent import get_agent
    from prefetch.cluster.node import alive_nodes

    try:
        pending = {}
        for node in alive_nodes():
            handle = get_agent(node.node_id)
            if handle is not None:
                pending[handle.status.remote()] = node
        out = []
        for ref, node in pending.items():
            try:
                doc = ray.get(ref, timeout=5)
            except Exception:  # noqa: BLE001 - progress is best effort
                continue
            for a in doc.get("active") or []:
                if a.get("uri") == uri:
                    out.append({"node_id": node.node_id, "node_ip": node.node_ip, "done": a.get("done") or 0,
                                "bytes": a.get("bytes")})
        return out
    except Exception:  # noqa: BLE001
        return []


# -- 4. validate --------------------------------------------------------------------------------------------------
def start_validation(target: Target, node_id: str | None, runtime_env: dict | None):
    """Load the model once from a node's cache in a throwaway Ray task (with the replicas' runtime_env), so a
    version that warms but cannot be served (no MLmodel, an untrusted type...) is refused before the switch.

    Started alongside the warm: the task's worker start and imports overlap the download, and its own warm goes
    through the node's agent, so it shares the download rather than repeating it. Returns the task's ref."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {"num_cpus": 0, "max_retries": 0}
    if node_id:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)
    if runtime_env:
        options["runtime_env"] = runtime_env
    return ray.remote(_load_check).options(**options).remote(target.pinned, target.format,
                                                             target.convert_options or None)


def finish_validation(ref, target: Target, timeout: float) -> dict:
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        doc = ray.get(ref, timeout=timeout)
    except GetTimeoutError:
        ray.cancel(ref)   # still pending for sure; not forced (a forced cancel kills the worker mid-load)
        raise RolloutError(f"validation: loading the model took over {timeout:.0f}s", target.pinned,
                           stage="validate") from None
    except Exception as e:  # noqa: BLE001 - the task's worker died (OOM, a crash in native code)
        raise RolloutError(f"validation: the load check died: {one_line(e, typed=True)}", target.pinned,
                           stage="validate") from None
    if not doc.get("ok"):
        raise RolloutError(f"validation: the model does not load: {_without_uri(doc['error'], target.pinned)}",
                           target.pinned, exit_code=doc.get("exit_code") or 5, stage="validate")
    return doc


def _load_check(uri: str, format: str, convert_options: dict | None) -> dict:
    """Runs in a Ray task. Failures come back as data: an unread task error would be printed by Ray at exit
    (when the warm failed first and the rollout stops before reading this)."""
    try:
        from serving.loader import load_model

        model = load_model(uri, format, convert_options=convert_options, lease=False)
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": one_line(e, limit=1000, typed=True),
                "exit_code": getattr(e, "exit_code", 5) if isinstance(e, PrefetchError) else 5}
    info = model.info()
    return {"ok": True} | {k: info.get(k) for k in ("name", "version", "key", "format", "path", "from_cache",
                                                    "load_seconds")}


def _without_uri(message: str, uri: str) -> str:
    """A row's error names its URI first; our own line already does."""
    return message[len(uri) + 2:] if message.startswith(f"{uri}: ") else message


# -- 6. confirm ---------------------------------------------------------------------------------------------------
def confirm(app: str, deployments: list[str], target: Target, keys: Iterable[str], switched_at: float,
            timeout: float, emit: Event) -> list[dict]:
    """Wait until every replica of the deployments serves the target (and there are as many as Serve wants).
    Raises RolloutError on a replica that reports this swap failed, an app that failed to deploy, or the timeout."""
    keys = set(keys)
    deadline = time.monotonic() + timeout
    last_report = None
    while True:
        details = serve_details()
        doc = (details.get("applications") or {}).get(app)
        if doc is None:
            raise RolloutError(f"application '{app}' disappeared during the rollout", stage="confirm")
        status = enum_value(doc.get("status"))
        if status == "DEPLOY_FAILED":
            raise RolloutError(f"Serve failed to deploy '{app}': {one_line(Exception(doc.get('message') or '?'))}",
                               stage="confirm")
        rows = replica_rows(app, deployments)
        wanted = sum(int((doc["deployments"].get(d) or {}).get("target_num_replicas") or 0) for d in deployments)
        for r in rows:
            err = r.get("error") or {}
            if err.get("uri") == target.pinned and (err.get("at") or 0) >= switched_at - 1:
                raise RolloutError(f"replica {r.get('replica')} of {r.get('deployment')} could not load the new "
                                   f"version: {_without_uri(str(err.get('message')), target.pinned)}", target.pinned,
                                   exit_code=5, stage="confirm")
        on_new = [r for r in rows if target.served_by(r, keys)]
        progress = (len(on_new), len(rows), wanted)
        if progress != last_report:
            last_report = progress
            emit("confirm-progress", {"on_new": len(on_new), "replicas": len(rows), "wanted": wanted,
                                      "app_status": status})
        if rows and len(on_new) == len(rows) and len(rows) >= wanted and status == "RUNNING":
            return rows
        if time.monotonic() > deadline:
            raise RolloutError(f"after {timeout:.0f}s, {len(on_new)} of {len(rows)} replicas (of {wanted} wanted) "
                               f"serve {target.label()}; app status {status}", target.pinned, stage="confirm")
        time.sleep(POLL_S)


def _settle(app: str, deployments: list[str], target: Target, timeout: float) -> bool:
    """After a rollback: wait (bounded) until no replica still reports the failed swap to the target."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rows = replica_rows(app, deployments)
        except Exception:  # noqa: BLE001
            rows = []
        if rows and not any((r.get("error") or {}).get("uri") == target.pinned or target.served_by(r) for r in rows):
            return True
        time.sleep(POLL_S)
    return False


# -- the whole thing, step by step --------------------------------------------------------------------------------
class _Stopwatch:
    """Seconds per stage, for the report."""

    def __init__(self) -> None:
        self.started = self.last = time.monotonic()
        self.seconds: dict[str, float] = {}

    def untimed(self) -> None:
        """What ran since the last lap counts in the total only (the arguments' checks)."""
        self.last = time.monotonic()

    def lap(self, stage: str) -> None:
        now = time.monotonic()
        self.seconds[stage] = round(now - self.last, 3)
        self.last = now

    def total(self) -> None:
        self.seconds["total"] = round(time.monotonic() - self.started, 3)


@dataclasses.dataclass
class Plan:
    """What the rollout knows once it has looked (steps 1-2); the later steps read it and add to its report."""

    app: str
    mode: str
    target: Target                  # pinned, with the format and convert options the switch writes
    view: AppView
    details: dict                   # Serve's details at inspection: the declarative set the switch re-applies
    file: ConfigFile | None         # the Serve config file (--config): deployed in mode redeploy, kept in step in both
    values: dict                    # what the switch writes: model_uri, and format / convert_options when asked
    before: list[dict]              # replica status rows before the switch
    report: dict


@dataclasses.dataclass
class Switched:
    """What roll_back needs to undo a switch."""

    configs: dict[str, dict]        # the declarative set as it was
    target_capacity: float | None
    new_text: str | None            # the config file as written, with --config (its old text is plan.file.text)
    at: float                       # wall clock of the switch: replica errors from before it are not ours


def check_args(app: str, model_uri: str, mode: str, config_path: str | os.PathLike | None, format: str | None,
               timeout: float) -> ConfigFile | None:
    """Checks that need nothing but the arguments; the Serve config file for mode redeploy."""
    from prefetch.uri import parse

    if mode not in MODES:
        raise BadURI(f"unknown --mode '{mode}' (user_config or redeploy)")
    if format is not None and format not in FORMATS:
        raise BadURI(f"unknown --format '{format}' ({', '.join(FORMATS)})")
    if not timeout > 0:
        raise BadURI(f"--timeout must be a positive number of seconds, not {timeout:g}")
    parse(model_uri)
    if mode == "redeploy" and config_path is None:
        raise BadURI("--mode redeploy needs --config <serve config file>")
    # With a hot swap the file is kept in step too: a later `serve deploy FILE` must not roll the model back.
    return ConfigFile.load(config_path, app) if config_path is not None else None


def _look(app: str, deployment: str | None, address: str | None) -> tuple[dict, AppView, list[dict]]:
    """(Serve's details, the app, its replicas' status rows), or why it cannot be rolled out."""
    from prefetch.cluster.fanout import connect

    connect(address)
    details = serve_details()
    view = inspect_app(app, deployment, details)
    if view.config is None:
        # No config to update, and none to roll back to (re-applying the declarative set without it would
        # delete it once it became declarative).
        raise BadURI(f"application '{app}' was started with serve.run (imperative): Serve keeps no config to "
                     "update or to roll back to. Deploy it from a config file once (serve deploy FILE), then roll out")
    before = replica_rows(app, view.targets)
    missing = [d for d in view.targets if view.target_replicas(d) and not any(r["deployment"] == d for r in before)]
    if missing:
        raise BadURI(f"the replicas of {app}#{missing[0]} publish no model status, so the switch could not be "
                     "confirmed: is it a serving.RegistryModel deployment?")
    return details, view, before


def plan(app: str, model_uri: str, *, mode: str, file: ConfigFile | None, format: str | None,
         convert_options: dict | None, deployment: str | None, address: str | None, clock: _Stopwatch,
         emit: Event) -> Plan:
    """Steps 1-2: resolve and pin the URI, look at the app, settle the format (asked, else the app's)."""
    emit("resolving", {"uri": model_uri})
    target, resolved = resolve_target(model_uri, "native", convert_options)
    clock.lap("resolve")
    emit("resolved", {"uri": model_uri, "pinned": target.pinned, "name": target.name, "version": target.version,
                      "note": resolved.note})
    details, view, before = _look(app, deployment, address)
    live = view.user_config(view.targets[0])
    current = file.model_settings() if file is not None else live
    fmt = format or current.get("format") or live.get("format") or "native"
    options = {**(current.get("convert_options") or {}), **(convert_options or {})}
    target = dataclasses.replace(target, format=fmt, convert_options=options)
    values = {"model_uri": target.pinned}
    if format is not None or "format" in current:
        values["format"] = fmt
    if convert_options:
        values["convert_options"] = options
    report: dict[str, Any] = {
        "ok": False, "app": app, "mode": mode, "target": target.to_dict(), "deployments": view.targets,
        "previous": {"user_config": {d: view.user_config(d) for d in view.targets},
                     "replicas": [replica_summary(r) for r in before]},
        "switched": False, "changed": False, "seconds": clock.seconds}
    if file is not None:
        report["config_file"] = str(file.path)
    emit("app", {"app": app, "status": view.status, "deployments": view.targets,
                 "replicas": [replica_summary(r) for r in before], "format": fmt})
    return Plan(app, mode, target, view, details, file, values, before, report)


def already_serving(p: Plan) -> bool:
    """Every replica, every deployment's user_config (and the file, in mode redeploy) on the pinned target."""
    return bool(p.before and all(p.target.served_by(r) for r in p.before)
                and all(p.view.user_config(d).get("model_uri") == p.target.pinned for d in p.view.targets)
                and (p.file is None or p.file.model_settings().get("model_uri") == p.target.pinned))


def warm_and_validate(p: Plan, address: str | None, validate: bool, timeout: float, clock: _Stopwatch,
                      emit: Event) -> set[str]:
    """Steps 3-4: warm on every node (a conversion is validated on every node by the warm itself) while one
    task loads the model from a node's cache. Returns the cache keys the warm reported."""
    from prefetch.cluster.node import alive_nodes

    check = None
    if validate:
        nodes = alive_nodes()
        check = start_validation(p.target, nodes[0].node_id if nodes else None,
                                 p.view.runtime_env(p.view.targets[0]))
    try:
        emit("warming", {"uri": p.target.pinned, "format": p.target.format})
        warm = warm_everywhere(p.target, address, emit)
        p.report["warm"] = warm
        clock.lap("warm")
        emit("warmed", {"report": warm})
        if check is not None:
            p.report["validated"] = finish_validation(check, p.target, timeout)
            clock.lap("validate")
            emit("validated", p.report["validated"])
    except RolloutError as e:
        # A validation task still running is left to finish on its own (num_cpus=0, it ends with its warm):
        # cancelling a task that may be completing at that instant has crashed Ray's core worker here.
        e.report = p.report | e.report
        raise
    return {r.get("key") for r in warm["rows"] if r.get("key")}


def _new_app_config(p: Plan, configs: dict[str, dict]) -> tuple[dict, str | None]:
    """(the app's new declarative config, the config file's new text in mode redeploy)."""
    if p.mode == "user_config":
        new_app = copy.deepcopy(configs[p.app])
        overrides = new_app.setdefault("deployments", [])
        for d in p.view.targets:
            entry = next((o for o in overrides if o.get("name") == d), None)
            if entry is None:
                entry = {"name": d}
                overrides.append(entry)
            entry["user_config"] = {**p.view.user_config(d), **p.values}
        if p.file is None:
            return new_app, None
        new_text, _doc, note = p.file.with_model(p.values)   # the declarative source of truth follows
        if note:
            p.report["note"] = note
        return new_app, new_text
    new_text, new_doc, note = p.file.with_model(p.values)
    if ("args",) not in p.file.places:
        # Only user_config changes: Serve keeps the code version and reconfigures the running replicas.
        note = "; ".join(filter(None, [note, f"{p.file.path.name} keeps the model URI in user_config only, so "
                                       "Serve applies it as a hot swap (reconfigure), not a rolling update"]))
    if note:
        p.report["note"] = note
    return new_doc["applications"][p.file.index], new_text


def switch(p: Plan, emit: Event) -> Switched:
    """Step 5: re-apply the declarative set with this app on the target (and write the file, in mode redeploy),
    unless someone deployed while we were warming. Serve refusing it puts the file back."""
    details_now = serve_details()
    configs = declarative_configs(p.details)
    if declarative_configs(details_now) != configs:
        raise RolloutError("the Serve config changed while the model was warming (someone else deployed); "
                           "nothing was switched: run the rollout again", stage="switch", report=p.report)
    new_app, new_text = _new_app_config(p, configs)
    rolling = p.mode == "redeploy" and ("args",) in p.file.places
    p.report["switch"] = "rolling update" if rolling else "reconfigure"
    done = Switched(configs, details_now.get("target_capacity"), new_text, time.time())
    emit("switching", {"mode": p.mode, "uri": p.target.pinned})
    if new_text is not None:
        p.file.write(new_text)
    try:
        apply_configs([new_app if name == p.app else c for name, c in configs.items()], done.target_capacity)
    except Exception as e:
        if new_text is not None:
            p.file.write(p.file.text)
        raise RolloutError(f"Serve refused the new config: {one_line(e)}", p.target.pinned, stage="switch",
                           report=p.report) from None
    p.report |= {"switched": True, "changed": True}
    return done


def roll_back(p: Plan, done: Switched, timeout: float) -> None:
    """Put the previous config (and the file's previous text) back, then wait (bounded) for the replicas to
    settle; the outcome goes into the report, never raises."""
    try:
        if done.new_text is not None:
            p.file.write(p.file.text)
        apply_configs(list(done.configs.values()), done.target_capacity)
        p.report["rolled_back"] = True
        p.report["rollback_settled"] = _settle(p.app, p.view.targets, p.target, min(timeout, 60.0))
    except Exception as e:  # noqa: BLE001
        p.report["rollback_error"] = one_line(e, typed=True)


def rollout(app: str, model_uri: str, *, mode: str = "user_config", config_path: str | os.PathLike | None = None,
            format: str | None = None, convert_options: dict | None = None, deployment: str | None = None,
            address: str | None = None, timeout: float = DEFAULT_TIMEOUT_S, validate: bool = True,
            rollback: bool = True, on_event: Event | None = None) -> dict:
    """Warm `model_uri` on every node, validate it, then switch `app` to it and confirm every replica serves it.

    Returns the report: ok, app, mode, target (asked/pinned/name/version/format), previous (what replicas
    served), warm (warm_cluster's report), validated, switched, changed, replicas (rows after), seconds per
    stage, note. Raises a PrefetchError (exit code of its kind: 2 usage, 3 not found, 4 unreachable, 5 warm
    integrity / conversion / load, 6 no space) when it did not switch, or RolloutError after a rollback.
    """
    emit = on_event or _no_event
    clock = _Stopwatch()
    file = check_args(app, model_uri, mode, config_path, format, timeout)
    clock.untimed()
    p = plan(app, model_uri, mode=mode, file=file, format=format, convert_options=convert_options,
             deployment=deployment, address=address, clock=clock, emit=emit)
    if already_serving(p):
        clock.total()
        emit("unchanged", {"label": p.target.label()})
        return p.report | {"ok": True, "replicas": [replica_summary(r) for r in p.before],
                           "note": "already serving it"}
    clock.lap("inspect")
    keys = warm_and_validate(p, address, validate, timeout, clock, emit)
    done = switch(p, emit)
    clock.lap("switch")
    try:
        rows = confirm(app, p.view.targets, p.target, keys, done.at, timeout, emit)
    except RolloutError as e:
        clock.lap("confirm")
        if rollback:
            emit("rolling-back", {"reason": str(e)})
            roll_back(p, done, timeout)
        e.report = p.report | {"error": str(e)}
        e.args = (f"{e}{'; rolled back to the previous config' if p.report.get('rolled_back') else ''}",)
        raise
    clock.lap("confirm")
    clock.total()
    p.report |= {"ok": True, "replicas": [replica_summary(r) for r in rows]}
    emit("done", {"label": p.target.label(), "replicas": len(rows), "seconds": p.report["seconds"]["total"]})
    return p.report
