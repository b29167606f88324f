"""`prefetch ...`: a thin shell over the library (no logic of its own).

Each command parses its arguments, calls one library function, renders the result (prefetch.render) or prints
it as JSON, and exits with the code the library's answer or error implies (prefetch.errors.exit_code_for).
A PrefetchError a command does not catch reaches main(), which prints it as one line.

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
from typing import Annotated, Callable, List, Optional

import typer

from . import render
from .errors import BadURI, PrefetchError, error_fields, exit_code_for, one_line
from .formats import FORMATS, NATIVE

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Node-local model artifact cache for Ray Serve.")
_state = {"debug": False}

# Options several commands share, declared once.
_FORMATS = " | ".join(FORMATS)
Format = Annotated[str, typer.Option("--format", "-f", help=_FORMATS)]
AppFormat = Annotated[Optional[str], typer.Option("--format", "-f", help=f"{_FORMATS} (default: the app's).")]
Tolerance = Annotated[Optional[float], typer.Option("--tolerance", help="Max abs error allowed when validating a "
                                                                      "conversion.")]
Deployment = Annotated[Optional[str], typer.Option("--deployment", help="The deployment to switch (default: every "
                                                                        "one with a model_uri).")]
Address = Annotated[Optional[str], typer.Option("--address", help="Ray cluster address; default: RAY_ADDRESS or auto.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def _console():
    from rich.console import Console

    from .redact import redact_text

    class _Redacting(Console):
        """Every line the CLI prints passes here: credentials in a URI never reach the terminal or a log."""

        def print(self, *objects, **kwargs):
            return super().print(*(redact_text(o) if isinstance(o, str) else o for o in objects), **kwargs)

    return _Redacting(stderr=True)


def _emit_json(doc) -> None:
    from .redact import redact_obj

    doc = redact_obj(json.loads(json.dumps(doc, default=str)))   # no credentials in --json either
    sys.stdout.write(json.dumps(doc, default=str, indent=None) + "\n")
    sys.stdout.flush()


def _fail(error: BaseException, text: str | None = None) -> "typer.Exit":
    """One line on stderr (text, else the error's own line), the error's exit code."""
    if _state["debug"]:
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    render.error(_console(), text or one_line(error, limit=1000, typed=True))
    return typer.Exit(exit_code_for(error))


def _finish(doc: dict, as_json: bool, show: Callable, code: int | None = None) -> None:
    """A report command's end: the JSON document or show(doc, console), then its exit code when not ok
    (code, else the report's own exit_code, else 1)."""
    if as_json:
        _emit_json(doc)
    else:
        show(doc, _console())
    if not doc.get("ok", True):
        raise typer.Exit(code or doc.get("exit_code") or 1)


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
    format: Format = NATIVE,
    cluster: bool = typer.Option(False, "--cluster", help="Warm on every node of the Ray cluster (one agent per node)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (with --cluster); default: RAY_ADDRESS or auto."),
    no_peers: bool = typer.Option(False, "--no-peers", help="With --cluster: every node downloads from the origin "
                                  "(default: one origin download, chunks shared between nodes; also PREFETCH_PEERS=0)."),
    tolerance: Tolerance = None,
    as_json: AsJson = False,
) -> None:
    """Resolve each URI and cache its artifacts on local disk, once, atomically."""
    from .api import check_format

    check_format(format)
    options = {"tolerance": tolerance} if tolerance is not None else {}
    if cluster:
        return _warm_cluster(uris, format, address, options, as_json, peers=not no_peers)
    from rich.markup import escape

    from .allocator import keep_freed_buffers
    from .api import warm as warm_one

    keep_freed_buffers()   # this process ends with its transfers (a library caller's process is left as it is)

    results, first_error = [], None
    for uri in uris:   # one URI failing does not stop the others: each gets its row, the first error its exit
        try:
            with _Bar(escape(f"warming {uri}"), enabled=not as_json) as bar:
                w = warm_one(uri, format=format, progress=bar, convert_options=options)
            results.append({"ok": True, **w.to_dict()})
            if not as_json:
                render.warmed(uri, w, _console())
        except PrefetchError as e:
            first_error = first_error or e
            results.append({"uri": uri, **error_fields(e)})
            if not as_json:
                _fail(e)
    if as_json:
        _emit_json({"results": results, "ok": first_error is None})
    if first_error is not None:
        raise typer.Exit(exit_code_for(first_error))


def _warm_cluster(uris, format, address, options, as_json, peers: bool) -> None:
    from .cluster.fanout import warm_cluster

    report = warm_cluster(uris, format=format, address=address, convert_options=options, peers=peers)
    _finish(report, as_json, render.render_warm_table)


@app.command()
def resolve(uri: str, as_json: AsJson = False) -> None:
    """Show what a URI resolves to (immutable version, storage, files) without moving any bytes."""
    from .uri import resolve as resolve_uri

    r = resolve_uri(uri)
    if as_json:
        return _emit_json(r.to_dict())
    render.resolved(r, _console())


@app.command("ls")
def ls_cmd(as_json: AsJson = False) -> None:
    """List cached objects: size, last use, pins and leases."""
    from .api import list_objects

    from .api import quarantined

    rows = list_objects()
    held = quarantined()
    if as_json:
        return _emit_json({"objects": rows, "bytes": sum(r["bytes"] for r in rows), "quarantined": held})
    render.objects_table(rows, _console(), held)


@app.command()
def verify(key: Optional[str] = typer.Argument(None, help="A key or unique key prefix; default: every object."),
           repair: bool = typer.Option(True, "--repair/--no-repair", help="Re-fetch damaged files from the origin."),
           as_json: AsJson = False) -> None:
    """Re-hash cached objects against their manifests; report (and repair) corruption."""
    from .api import quarantined
    from .api import verify as verify_objects
    from .errors import IntegrityError

    reports = verify_objects(key, repair=repair)
    ok = all(r.ok for r in reports)
    held = quarantined()
    if as_json:
        _emit_json({"objects": [r.to_dict() for r in reports], "ok": ok, "quarantined": held})
    else:
        render.verify_reports(reports, _console(), held)
    if not ok:
        raise typer.Exit(IntegrityError.exit_code)


@app.command()
def rm(key: str = typer.Argument(..., help="A key or unique key prefix."),
       as_json: AsJson = False) -> None:
    """Remove a cached object and what was derived from it."""
    from .api import remove

    full, freed = remove(key)
    if as_json:
        return _emit_json({"key": full, "freed_bytes": freed})
    render.removed(full, freed, _console())


# -- serving: plan (memory) ------------------------------------------------------------------------------------
@app.command()
def plan(uri: str = typer.Argument(..., help="The model: models:/..., runs:/..., s3://..., a path..."),
         replicas: int = typer.Option(..., "--replicas", "-n", help="How many replicas to plan for."),
         factor: float = typer.Option(2.0, "--factor", help="Memory per replica, as a multiple of the model size."),
         overhead: str = typer.Option("0", "--overhead", help="Fixed bytes per replica on top (e.g. 300MiB)."),
         fmt: str = typer.Option("native", "--format", help="The format the replicas load: native, onnx, torchscript."),
         address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to check against "
                                               "(default: RAY_ADDRESS if set; otherwise no cluster check)."),
         as_json: AsJson = False) -> None:
    """Memory per replica and in total, as ray_actor_options: measured (private per replica + one shared copy
    of the weights per node) once a replica loaded the model on this node, else factor x model_size_bytes.

    Exit 6 when a reachable cluster cannot admit that many replicas."""
    from .config import parse_bytes

    try:
        overhead_bytes = parse_bytes(overhead)
    except ValueError:
        raise BadURI(f"--overhead: '{overhead}' is not a size (e.g. 300MiB, 1G, 1000)") from None
    from serving.memory import cluster_too_small, plan as plan_memory

    doc = plan_memory(uri, replicas, factor, overhead_bytes=overhead_bytes, format=fmt,
                      address=address or os.environ.get("RAY_ADDRESS") or None)
    if as_json:
        _emit_json(doc)
    else:
        render.memory_plan(doc, _console())
    if cluster_too_small(doc):
        from .errors import NoSpace

        raise typer.Exit(NoSpace.exit_code)


