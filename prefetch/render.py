"""Every rich table and event line the CLI prints. The library returns data (dicts, dataclasses); this module
turns it into text. It imports neither ray nor serving: it only formats what it is given."""
from __future__ import annotations


# --- local store: ls, verify, gc, pins, plan -----------------------------------------------------------------
import time  # noqa: E402  (kept in this section so each section merges on its own)

from rich.markup import escape  # noqa: E402

from .config import human_bytes  # noqa: E402


def ago(ts: float | None) -> str:
    """A timestamp as "3h ago" ("-" for never)."""
    if not ts:
        return "-"
    s = time.time() - ts
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def _line(console, text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)


def note(console, text: str) -> None:
    _line(console, f"[yellow]note:[/yellow] {escape(text)}")


def error(console, text: str) -> None:
    # The message is text, never markup: a URI like models:/[/x] must print as typed, not crash rich.
    _line(console, f"[red]error:[/red] {escape(text)}")


def warmed(uri: str, w, console) -> None:
    """`prefetch warm` (one URI, this node): hit or fetched, how long, where it landed."""
    state = "hit" if w.from_cache else f"fetched {human_bytes(w.origin_bytes)}"
    who = f" ({w.resolved.name} v{w.resolved.version})" if w.resolved.version else ""
    _line(console, escape(f"{uri}{who}: {state} in {w.seconds:.2f}s -> {w.path}"))
    if w.resolved.note:
        note(console, w.resolved.note)


def resolved(r, console) -> None:
    """`prefetch resolve`: the identity fields that are set, the file count and size if listed."""
    doc = r.to_dict()
    for field in ("uri", "key", "kind", "name", "version", "run_id", "model_id", "storage_uri"):
        if doc.get(field) is not None:
            _line(console, escape(f"{field:>12}: {doc[field]}"))
    if r.files is not None:
        console.print(f"{'files':>12}: {len(r.files)} ({human_bytes(r.bytes)})", highlight=False)
    if r.note:
        note(console, r.note)


def objects_table(rows: list[dict], console, quarantined: list[dict] = ()) -> None:
    """`prefetch ls`: one row per cached object, then the totals, then what was quarantined."""
    from rich.table import Table

    table = Table("key", "uri", "version", "size", "last used", "pinned", "leases", box=None)
    for r in rows:
        table.add_row(r["key"], escape(r["uri"] or ""), str(r.get("version") or "-"), human_bytes(r["bytes"]),
                      ago(r["last_used"]), "yes" if r.get("pinned") else "", str(r.get("leases") or ""))
    console.print(table)
    console.print(f"{len(rows)} objects, {human_bytes(sum(r['bytes'] for r in rows))}", highlight=False)
    for q in quarantined:
        _line(console, f"[yellow]quarantined:[/yellow] {escape(str(q['key']))}: {escape(str(q['reason']))} "
                       f"({escape(str(q['path']))})")


def verify_reports(reports, console, quarantined: list[dict] = ()) -> None:
    """`prefetch verify`: ok, repaired or CORRUPT per object, then what was quarantined."""
    for r in reports:
        if not r.bad:
            console.print(f"ok        {r.key} ({r.files} files)", highlight=False)
        else:
            state = "repaired" if r.repaired else "CORRUPT "
            _line(console, escape(f"{state}  {r.key}: {', '.join(r.bad)}"))
    for q in quarantined:
        _line(console, escape(f"quarantined {q['key']}: {q['reason']}"))


def removed(key: str, freed: int, console) -> None:
    console.print(f"removed {key} ({human_bytes(freed)})", highlight=False)


def gc_report(report, console) -> None:
    """`prefetch gc`: every action, the totals against the cap, and a note when the cap still cannot be met."""
    verb = "would remove" if report.dry_run else "removed"
    for a in report.actions:
        _line(console, f"{verb} {a.kind:<14} {a.target} ({human_bytes(a.bytes)}){'  ' + a.detail if a.detail else ''}")
    cap = f" of a {human_bytes(report.max_bytes)} cap" if report.max_bytes else ""
    console.print(f"{verb} {len(report.actions)} item(s), {human_bytes(report.freed_bytes)}; cache holds "
                  f"{human_bytes(report.used_bytes)}{cap}", highlight=False)
    if report.over_cap:
        console.print("[yellow]note:[/yellow] still over the cap: what is left is pinned, leased or being written",
                      highlight=False)


