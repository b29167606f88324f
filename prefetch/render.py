"""Every rich table and event line the CLI prints. The library returns data (dicts, dataclasses); this module
turns it into text. It imports neither ray nor serving: it only formats what it is given."""
from __future__ import annotations


# --- local store: ls, verify, gc, pins, plan -----------------------------------------------------------------



# --- cluster: warm --cluster, status, daemon -----------------------------------------------------------------



# --- Serve control: rollout and watch events, app status -----------------------------------------------------
def serve_event_line(kind: str, f: dict, timestamped: bool = False) -> str | None:
    """One human line per rollout or watch event (None: nothing worth a line). The watch prints every line,
    its own and its rollouts', behind the time of day (timestamped=True)."""
    describe = _SERVE_EVENTS.get(kind)
    line = describe(f) if describe is not None else None
    if line is None or not timestamped:
        return line
    import time

    return f"{time.strftime('%H:%M:%S')} {line}"


def _resolved(f: dict) -> str:
    who = f" ({f['name']} v{f['version']})" if f.get("version") else ""
    return f"resolved {f['uri']} -> {f['pinned']}{who}" + (f"  [{f['note']}]" if f.get("note") else "")


def _app(f: dict) -> str:
    served = sorted({f"v{r['version']}" if r.get("version") else str(r.get("uri")) for r in f["replicas"]})
    return (f"app {f['app']} ({f['status']}): deployments {', '.join(f['deployments'])}, "
            f"{len(f['replicas'])} replicas on {', '.join(served) or '-'}")


def _warmed(f: dict) -> str:
    r = f["report"]
    hits = sum(1 for row in r["rows"] if row.get("hit"))
    return (f"warm: {len(r['rows'])}/{r['nodes']} nodes ok in {r['seconds']:.1f}s "
            f"({hits} already cached, {r['origin_bytes']} origin bytes)")


def _switching(f: dict) -> str:
    how = "user_config (hot swap via reconfigure)" if f["mode"] == "user_config" else "redeploy (rolling update)"
    return f"switching to {f['uri']}: {how}"


def _node_progress(n: dict) -> str:
    done = f"{100 * n['done'] / n['bytes']:.0f}%" if n.get("bytes") else f"{n.get('done') or 0} B"
    return f"{n['node_ip'] or n['node_id'][:8]} {done}"


def _served(f: dict) -> str:
    return ", ".join(f["served"]) or "nothing"


_SERVE_EVENTS = {
    # serving.control.rollout
    "resolved": _resolved,
    "app": _app,
    "unchanged": lambda f: f"every replica already serves {f['label']}: nothing to do",
    "warming": lambda f: f"warming {f['uri']} ({f['format']}) on every node...",
    "warm-progress": lambda f: "  " + ", ".join(_node_progress(n) for n in f["nodes"]),
    "warmed": _warmed,
    "validated": lambda f: f"validated: loads from the cache on a node in {f.get('load_seconds') or 0:.2f}s",
    "switching": _switching,
    "confirm-progress": lambda f: (f"  {f['on_new']}/{f['replicas']} replicas on the new version "
                                   f"(want {f['wanted']}; app {f['app_status']})"),
    "rolling-back": lambda f: f"rolling back: {f['reason']}",
    "done": lambda f: f"done: {f['replicas']} replicas serve {f['label']} ({f['seconds']:.1f}s in all)",
    # serving.control.watch
    "watching": lambda f: f"watching {f['uri']} for app {f['app']} every {f['interval']:g}s",
    "registry-error": lambda f: f"registry error (retrying in {f['retry_in']:g}s): {f['error']}",
    "serve-error": lambda f: f"cannot read the app's replicas (retrying in {f['retry_in']:g}s): {f['error']}",
    "moved": lambda f: f"{f['uri']} moved: v{f['from']} -> v{f['to']}",
    "in-sync": lambda f: f"in sync: app serves v{f['version']} ({f['uri']})",
    "waiting-for-move": lambda f: (f"{f['uri']} points at v{f['version']}; app serves {_served(f)}; "
                                   "waiting for the next move (--once-moved)"),
    "rolling-out": lambda f: f"app serves {_served(f)}; rolling out v{f['version']}",
    "rollout-failed": lambda f: (f"rollout of v{f['version']} failed (exit {f['exit_code']}; "
                                 f"retry in {f['retry_in']:g}s): {f['error']}"),
    "rolled-out": lambda f: f"v{f['version']} rolled out in {f['seconds']:.1f}s",
}


def render_app_status(doc: dict, console) -> None:
    """`prefetch status --app`: one row per replica (what it serves, from where), then the version tally."""
    from rich.table import Table

    table = Table(box=None)
    for name in ("deployment", "replica", "node", "model", "version", "format", "from cache", "error"):
        table.add_column(name, overflow="fold", no_wrap=name in ("replica", "node", "version"))
    for r in doc["replicas"]:
        err = r.get("error")
        table.add_row(r.get("deployment") or "-", r.get("replica") or "-", (r.get("node_id") or "-")[:12],
                      r.get("name") or r.get("uri") or "-", str(r.get("version") or "-"), r.get("format") or "-",
                      "yes" if r.get("from_cache") else "no",
                      f"[red]{err.get('uri')}: {err.get('message')}[/red]" if isinstance(err, dict) else "")
    console.print(table)
    versions = ", ".join(f"{v} x{n}" for v, n in doc["versions"].items()) or "no replica reports a model"
    console.print(f"app {doc['app']}: {doc['status']}; {len(doc['replicas'])} replicas: {versions}", highlight=False)