# -- node agents: status, daemon ------------------------------------------------------------------------------
@app.command()
def status(address: Address = None,
           app_name: Optional[str] = typer.Option(None, "--app", help="Instead: the version each replica of this Serve app serves."),
           as_json: AsJson = False) -> None:
    """Every node's cache: agent, cache dir, objects, size, in-flight downloads with progress, desired set."""
    if app_name is not None:
        return _app_status(app_name, address, as_json)
    from .cluster.fanout import cluster_status

    _finish(cluster_status(address), as_json, render.render_status_table, code=1)


@app.command()
def daemon(
    models_file: Optional[str] = typer.Option(None, "--models-file", help="URIs to keep warm, one per line (# comments)."),
    model_template: Optional[str] = typer.Option(None, "--model-template", help="With --model-ids: a URI with {model_id}, e.g. models:/{model_id}@champion."),
    model_ids: Optional[str] = typer.Option(None, "--model-ids", help="Comma-separated ids expanded through --model-template into the set."),
    interval: float = typer.Option(60.0, "--interval", help="Seconds between re-resolutions of mutable URIs (@alias, latest, stages)."),
    once: bool = typer.Option(False, "--once", help="One warm pass on this node, wait for it, exit (nothing keeps running)."),
    clear: bool = typer.Option(False, "--clear", help="Forget the cluster's desired set (cached objects stay)."),
    format: Format = NATIVE,
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: RAY_ADDRESS or this node's."),
    as_json: AsJson = False,
) -> None:
    """Node start-up hook: keep this node (and every node that joins) warm with a declared set of URIs.

    The set comes from --models-file, --model-template with --model-ids (Serve multiplexing ids) and
    PREFETCH_MODELS (comma or newline separated). Returns quickly: this
    node's agent and the cluster's controller (detached Ray actors) keep going."""
    from .api import check_format
    from .cluster.desired import desired_uris

    check_format(format)
    if clear:
        from .cluster.fanout import clear_desired

        report = clear_desired(address)
    else:
        from .cluster.fanout import run_daemon

        if not interval > 0:
            raise BadURI(f"--interval must be a positive number of seconds, not {interval:g}")
        uris = desired_uris(models_file, model_template, model_ids)   # a typo fails here, before Ray is touched
        report = run_daemon(uris, interval=interval, once=once, address=address, format=format)

    _finish(report, as_json, render.render_daemon_report)