def pinned(p, console) -> None:
    """`prefetch pin`: the key, whether it was new, what the warm fetched, or that nothing is cached yet."""
    state = "" if p.newly_pinned else " (already pinned)"
    where = "" if p.cached else " - not cached yet; a later warm will be kept"
    fetched = f", fetched {human_bytes(p.warmed.origin_bytes)}" if p.warmed else ""
    _line(console, f"pinned {p.key}{state}{fetched}{where}")


def unpinned(target: str, keys: list[str], console) -> None:
    _line(console, f"unpinned {', '.join(keys)}" if keys else f"{target}: was not pinned")


def memory_plan(doc: dict, console) -> None:
    """`prefetch plan`: model size, per replica (as ray_actor_options), the shared copy, total, the cluster's verdict."""
    who = f" ({doc['name']} v{doc['version']})" if doc.get("version") else ""
    extra = f" + {human_bytes(doc['overhead_bytes'])}" if doc["overhead_bytes"] else ""
    replicas = doc["replicas"]
    _line(console, escape(f"{doc['uri']}{who}: model {human_bytes(doc['model_bytes'])} ({doc['size_source']})"))
    how = "measured private" if doc.get("basis") == "measured" else f"{doc['factor']:g}x, rule of thumb"
    fmt = f" ({doc['format']})" if doc.get("format") else ""
    _line(console, f"per replica{fmt}: {human_bytes(doc['per_replica_bytes'])} ({how}{extra})  ->  "
                   f"ray_actor_options={{\"memory\": {doc['per_replica_bytes']}}}")
    if doc.get("basis") == "measured":
        console.print(f"shared once per node: {human_bytes(doc['shared_bytes'])} (mapped weights)", highlight=False)
    basis = f" ({doc['basis_note']})" if doc.get("basis_note") else ""
    _line(console, f"{replicas} replica{'s' if replicas != 1 else ''}: {human_bytes(doc['total_bytes'])}{basis}")
    cluster = doc["cluster"]
    if cluster and cluster.get("reachable"):
        verdict = "fits" if cluster["fits"] else "[red]does NOT fit[/red]"
        _line(console, f"cluster {cluster['address']}: {len(cluster['nodes'])} node(s), "
                       f"{human_bytes(cluster['memory_bytes'])} of memory resource "
                       f"({human_bytes(cluster['available_memory_bytes'])} free): room for {cluster['replicas_fit']} "
                       f"such replicas -> {verdict}")
    elif cluster:
        note(console, f"no cluster check: {cluster['error']}")


def metrics_samples(text: str) -> list[dict]:
    """Prometheus text as --json rows: name, labels, value per sample."""
    from prometheus_client.parser import text_string_to_metric_families

    return [{"name": s.name, "labels": s.labels, "value": s.value}
            for fam in text_string_to_metric_families(text) for s in fam.samples]


def metrics_serving(url: str, console) -> None:
    console.print(f"serving {url} (Ctrl-C to stop)", highlight=False)




# --- cluster: warm --cluster, status, daemon -----------------------------------------------------------------

def _node_label(row: dict) -> str:
    head = " (head)" if row.get("is_head") else ""
    return f"{(row.get('node_id') or '?')[:12]}{head}"


def render_warm_table(report: dict, console) -> None:
    """prefetch.cluster.warm_cluster's report, one row per (node, URI): version, size, seconds, hit/miss, error."""
    from rich.table import Table

    from .config import human_bytes as _human

    table = Table(box=None)
    for name in ("node", "ip", "uri", "version", "size", "seconds", "result", "origin", "peers", "error"):
        table.add_column(name, no_wrap=name not in ("uri", "error"), overflow="fold")
    for r in report["rows"]:
        if r.get("ok"):
            table.add_row(_node_label(r), r.get("node_ip") or "-", r["uri"], str(r.get("version") or "-"),
                          _human(r.get("bytes")), f"{r.get('seconds', 0):.2f}", "hit" if r.get("hit") else "miss",
                          _human(r.get("origin_bytes")), _human(r.get("peer_bytes") or 0), "")
        else:
            table.add_row(_node_label(r), r.get("node_ip") or "-", r["uri"], "-", "-",
                          f"{r['seconds']:.2f}" if r.get("seconds") is not None else "-", "[red]FAILED[/red]", "-",
                          "-", r.get("error") or "")
    console.print(table)
    ok = len(report["rows"]) - report.get("failed", 0)
    console.print(f"{ok}/{len(report['rows'])} ok on {report['nodes']} nodes in {report['seconds']:.1f}s; "
                  f"origin bytes for the cluster: {_human(report['origin_bytes'])}, "
                  f"from peers: {_human(report.get('peer_bytes') or 0)}", highlight=False)


