"""What a caller runs against the whole cluster: connect, reconcile once, fan-out warm, status, the daemon.

Each function returns data (a report dict); the CLI renders it (prefetch/render.py). The per-node work is the
agents' (prefetch.cluster.agent), the reconcile logic the state machine's (prefetch.cluster.state):

- `ensure_agents()` runs AgentStateManager update ticks until every alive node's agent answered (a one-shot
  caller: `prefetch warm --cluster`, `prefetch status`); the controller runs the same manager on a loop;
- `warm_cluster`, `cluster_status`: one call per node's agent, gathered as they finish (`gather`);
- `run_daemon`, `clear_desired`: `prefetch daemon`, declaring (or forgetting) the cluster's desired set to this
  node's agent and to the controller.

Ray is imported inside functions only (the CLI imports this module lazily anyway).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import Unreachable, one_line
from ..redact import redact_obj
from . import compat
from .agent import NAMESPACE, ActorAgentWrapper, agent_name, get_agent, get_or_create_agent
from .controller import CONTROLLER_NAME, controller_desired, get_controller, get_or_create_controller
from .desired import validate_uris
from .node import NodeInfo, alive_nodes, current_node_id, node_map, ray_if_initialized
from .state import AgentState, AgentStateManager, AgentStatus


# -- connecting ---------------------------------------------------------------------------------------------------
def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return True
    return (Path.home() / ".ray" / "auth_token").is_file()


def connect(address: str | None = None) -> None:
    """Connect this process to the Ray cluster (never start one): address, RAY_ADDRESS, or the local node's.

    Token auth (Ray 2.60): a cluster whose head started with a token (`ray start --head` enables it when
    ~/.ray/auth_token exists, or with RAY_AUTH_MODE=token) refuses clients that do not send one, and Ray's client
    turns token mode on by itself only for address "auto". For an explicit host:port we ask the GCS first (no
    token): if it demands one, we switch this process to token mode (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token supplies it); if it does not, we leave the mode alone, because a token-mode driver talking
    to a cluster without auth can read the GCS but its actors die (its own gRPC server then demands tokens the
    workers do not send). A closed port fails here in milliseconds, with one line.
    """
    if ray_if_initialized() is not None:
        return
    import ray

    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    if target != "auto" and "://" not in target and os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
        verdict, detail = compat.probe_gcs(target)
        if verdict == "unreachable":
            raise Unreachable(f"no Ray cluster answers there ({detail or 'connection refused'})", target)
        if verdict == "token" and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            if not _token_available():
                raise Unreachable("the Ray cluster requires token auth: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
                                  "(or put the cluster's token in ~/.ray/auth_token)", target)
            metadata = compat.enable_token_mode()
            if metadata and compat.probe_gcs(target, metadata)[0] == "token":
                raise Unreachable("the Ray cluster refused our auth token (from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                                  "or ~/.ray/auth_token): use the token of that cluster's head", target)
    try:
        ray.init(address=target, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as e:
        hint = "" if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" else " (token auth: is the token right?)"
        raise Unreachable(f"cannot connect to the Ray cluster: {one_line(e, limit=10_000)}{hint}", target) from None


def ensure_agents(address: str | None = None, timeout: float = 120.0) -> dict[str, AgentState]:
    """Reconcile once, to completion: an agent on every alive node (started or found again), dead nodes dropped,
    dead or unhealthy agents replaced. Returns node_id -> AgentState (HEALTHY, or why not after `timeout`)."""
    connect(address)
    manager = AgentStateManager(ActorAgentWrapper)
    deadline = time.monotonic() + timeout
    while True:
        nodes = node_map(alive_nodes())
        manager.update(nodes)
        if manager.settled(nodes) or time.monotonic() > deadline:
            states = {n: s for n, s in manager.states.items() if n in nodes}
            for node_id, why in manager.start_errors.items():   # nodes whose agent could not even be created
                if node_id in nodes and node_id not in states:
                    states[node_id] = AgentState.unstartable(node_id, nodes[node_id], why)
            return states
        time.sleep(0.1)


# -- fan-out warm ---------------------------------------------------------------------------------------------------
def _failed_row(node: NodeInfo, uri: str, message: str, code: int = 1) -> dict:
    return {"node_id": node.node_id, "node_ip": node.node_ip, "cache_dir": node.cache_dir, "uri": uri,
            "ok": False, "error": message, "exit_code": code, "error_type": "AgentError"}


def gather(pending: dict, on_error: Callable[[Any, BaseException], dict]) -> dict:
    """ObjectRef -> context, resolved as they finish; a failed call becomes a row, never an exception."""
    import ray

    results = {}
    waiting = list(pending)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        ref = done[0]
        try:
            results[ref] = ray.get(ref)
        except Exception as e:  # noqa: BLE001
            results[ref] = on_error(pending[ref], e)
    return results


def warm_cluster(uris: list[str], format: str = "native", address: str | None = None,
                 convert_options: dict | None = None, peers: bool = True) -> dict:
    """Warm every URI on every alive node, through each node's agent. One row per (node, URI):
    node_id, node_ip, uri, ok, key, version, bytes, seconds, hit, origin_bytes, peer_bytes, error, exit_code.

    peers: the nodes share chunks (prefetch/cluster/peers.py), so the origin sends each model about once; False
    (`--no-peers`): every node downloads everything from the origin.

    `ok` is False if any row failed; `exit_code` is then the first failed row's (2/3/4/5/6 as for `warm`,
    1 for an agent that did not answer)."""
    started = time.monotonic()
    validate_uris(uris)
    states = ensure_agents(address)
    nodes = alive_nodes()
    pending: dict = {}
    rows_by_slot: dict[tuple[int, int], dict] = {}
    for i, node in enumerate(nodes):
        state = states.get(node.node_id)
        for j, uri in enumerate(uris):
            if state is None or state.status != AgentStatus.HEALTHY:
                why = (state.error if state else None) or "no agent"
                rows_by_slot[(i, j)] = _failed_row(node, uri, f"agent not ready: {why}")
            else:
                ref = state.handle.warm.remote(uri, format, convert_options or None, "prefetch warm --cluster", peers)
                pending[ref] = (i, j)

    def on_error(slot, e):
        i, j = slot
        return _failed_row(nodes[i], uris[j], f"agent failed: {type(e).__name__}: {one_line(e)}")

    for ref, row in gather(pending, on_error).items():
        rows_by_slot[pending[ref]] = row
    rows = []
    for slot in sorted(rows_by_slot):
        row = rows_by_slot[slot]
        row.setdefault("node_ip", nodes[slot[0]].node_ip)
        row["is_head"] = nodes[slot[0]].is_head
        rows.append(row)
    failed = [r for r in rows if not r.get("ok")]
    report = {"ok": not failed, "uris": list(uris), "format": format, "nodes": len(nodes), "rows": rows,
              "failed": len(failed), "peers": peers, "origin_bytes": sum(r.get("origin_bytes") or 0 for r in rows),
              "peer_bytes": sum(r.get("peer_bytes") or 0 for r in rows),
              "bytes": sum(r.get("bytes") or 0 for r in rows if r.get("ok")),
              "seconds": round(time.monotonic() - started, 3)}
    if failed:
        report["exit_code"] = failed[0].get("exit_code") or 1
    return report


# -- cluster status -------------------------------------------------------------------------------------------------
def cluster_status(address: str | None = None, timeout: float = 30.0) -> dict:
    """Every alive node: its agent's status (cache dir, objects, bytes, in-flight downloads with progress,
    desired set) or why there is none. Starts missing agents (they cost no CPU), like `warm --cluster`, but waits
    at most `timeout` for them: a status must come back even when a node is in trouble."""
    states = ensure_agents(address, timeout=timeout)
    nodes = alive_nodes()
    pending: dict = {}
    rows: dict[int, dict] = {}
    for i, node in enumerate(nodes):
        state = states.get(node.node_id)
        base = {"node_id": node.node_id, "node_ip": node.node_ip, "is_head": node.is_head,
                "cache_dir": node.cache_dir, "agent": state.status.value if state else "MISSING",
                "agent_name": agent_name(node.node_id)}
        if state is None or state.status != AgentStatus.HEALTHY:
            rows[i] = base | {"ok": False, "error": (state.error if state else None) or "no agent",
                              "objects": None, "bytes": None, "inflight": []}
        else:
            rows[i] = base
            pending[state.handle.status.remote()] = i

    def on_error(i, e):
        return {"ok": False, "error": f"status failed: {type(e).__name__}: {one_line(e)}", "inflight": []}

    for ref, doc in gather(pending, on_error).items():
        i = pending[ref]
        rows[i] = rows[i] | {"ok": "error" not in doc} | doc | {"is_head": nodes[i].is_head,
                                                               "node_ip": doc.get("node_ip") or nodes[i].node_ip}
    out = [rows[i] for i in sorted(rows)]
    # No credentials in what is printed: in-flight URIs, desired sets and errors, as the nodes reported them.
    return redact_obj({"ok": all(r.get("ok") for r in out), "nodes": out,
                       "objects": sum(r.get("objects") or 0 for r in out),
                       "bytes": sum(r.get("bytes") or 0 for r in out),
                       "inflight": sum(len(r.get("inflight") or []) for r in out), "controller": controller_desired()})


# -- `prefetch daemon` ----------------------------------------------------------------------------------------------
def run_daemon(uris: list[str], interval: float = 60.0, once: bool = False, address: str | None = None,
               format: str = "native", timeout: float = 60.0) -> dict:
    """What a node's start-up hook runs. Starts (or reuses) this node's agent.

    once=True: one warm pass of `uris` on this node, waited for; nothing is left running. The report has the
    per-URI rows, and `ok`/`exit_code` like `warm`.
    once=False: declare `uris` as the cluster's desired set: to this node's agent (so this node starts at once)
    and to the controller (started if missing), which brings every other node, and every later one, along.
    Returns as soon as both took the set (bounded by `timeout`; the agents keep going, detached)."""
    import ray

    validate_uris(uris)
    connect(address)
    node_id = current_node_id()
    agent = get_or_create_agent(node_id)
    if once:
        report = ray.get(agent.sync.remote(uris, format))
        failed = [r for r in report["rows"] if not r["ok"]]
        report = report | {"mode": "once", "ok": not failed}
        if failed:
            report["exit_code"] = failed[0].get("exit_code") or 1
        return report
    controller = get_or_create_controller()
    refs = {"agent": agent.set_desired.remote(uris, interval, format),
            "controller": controller.set_desired.remote(uris, interval, format)}
    report: dict = {"mode": "declare", "node_id": node_id, "agent": agent_name(node_id),
                    "controller": CONTROLLER_NAME, "uris": list(uris), "interval": interval, "format": format}
    errors = []
    for who, ref in refs.items():
        try:
            report[f"{who}_desired"] = ray.get(ref, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - a slow agent still gets the set from the controller
            errors.append(f"{who}: {type(e).__name__}: {one_line(e)}")
    # The set is declared if the controller took it: it pushes to every agent, this one included.
    report["ok"] = "controller_desired" in report
    if errors:
        report["errors"] = errors
    if not report["ok"]:
        report["exit_code"] = 1
    return report


def clear_desired(address: str | None = None) -> dict:
    """Forget the desired set: every agent stops re-warming (and unpins what it pinned); the controller exits.
    Cached objects stay (gc or eviction decide their fate)."""
    import ray

    connect(address)
    cleared = 0
    controller = get_controller()
    if controller is not None:
        try:
            ray.get(controller.shutdown.remote(), timeout=10)
        except Exception:  # noqa: BLE001
            pass
        ray.kill(controller, no_restart=True)
    refs = []
    for node in alive_nodes():
        handle = get_agent(node.node_id)
        if handle is not None:
            refs.append(handle.set_desired.remote([], 60.0, "native"))
    for ref in refs:
        try:
            ray.get(ref, timeout=30)
            cleared += 1
        except Exception:  # noqa: BLE001
            pass
    return {"ok": True, "agents_cleared": cleared, "controller_stopped": controller is not None}