# -- lifecycle: gc, pin, unpin ---------------------------------------------------------------------------------
@app.command()
def gc(dry_run: bool = typer.Option(False, "--dry-run", help="Only print what would be removed."),
       staging_age: float = typer.Option(60.0, "--staging-age", help="Minutes a staging dir must sit untouched, "
                                         "with no live downloader, before it is removed (it could still resume)."),
       as_json: AsJson = False) -> None:
    """Enforce the cache cap now; remove stale staging dirs, dead leases, trash and orphaned derived artifacts."""
    from .api import gc as collect

    report = collect(dry_run=dry_run, staging_age=staging_age * 60)
    if as_json:
        return _emit_json(report.to_dict())
    render.gc_report(report, _console())


@app.command()
def pin(target: str = typer.Argument(..., help="A cached key (or unique prefix), or a URI."),
        warm_first: bool = typer.Option(True, "--warm/--no-warm", help="Warm a URI that is not cached yet "
                                        "(default), or only record the pin so a later warm is kept."),
        as_json: AsJson = False) -> None:
    """Keep an object whatever the cap. A URI not cached yet is pinned, then warmed (so nothing can evict it
    once committed); if that warm fails, the pin is taken back and the warm's error is reported."""
    from .api import pin as pin_target

    with _Bar(f"warming {target}", enabled=not as_json) as bar:
        pinned = pin_target(target, warm=warm_first, progress=bar)
    if as_json:
        return _emit_json(pinned.to_dict())
    render.pinned(pinned, _console())


@app.command()
def unpin(target: str = typer.Argument(..., help="A key (or unique prefix), or the URI it was pinned with."),
          as_json: AsJson = False) -> None:
    """Let a pinned object be evicted again (it stays cached until the cap needs its space)."""
    from .api import unpin as unpin_target

    keys = unpin_target(target)
    if as_json:
        return _emit_json({"target": target, "unpinned": keys})
    render.unpinned(target, keys, _console())


@app.command("metrics")
def metrics_cmd(port: Optional[int] = typer.Option(None, "--port", help="Serve /metrics on this port until "
                                                   "interrupted (0: any free port) instead of printing once."),
                addr: str = typer.Option("0.0.0.0", "--addr", help="Interface to listen on, with --port."),
                as_json: AsJson = False) -> None:
    """This node's metrics in Prometheus text format (store gauges; counters count this process only)."""
    from . import metrics

    if port is None:
        text = metrics.render().decode()
        if not as_json:
            sys.stdout.write(text)
            return
        return _emit_json({"metrics": render.metrics_samples(text)})
    server = metrics.start_http_server(port, addr=addr)
    if as_json:
        _emit_json({"url": server.url, "port": server.port})
    else:
        render.metrics_serving(server.url, _console())
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
        _emit_json(getattr(e, "report", {}) | error_fields(e) | {"stage": getattr(e, "stage", None)})
    return _fail(e)