def render_status_table(report: dict, console) -> None:
    """prefetch.cluster.cluster_status's report: one row per node (agent, cache dir, objects, in flight, set)."""
    from rich.table import Table

    from .config import human_bytes as _human

    table = Table(box=None)
    for name in ("node", "ip", "agent", "cache dir", "objects", "size", "origin", "peers in/out", "in flight",
                 "desired set"):
        table.add_column(name, no_wrap=name in ("node", "ip", "objects", "size", "origin", "peers in/out"),
                         overflow="fold")
    for r in report["nodes"]:
        inflight = []
        for d in r.get("inflight") or []:
            pct = f"{d['progress'] * 100:.0f}%" if d.get("progress") is not None else "?"
            state = "" if d.get("alive") else " (stalled)"
            inflight.append(f"{d.get('uri')} {pct} of {_human(d.get('bytes'))}{state}")
        desired = r.get("desired") or {}
        if desired.get("uris"):
            last = desired.get("last_pass") or {}
            mark = "ok" if last.get("ok") else (f"{last.get('failed', '?')} failed" if last else "pending")
            desired_text = f"{len(desired['uris'])} URIs every {desired.get('interval'):g}s: {mark}"
        else:
            desired_text = "-"
        agent = r.get("agent", "-") if r.get("ok") else f"[red]{r.get('agent', '-')}[/red]: {r.get('error')}"
        moved = r.get("transfer") or {}     # since the agent started (prefetch/cluster/peers.py counters)
        peers = f"{_human(moved.get('peer_bytes_in'))} / {_human(moved.get('peer_bytes_out'))}" if moved else "-"
        table.add_row(_node_label(r), r.get("node_ip") or "-", agent, r.get("cache_dir") or "-",
                      str(r.get("objects") if r.get("objects") is not None else "-"), _human(r.get("bytes")),
                      _human(moved.get("origin_bytes")) if moved else "-", peers,
                      "\n".join(inflight) or "-", desired_text)
    console.print(table)
    console.print(f"{len(report['nodes'])} nodes, {report['objects']} objects, {_human(report['bytes'])} cached, "
                  f"{report['inflight']} downloads in flight", highlight=False)
    for r in report["nodes"]:
        for q in r.get("quarantined") or []:   # objects whose manifest could not be read (store/quarantine.py)
            _line(console, escape(f"quarantined on {r.get('node_ip') or '-'}: {q.get('key')}: {q.get('reason')}"))


def render_daemon_report(report: dict, console) -> None:
    """prefetch.cluster.run_daemon's report (once: the node's warm table; declare: one line) or clear_desired's."""
    if report.get("mode") == "once":
        render_warm_table({"rows": [r | {"node_ip": report.get("node_ip")} for r in report["rows"]],
                           "nodes": 1, "failed": sum(not r["ok"] for r in report["rows"]),
                           "seconds": sum(r.get("seconds") or 0 for r in report["rows"]),
                           "origin_bytes": report.get("origin_bytes", 0)}, console)
        return
    if "agents_cleared" in report:
        console.print(f"desired set cleared on {report['agents_cleared']} agents"
                      f"{'; controller stopped' if report['controller_stopped'] else ''}", highlight=False)
        return
    console.print(f"desired set: {len(report['uris'])} URIs, re-resolved every {report['interval']:g}s, "
                  f"kept warm on every node by {report['controller']} (this node: {report['agent']})",
                  highlight=False, soft_wrap=True)
    for e in report.get("errors", []):
        console.print(f"[yellow]warning:[/yellow] {e}", highlight=False, soft_wrap=True)


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
