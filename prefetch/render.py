"""Every rich table and event line the CLI prints. The library returns data (dicts, dataclasses); this module
turns it into text. It imports neither ray nor serving: it only formats what it is given."""
from __future__ import annotations


# --- local store: ls, verify, gc, pins, plan -----------------------------------------------------------------



# --- cluster: warm --cluster, status, daemon -----------------------------------------------------------------

def _node_label(row: dict) -> str:
    head = " (head)" if row.get("is_head") else ""
    return f"{(row.get('node_id') or '?')[:12]}{head}"


def render_warm_table(report: dict, console) -> None:
    """prefetch.cluster.warm_cluster's report, one row per (node, URI): version, size, seconds, hit/miss, error."""
    from rich.table import Table

    from .config import human_bytes as _human

    table = Table(box=None)
    for name in ("node", "ip", "uri", "version", "size", "seconds", "result", "origin", "error"):
        table.add_column(name, no_wrap=name not in ("uri", "error"), overflow="fold")
    for r in report["rows"]:
        if r.get("ok"):
            table.add_row(_node_label(r), r.get("node_ip") or "-", r["uri"], str(r.get("version") or "-"),
                          _human(r.get("bytes")), f"{r.get('seconds', 0):.2f}", "hit" if r.get("hit") else "miss",
                          _human(r.get("origin_bytes")), "")
        else:
            table.add_row(_node_label(r), r.get("node_ip") or "-", r["uri"], "-", "-",
                          f"{r['seconds']:.2f}" if r.get("seconds") is not None else "-", "[red]FAILED[/red]", "-",
                          r.get("error") or "")
    console.print(table)
    ok = len(report["rows"]) - report.get("failed", 0)
    console.print(f"{ok}/{len(report['rows'])} ok on {report['nodes']} nodes in {report['seconds']:.1f}s; "
                  f"origin bytes for the cluster: {_human(report['origin_bytes'])}", highlight=False)


def render_status_table(report: dict, console) -> None:
    """prefetch.cluster.cluster_status's report: one row per node (agent, cache dir, objects, in flight, set)."""
    from rich.table import Table

    from .config import human_bytes as _human

    table = Table(box=None)
    for name in ("node", "ip", "agent", "cache dir", "objects", "size", "in flight", "desired set"):
        table.add_column(name, no_wrap=name in ("node", "ip", "objects", "size"), overflow="fold")
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
        table.add_row(_node_label(r), r.get("node_ip") or "-", agent, r.get("cache_dir") or "-",
                      str(r.get("objects") if r.get("objects") is not None else "-"), _human(r.get("bytes")),
                      "\n".join(inflight) or "-", desired_text)
    console.print(table)
    console.print(f"{len(report['nodes'])} nodes, {report['objects']} objects, {_human(report['bytes'])} cached, "
                  f"{report['inflight']} downloads in flight", highlight=False)


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
