"""`prefetch ...`: a thin shell over the library (no logic of its own).

Conventions (DESIGN.md): `--json` prints one JSON document on stdout; human output goes to stderr.
Errors are one line naming the URI, with the exit code of their kind (2 usage/URI, 3 not found,
4 unreachable, 5 integrity, 6 no space); a traceback only with --debug. Heavy modules (mlflow, ray, torch)
are imported inside the commands that need them, so a cache hit stays fast.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import time
from typing import List, Optional

import typer

from .config import human_bytes
from .errors import BadURI, PrefetchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Node-local model artifact cache for Ray Serve.")
_state = {"debug": False}


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _emit_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, default=str, indent=None) + "\n")
    sys.stdout.flush()


def _fail(error: Exception) -> "typer.Exit":
    """One line on stderr, the error's exit code."""
    if _state["debug"]:
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    code = getattr(error, "exit_code", 1)
    _console().print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = time.time() - ts
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


class _Bar:
    """A rich progress bar on a terminal; silent otherwise (scripts, --json, CI logs)."""

    def __init__(self, label: str, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.label = label
        self.progress = self.task = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.progress = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(), console=_console(), transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task(self.label, total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, total=total)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    _state["debug"] = debug


# -- core ---------------------------------------------------------------------------------------------------
@app.command()
def warm(
    uris: List[str] = typer.Argument(..., help="models:/..., runs:/..., mlflow-artifacts:/..., s3://..., paths, fsspec URLs"),
    format: str = typer.Option("native", "--format", "-f", help="native | onnx | torchscript"),
    cluster: bool = typer.Option(False, "--cluster", help="Warm on every node of the Ray cluster (one agent per node)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (with --cluster); default: RAY_ADDRESS or auto."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Max abs error allowed when validating a conversion."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Resolve each URI and cache its artifacts on local disk, once, atomically."""
    if format not in ("native", "onnx", "torchscript"):
        raise _fail(BadURI(f"unknown --format '{format}' (native, onnx or torchscript)"))
    options = {"tolerance": tolerance} if tolerance is not None else {}
    if cluster:
        return _warm_cluster(uris, format, address, options, as_json)
    from .api import warm as warm_one

    results, first_error = [], None
    for uri in uris:
        try:
            with _Bar(f"warming {uri}", enabled=not as_json) as bar:
                w = warm_one(uri, format=format, progress=bar, convert_options=options)
            results.append({"ok": True, **w.to_dict()})
            if not as_json:
                state = "hit" if w.from_cache else f"fetched {human_bytes(w.origin_bytes)}"
                who = f" ({w.resolved.name} v{w.resolved.version})" if w.resolved.version else ""
                _console().print(f"{uri}{who}: {state} in {w.seconds:.2f}s -> {w.path}", highlight=False, soft_wrap=True)
                if w.resolved.note:
                    _console().print(f"[yellow]note:[/yellow] {w.resolved.note}", highlight=False, soft_wrap=True)
        except PrefetchError as e:
            first_error = first_error or e
            results.append({"ok": False, "uri": uri, "error": str(e), "exit_code": e.exit_code})
            if not as_json:
                _fail(e)
    if as_json:
        _emit_json({"results": results, "ok": first_error is None})
    if first_error is not None:
        raise typer.Exit(first_error.exit_code)


def _warm_cluster(uris, format, address, options, as_json) -> None:
    from .cluster import render_warm_table, warm_cluster

    try:
        report = warm_cluster(uris, format=format, address=address, convert_options=options)
    except PrefetchError as e:
        raise _fail(e)
    if as_json:
        _emit_json(report)
    else:
        render_warm_table(report, _console())
    if not report["ok"]:
        raise typer.Exit(report.get("exit_code", 1))


@app.command()
def resolve(uri: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show what a URI resolves to (immutable version, storage, files) without moving any bytes."""
    from .uri import resolve as resolve_uri

    try:
        r = resolve_uri(uri)
    except PrefetchError as e:
        raise _fail(e)
    doc = r.to_dict()
    if as_json:
        return _emit_json(doc)
    c = _console()
    for field in ("uri", "key", "kind", "name", "version", "run_id", "model_id", "storage_uri"):
        if doc.get(field) is not None:
            c.print(f"{field:>12}: {doc[field]}", highlight=False, soft_wrap=True)
    if r.files is not None:
        c.print(f"{'files':>12}: {len(r.files)} ({human_bytes(r.bytes)})", highlight=False)
    if r.note:
        c.print(f"[yellow]note:[/yellow] {r.note}", highlight=False, soft_wrap=True)


@app.command("ls")
def ls_cmd(as_json: bool = typer.Option(False, "--json")) -> None:
    """List cached objects: size, last use, pins and leases."""
    from .api import list_objects

    rows = list_objects()
    if as_json:
        return _emit_json({"objects": rows, "bytes": sum(r["bytes"] for r in rows)})
    from rich.table import Table

    table = Table("key", "uri", "version", "size", "last used", "pinned", "leases", box=None)
    for r in rows:
        table.add_row(r["key"], r["uri"], str(r.get("version") or "-"), human_bytes(r["bytes"]), _ago(r["last_used"]),
                      "yes" if r.get("pinned") else "", str(r.get("leases") or ""))
    _console().print(table)
    _console().print(f"{len(rows)} objects, {human_bytes(sum(r['bytes'] for r in rows))}", highlight=False)


@app.command()
def verify(key: Optional[str] = typer.Argument(None, help="A key or unique key prefix; default: every object."),
           repair: bool = typer.Option(True, "--repair/--no-repair", help="Re-fetch damaged files from the origin."),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """Re-hash cached objects against their manifests; report (and repair) corruption."""
    from .api import verify as verify_objects

    try:
        reports = verify_objects(key, repair=repair)
    except PrefetchError as e:
        raise _fail(e)
    ok = all(r.ok for r in reports)
    if as_json:
        _emit_json({"objects": [r.to_dict() for r in reports], "ok": ok})
    else:
        for r in reports:
            if not r.bad:
                _console().print(f"ok        {r.key} ({r.files} files)", highlight=False)
            else:
                state = "repaired" if r.repaired else "CORRUPT "
                _console().print(f"{state}  {r.key}: {', '.join(r.bad)}", highlight=False, soft_wrap=True)
    if not ok:
        raise typer.Exit(5)


@app.command()
def rm(key: str = typer.Argument(..., help="A key or unique key prefix."),
       as_json: bool = typer.Option(False, "--json")) -> None:
    """Remove a cached object and what was derived from it."""
    from .api import remove

    try:
        full, freed = remove(key)
    except PrefetchError as e:
        raise _fail(e)
    if as_json:
        return _emit_json({"key": full, "freed_bytes": freed})
    _console().print(f"removed {full} ({human_bytes(freed)})", highlight=False)


# -- serving: plan (memory) ------------------------------------------------------------------------------------
@app.command()
def plan(uri: str = typer.Argument(..., help="The model: models:/..., runs:/..., s3://..., a path..."),
         replicas: int = typer.Option(..., "--replicas", "-n", help="How many replicas to plan for."),
         factor: float = typer.Option(2.0, "--factor", help="Memory per replica, as a multiple of the model size."),
         overhead: str = typer.Option("0", "--overhead", help="Fixed bytes per replica on top (e.g. 300MiB)."),
         fmt: str = typer.Option("native", "--format", help="The format the replicas load: native, onnx, torchscript."),
         address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to check against "
                                               "(default: RAY_ADDRESS if set; otherwise no cluster check)."),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout.")) -> None:
    """Memory per replica and in total, as ray_actor_options: measured (private per replica + one shared copy
    of the weights per node) once a replica loaded the model on this node, else factor x model_size_bytes.

    Exit 6 when a reachable cluster cannot admit that many replicas."""
    from .config import parse_bytes

    try:
        overhead_bytes = parse_bytes(overhead)
    except ValueError:
        raise _fail(BadURI(f"--overhead: '{overhead}' is not a size (e.g. 300MiB, 1G, 1000)")) from None
    from serving.memory import plan as plan_memory

    try:
        doc = plan_memory(uri, replicas, factor, overhead_bytes=overhead_bytes, format=fmt,
                          address=address or os.environ.get("RAY_ADDRESS") or None)
    except PrefetchError as e:
        raise _fail(e)
    cluster = doc["cluster"]
    short = bool(cluster and cluster.get("reachable") and not cluster["fits"])
    if as_json:
        _emit_json(doc)
    else:
        c = _console()
        who = f" ({doc['name']} v{doc['version']})" if doc.get("version") else ""
        extra = f" + {human_bytes(overhead_bytes)}" if overhead_bytes else ""
        c.print(f"{uri}{who}: model {human_bytes(doc['model_bytes'])} ({doc['size_source']})", highlight=False,
                soft_wrap=True)
        how = "measured private" if doc["basis"] == "measured" else f"{factor:g}x, rule of thumb"
        c.print(f"per replica ({doc['format']}): {human_bytes(doc['per_replica_bytes'])} ({how}{extra})  ->  "
                f"ray_actor_options={{\"memory\": {doc['per_replica_bytes']}}}", highlight=False, soft_wrap=True)
        if doc["basis"] == "measured":
            c.print(f"shared once per node: {human_bytes(doc['shared_bytes'])} (mapped weights)", highlight=False)
        c.print(f"{replicas} replica{'s' if replicas != 1 else ''}: {human_bytes(doc['total_bytes'])} "
                f"({doc['basis_note']})", highlight=False, soft_wrap=True)
        if cluster and cluster.get("reachable"):
            verdict = "fits" if cluster["fits"] else "[red]does NOT fit[/red]"
            c.print(f"cluster {cluster['address']}: {len(cluster['nodes'])} node(s), "
                    f"{human_bytes(cluster['memory_bytes'])} of memory resource "
                    f"({human_bytes(cluster['available_memory_bytes'])} free): room for {cluster['replicas_fit']} "
                    f"such replicas -> {verdict}", highlight=False, soft_wrap=True)
        elif cluster:
            c.print(f"[yellow]note:[/yellow] no cluster check: {cluster['error']}", highlight=False, soft_wrap=True)
    if short:
        raise typer.Exit(6)


# -- node agents: status, daemon ------------------------------------------------------------------------------
@app.command()
def status(address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: RAY_ADDRESS or auto."),
           app_name: Optional[str] = typer.Option(None, "--app", help="Instead: the version each replica of this Serve app serves."),
           as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout.")) -> None:
    """Every node's cache: agent, cache dir, objects, size, in-flight downloads with progress, desired set."""
    if app_name is not None:
        return _app_status(app_name, address, as_json)
    from .cluster import cluster_status, render_status_table

    try:
        report = cluster_status(address)
    except PrefetchError as e:
        raise _fail(e)
    if as_json:
        _emit_json(report)
    else:
        render_status_table(report, _console())
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def daemon(
    models_file: Optional[str] = typer.Option(None, "--models-file", help="URIs to keep warm, one per line (# comments)."),
    interval: float = typer.Option(60.0, "--interval", help="Seconds between re-resolutions of mutable URIs (@alias, latest, stages)."),
    once: bool = typer.Option(False, "--once", help="One warm pass on this node, wait for it, exit (nothing keeps running)."),
    clear: bool = typer.Option(False, "--clear", help="Forget the cluster's desired set (cached objects stay)."),
    format: str = typer.Option("native", "--format", "-f", help="native | onnx | torchscript"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: RAY_ADDRESS or this node's."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Node start-up hook: keep this node (and every node that joins) warm with a declared set of URIs.

    The set comes from --models-file and PREFETCH_MODELS (comma or newline separated). Returns quickly: this
    node's agent and the cluster's controller (detached Ray actors) keep going."""
    from .agent import load_models

    try:
        if format not in ("native", "onnx", "torchscript"):
            raise BadURI(f"unknown --format '{format}' (native, onnx or torchscript)")
        if clear:
            from .controller import clear_desired

            report = clear_desired(address)
        else:
            if not interval > 0:
                raise BadURI(f"--interval must be a positive number of seconds, not {interval:g}")
            uris = load_models(models_file)
            if not uris:
                raise BadURI("no models to keep warm: give --models-file FILE or set PREFETCH_MODELS")
            from .agent import validate_uris
            from .controller import run_daemon

            validate_uris(uris)   # a typo fails here, before Ray is touched
            report = run_daemon(uris, interval=interval, once=once, address=address, format=format)
    except PrefetchError as e:
        raise _fail(e)
    if as_json:
        _emit_json(report)
    else:
        from .controller import render_daemon_report

        render_daemon_report(report, _console())
    if not report.get("ok", True):
        raise typer.Exit(report.get("exit_code", 1))


# -- lifecycle: gc, pin, unpin ---------------------------------------------------------------------------------
@app.command()
def gc(dry_run: bool = typer.Option(False, "--dry-run", help="Only print what would be removed."),
       staging_age: float = typer.Option(60.0, "--staging-age", help="Minutes a staging dir must sit untouched, "
                                         "with no live downloader, before it is removed (it could still resume)."),
       as_json: bool = typer.Option(False, "--json")) -> None:
    """Enforce the cache cap now; remove stale staging dirs, dead leases, trash and orphaned derived artifacts."""
    from . import lifecycle
    from .config import Settings
    from .store import Store

    settings = Settings.load()
    store = Store(settings.cache_dir)
    try:
        actions = lifecycle.gc(store, settings, dry_run=dry_run, staging_age=staging_age * 60)
    except PrefetchError as e:
        raise _fail(e)
    freed = sum(a.bytes for a in actions)
    used = lifecycle.usage(store).total
    over = bool(settings.max_bytes) and used > settings.max_bytes and not dry_run
    if as_json:
        return _emit_json({"dry_run": dry_run, "actions": [a.to_dict() for a in actions], "freed_bytes": freed,
                           "used_bytes": used, "max_bytes": settings.max_bytes, "over_cap": over})
    c = _console()
    verb = "would remove" if dry_run else "removed"
    for a in actions:
        c.print(f"{verb} {a.kind:<14} {a.target} ({human_bytes(a.bytes)}){'  ' + a.detail if a.detail else ''}",
                highlight=False, soft_wrap=True)
    cap = f" of a {human_bytes(settings.max_bytes)} cap" if settings.max_bytes else ""
    c.print(f"{verb} {len(actions)} item(s), {human_bytes(freed)}; cache holds {human_bytes(used)}{cap}",
            highlight=False)
    if over:
        c.print("[yellow]note:[/yellow] still over the cap: what is left is pinned, leased or being written",
                highlight=False)


@app.command()
def pin(target: str = typer.Argument(..., help="A cached key (or unique prefix), or a URI."),
        warm_first: bool = typer.Option(True, "--warm/--no-warm", help="Warm a URI that is not cached yet "
                                        "(default), or only record the pin so a later warm is kept."),
        as_json: bool = typer.Option(False, "--json")) -> None:
    """Keep an object whatever the cap. A URI not cached yet is pinned, then warmed (so nothing can evict it
    once committed); if that warm fails, the pin is taken back and the warm's error is reported."""
    from . import lifecycle
    from .config import Settings
    from .store import Store

    settings = Settings.load()
    store = Store(settings.cache_dir)
    warmed = None
    try:
        key, uri, cached = lifecycle.key_for(store, settings, target)
        added = lifecycle.pin(store, key, uri)
        if not cached and uri is not None and warm_first:
            from .api import warm as warm_one

            try:
                with _Bar(f"warming {uri}", enabled=not as_json) as bar:
                    warmed = warm_one(uri, settings=settings, progress=bar)
            except BaseException:
                if added:
                    lifecycle.unpin(store, key)
                raise
    except PrefetchError as e:
        raise _fail(e)
    cached = cached or warmed is not None
    if as_json:
        return _emit_json({"key": key, "uri": uri, "pinned": True, "newly_pinned": added, "cached": cached,
                           "warmed": warmed.to_dict() if warmed else None})
    state = "" if added else " (already pinned)"
    where = "" if cached else " - not cached yet; a later warm will be kept"
    fetched = f", fetched {human_bytes(warmed.origin_bytes)}" if warmed else ""
    _console().print(f"pinned {key}{state}{fetched}{where}", highlight=False, soft_wrap=True)


@app.command()
def unpin(target: str = typer.Argument(..., help="A key (or unique prefix), or the URI it was pinned with."),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Let a pinned object be evicted again (it stays cached until the cap needs its space)."""
    from . import lifecycle
    from .config import Settings
    from .store import Store

    settings = Settings.load()
    try:
        keys = lifecycle.unpin_target(Store(settings.cache_dir), settings, target)
    except PrefetchError as e:
        raise _fail(e)
    if as_json:
        return _emit_json({"target": target, "unpinned": keys})
    _console().print(f"unpinned {', '.join(keys)}" if keys else f"{target}: was not pinned", highlight=False,
                     soft_wrap=True)


@app.command("metrics")
def metrics_cmd(port: Optional[int] = typer.Option(None, "--port", help="Serve /metrics on this port until "
                                                   "interrupted (0: any free port) instead of printing once."),
                addr: str = typer.Option("0.0.0.0", "--addr", help="Interface to listen on, with --port."),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """This node's metrics in Prometheus text format (store gauges; counters count this process only)."""
    from . import metrics

    if port is None:
        text = metrics.render().decode()
        if not as_json:
            sys.stdout.write(text)
            return
        from prometheus_client.parser import text_string_to_metric_families

        return _emit_json({"metrics": [{"name": s.name, "labels": s.labels, "value": s.value}
                                       for fam in text_string_to_metric_families(text) for s in fam.samples]})
    server = metrics.start_http_server(port, addr=addr)
    if as_json:
        _emit_json({"url": server.url, "port": server.port})
    else:
        _console().print(f"serving {server.url} (Ctrl-C to stop)", highlight=False)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.close()


# -- rollout, watch --------------------------------------------------------------------------------------------
def _printer(as_json: bool, describe):
    """on_event for rollout/watch: one human line per event on stderr (none with --json)."""
    if as_json:
        return None
    console = _console()

    def on_event(kind: str, fields: dict) -> None:
        line = describe(kind, fields)
        if line:
            console.print(line, highlight=False, soft_wrap=True)
    return on_event


def _rollout_fail(e: PrefetchError, as_json: bool) -> "typer.Exit":
    if as_json:
        _emit_json(getattr(e, "report", {}) | {"ok": False, "error": str(e), "exit_code": e.exit_code,
                                               "stage": getattr(e, "stage", None)})
    return _fail(e)


@app.command()
def rollout(
    app_name: str = typer.Argument(..., metavar="APP", help="The running Serve application to switch."),
    model_uri: str = typer.Option(..., "--model-uri", help="The model to roll out (pinned to its version first)."),
    mode: str = typer.Option("user_config", "--mode", help="user_config: hot swap (reconfigure, same replicas); "
                             "redeploy: write the URI into --config and deploy it (rolling update)."),
    config: Optional[str] = typer.Option(None, "--config", help="Serve config file (serve deploy format), with --mode redeploy."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="native | onnx | torchscript (default: the app's)."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Max abs error allowed when validating a conversion."),
    deployment: Optional[str] = typer.Option(None, "--deployment", help="The deployment to switch (default: every one with a model_uri)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: RAY_ADDRESS or auto."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds for every replica to report the new version."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Load the model once on a node before switching."),
    rollback: bool = typer.Option(True, "--rollback/--no-rollback", help="Put the previous config back if the switch is not confirmed."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Warm a model version on every node, validate it, then switch a Serve app to it and confirm every replica.

    Nothing in the running app changes unless the warm and the validation passed on every node."""
    from . import rollout as ro

    options = {"tolerance": tolerance} if tolerance is not None else None
    try:
        report = ro.rollout(app_name, model_uri, mode=mode, config_path=config, format=format, convert_options=options,
                            deployment=deployment, address=address, timeout=timeout, validate=validate,
                            rollback=rollback, on_event=_printer(as_json, ro.describe_event))
    except PrefetchError as e:
        raise _rollout_fail(e, as_json)
    if as_json:
        _emit_json(report)
    elif report.get("note"):
        _console().print(f"[yellow]note:[/yellow] {report['note']}", highlight=False, soft_wrap=True)


@app.command()
def watch(
    uri: str = typer.Argument(..., help="models:/<name>@<alias>, models:/<name>/latest or models:/<name>/<stage>."),
    app_name: str = typer.Option(..., "--app", help="The Serve application that follows it."),
    interval: float = typer.Option(10.0, "--interval", help="Seconds between registry polls."),
    mode: str = typer.Option("user_config", "--mode", help="user_config (hot swap) or redeploy (with --config)."),
    config: Optional[str] = typer.Option(None, "--config", help="Serve config file, with --mode redeploy."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="native | onnx | torchscript (default: the app's)."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Max abs error allowed when validating a conversion."),
    deployment: Optional[str] = typer.Option(None, "--deployment", help="The deployment to switch (default: every one with a model_uri)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: RAY_ADDRESS or auto."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds for each rollout's confirmation."),
    once_moved: bool = typer.Option(False, "--once-moved", help="Act only when the URI moves after the watch "
                                    "started (default: also bring an app that serves another version in line)."),
    max_rollouts: Optional[int] = typer.Option(None, "--max-rollouts", help="Exit after this many rollouts."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Exit after this many seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout when it exits."),
) -> None:
    """Follow a registry alias (or latest, or a stage): every time it moves, roll the new version out.

    Registry outages and failed rollouts are logged and retried; SIGTERM or Ctrl-C stops it cleanly."""
    import signal
    import threading

    from . import watch as w

    stop = threading.Event()

    def on_signal(*_):
        if stop.is_set():          # a second Ctrl-C / SIGTERM: stop now, even mid-rollout
            raise KeyboardInterrupt
        stop.set()                 # the first: finish what is running (a rollout is never left half-done)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    options = {"tolerance": tolerance} if tolerance is not None else None
    try:
        summary = w.watch(uri, app_name, interval=interval, mode=mode, config_path=config, format=format,
                          convert_options=options, deployment=deployment, address=address, timeout=timeout,
                          once_moved=once_moved, max_rollouts=max_rollouts, duration=duration, stop=stop,
                          on_event=_printer(as_json, w.describe_event))
    except PrefetchError as e:
        raise _fail(e)
    if as_json:
        _emit_json(summary)
    else:
        _console().print(f"stopped ({summary['stopped_by']}): {len(summary['rollouts'])} rollouts, "
                         f"{len(summary['failures'])} failed, {summary['errors']} registry/Serve errors in "
                         f"{summary['polls']} polls", highlight=False)


def _app_status(app_name: str, address: Optional[str], as_json: bool) -> None:
    """`prefetch status --app APP`: the version each replica of a Serve app serves."""
    from .serve_app import app_status, render_app_status

    try:
        doc = app_status(app_name, address)
    except PrefetchError as e:
        raise _fail(e)
    if as_json:
        _emit_json(doc)
    else:
        render_app_status(doc, _console())
    if not doc["ok"]:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except PrefetchError as e:   # a command that let one through: still one line, its own exit code
        raise SystemExit(_fail(e).exit_code)
    except OSError as e:
        # The local disk refused us (unwritable cache dir, read-only mount...): one line naming the path.
        from .errors import LocalIOError, NoSpace

        kind = NoSpace if e.errno == errno.ENOSPC else LocalIOError
        raise SystemExit(_fail(kind(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))).exit_code)


if __name__ == "__main__":
    main()