@app.command()
def rollout(
    app_name: str = typer.Argument(..., metavar="APP", help="The running Serve application to switch."),
    model_uri: str = typer.Option(..., "--model-uri", help="The model to roll out (pinned to its version first)."),
    mode: str = typer.Option("user_config", "--mode", help="user_config: hot swap (reconfigure, same replicas); "
                             "redeploy: write the URI into --config and deploy it (rolling update)."),
    config: Optional[str] = typer.Option(None, "--config", help="Serve config file (serve deploy format): deployed with --mode redeploy; with the hot swap, the new URI is written into it too (comments kept)."),
    format: AppFormat = None,
    tolerance: Tolerance = None,
    deployment: Deployment = None,
    address: Address = None,
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds for every replica to report the new version."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Load the model once on a node before switching."),
    rollback: bool = typer.Option(True, "--rollback/--no-rollback", help="Put the previous config back if the switch is not confirmed."),
    as_json: AsJson = False,
) -> None:
    """Warm a model version on every node, validate it, then switch a Serve app to it and confirm every replica.

    Nothing in the running app changes unless the warm and the validation passed on every node."""
    from serving.control.rollout import rollout as roll_out

    from .render import serve_event_line

    options = {"tolerance": tolerance} if tolerance is not None else None
    try:
        report = roll_out(app_name, model_uri, mode=mode, config_path=config, format=format, convert_options=options,
                          deployment=deployment, address=address, timeout=timeout, validate=validate,
                          rollback=rollback, on_event=_printer(as_json, serve_event_line))
    except PrefetchError as e:
        raise _rollout_fail(e, as_json)
    if as_json:
        _emit_json(report)
    elif report.get("note"):
        render.note(_console(), report["note"])


@app.command()
def watch(
    uri: str = typer.Argument(..., help="models:/<name>@<alias>, models:/<name>/latest or models:/<name>/<stage>."),
    app_name: str = typer.Option(..., "--app", help="The Serve application that follows it."),
    interval: float = typer.Option(10.0, "--interval", help="Seconds between registry polls."),
    mode: str = typer.Option("user_config", "--mode", help="user_config (hot swap) or redeploy (with --config)."),
    config: Optional[str] = typer.Option(None, "--config", help="Serve config file: deployed with --mode redeploy, kept in step with the hot swap."),
    format: AppFormat = None,
    tolerance: Tolerance = None,
    deployment: Deployment = None,
    address: Address = None,
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

    from functools import partial

    from serving.control.watch import watch as follow

    from .render import serve_event_line

    stop = threading.Event()

    def on_signal(*_):
        if stop.is_set():          # a second Ctrl-C / SIGTERM: stop now, even mid-rollout
            raise KeyboardInterrupt
        stop.set()                 # the first: finish what is running (a rollout is never left half-done)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    options = {"tolerance": tolerance} if tolerance is not None else None
    summary = follow(uri, app_name, interval=interval, mode=mode, config_path=config, format=format,
                     convert_options=options, deployment=deployment, address=address, timeout=timeout,
                     once_moved=once_moved, max_rollouts=max_rollouts, duration=duration, stop=stop,
                     on_event=_printer(as_json, partial(serve_event_line, timestamped=True)))
    if as_json:
        _emit_json(summary)
    else:
        _console().print(f"stopped ({summary['stopped_by']}): {len(summary['rollouts'])} rollouts, "
                         f"{len(summary['failures'])} failed, {summary['errors']} registry/Serve errors in "
                         f"{summary['polls']} polls", highlight=False)


def _app_status(app_name: str, address: Optional[str], as_json: bool) -> None:
    """`prefetch status --app APP`: the version each replica of a Serve app serves."""
    from serving.control.apps import app_status

    _finish(app_status(app_name, address), as_json, render.render_app_status, code=1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except PrefetchError as e:   # what a command does not handle itself: one line, its own exit code
        raise SystemExit(_fail(e).exit_code)
    except OSError as e:
        # The local disk refused us (unwritable cache dir, read-only mount...): one line naming the path.
        from .errors import LocalIOError, NoSpace

        kind = NoSpace if e.errno == errno.ENOSPC else LocalIOError
        raise SystemExit(_fail(kind(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))).exit_code)
    except Exception as e:  # noqa: BLE001 - a bug or an input nobody foresaw: still one line (--debug: traceback)
        raise SystemExit(_fail(e).exit_code)


if __name__ == "__main__":
    main()
