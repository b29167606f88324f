"""`prefetch ...`: a thin shell over the library (no logic of its own).

Conventions (DESIGN.md): `--json` prints one JSON document on stdout; human output goes to stderr.
Errors are one line naming the URI, with the exit code of their kind (2 usage/URI, 3 not found,
4 unreachable, 5 integrity, 6 no space); a traceback only with --debug. Heavy modules (mlflow, ray, torch)
are imported inside the commands that need them, so a cache hit stays fast.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import List, Optional

import typer

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


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


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

# -- node agents: status, daemon ------------------------------------------------------------------------------

# -- lifecycle: gc, pin, unpin ---------------------------------------------------------------------------------

# -- rollout, watch --------------------------------------------------------------------------------------------


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
