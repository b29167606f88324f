"""Chunks between nodes: the tracker actor, the source that fetches chunks from peers, and what an agent serves.

One download per cluster (DESIGN.md): when a node's agent misses a key, its transfer (prefetch/transfer.py, the
same engine as for the origin) reads through a PeerSource. For each chunk of the transfer's grid it asks the
cluster's tracker (one detached actor, `prefetch-tracker`, whose rules are prefetch/cluster/swarm.py) where to
get it:

- from a peer: one HTTP range GET to that node's chunk server (prefetch/cluster/chunk_server.py, in its agent),
  which sends bytes of a committed object in its store, or of a chunk its own running download already wrote; the
  bytes must match the sha256 the tracker recorded for that chunk, or they are dropped, that peer is avoided for
  the key, and the chunk is routed again (another peer, or the origin);
- from the origin: the wrapped Source, exactly as without peers (If-Match, retries, deadlines);
- later: another node is fetching that chunk from the origin now.

Whatever the route, the engine then hashes each chunk again and checks each whole file against the origin's own
checksum (MD5 ETag, x-amz-checksum-*) before the commit: a node never commits bytes it has not verified.

Limits: the control plane (join, route, have) is Ray actor calls, token-authenticated where the cluster enables
tokens; the data plane is HTTP between node IPs, each chunk server requiring its own random secret, which only the
tracker hands out, over Ray. An agent serves only files of keys in its own store (a committed object's manifest,
or the listing of its own running download).

Counters (`counters()`), per agent process since it started: origin/peer bytes, chunks rejected.
"""
from __future__ import annotations

import hashlib
import http.client
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import urlencode

from .. import metrics
from ..sources.base import FileEntry, safe_relpath
from .names import NAMESPACE, TRACKER_NAME, get_agent
from .swarm import HEARTBEAT_TTL, SwarmBook, chunk_id, file_of

if TYPE_CHECKING:
    from ..sources.base import Source

HEARTBEAT_EVERY = 2.0       # seconds between a downloading node's heartbeats (HEARTBEAT_TTL is 7.5x that: a
                            # tracker slowed by load must not take a live node's claims for a dead one's)
WAIT_POLL = (0.1, 1.0)      # first and longest pause before asking again about a chunk another node is fetching
# How long a node waits for a chunk another, live node is fetching from the origin before fetching it too. The
# fetcher heartbeats while it works, and its own deadlines (read timeout, rate floor, attempts) end a stuck fetch
# and release the chunk well before this; fetching it twice would only split the same uplink further.
WAIT_MAX = 600.0
SEED_TIMEOUT = 3.0          # a tracker seeding a new swarm waits this long for the agents' answers
# How long a tracker may take to answer. A dead tracker fails a call at once (the actor is gone); these bound a
# slow one: the first join may wait for the tracker's own start (a new actor process: seconds, more under load).
TRACKER_TIMEOUT = 30.0
TRACKER_START_TIMEOUT = 120.0
assert HEARTBEAT_TTL >= 3 * HEARTBEAT_EVERY


# -- counters (this process) -------------------------------------------------------------------------------------
_counts_lock = threading.Lock()
_counts = {"origin_bytes": 0, "peer_bytes_in": 0, "peer_bytes_out": 0, "peer_chunks_rejected": 0,
           "peers_unreachable": 0}


def _count(name: str, n: int = 1) -> None:
    with _counts_lock:
        _counts[name] += n
    if name == "peer_bytes_in":
        metrics.record_peer_bytes("in", n)
    elif name == "peer_bytes_out":
        metrics.record_peer_bytes("out", n)


def count_origin(n: int) -> None:
    """Bytes a warm of this process pulled from the origin (the agent calls it with each Warmed)."""
    _count("origin_bytes", n)


def counters() -> dict:
    with _counts_lock:
        return dict(_counts)


# -- the tracker ---------------------------------------------------------------------------------------------------
class PeerTracker:
    """The cluster's swarm book, as a detached actor (a thin shell: every rule is SwarmBook's).

    Its state is soft: a restarted tracker knows nothing, and the first node to join a key's swarm makes it ask
    every agent what its disk holds (`seed`)."""

    def __init__(self):
        self.book = SwarmBook()
        self.seeding: dict[tuple[str, int], threading.Event] = {}
        self.servers: dict[str, tuple[str, str]] = {}     # node -> its chunk server's (url, secret)
        self.lock = threading.Lock()

    def join(self, key: str, grid: int, node: str, concurrency: int, server: tuple[str, str] | None) -> None:
        if server:
            self.servers[node] = tuple(server)
        self._seed(key, grid, node)
        self.book.join(key, grid, node, concurrency)

    def _seed(self, key: str, grid: int, joiner: str) -> None:
        """Before the first join of a swarm the book does not know (new, forgotten when idle, or a restarted
        tracker): ask every other agent what it holds. Joiners meanwhile wait for that answer."""
        with self.lock:
            event = self.seeding.get((key, grid))
            if event is None and self.book.known(key, grid):
                return
            first = event is None
            if first:
                event = self.seeding[(key, grid)] = threading.Event()
        if not first:
            event.wait(SEED_TIMEOUT + 1)
            return
        try:
            import ray

            from .node import alive_nodes

            pending = {}
            for n in alive_nodes():
                handle = get_agent(n.node_id) if n.node_id != joiner else None
                if handle is not None:
                    pending[handle.chunk_map.remote(key, grid)] = n.node_id
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=SEED_TIMEOUT) if pending else ([], [])
            for ref in ready:
                try:
                    held = ray.get(ref)
                except Exception:  # noqa: BLE001 - a node that cannot answer holds nothing for us
                    continue
                if held["chunks"] and held["server"]:
                    self.servers[pending[ref]] = tuple(held["server"])
                    self.book.seed(key, grid, pending[ref], held["chunks"])
        finally:
            self.book.seed(key, grid, joiner, {})     # the swarm is known from now on, even if nobody held a chunk
            with self.lock:
                self.seeding.pop((key, grid), None)
            event.set()

    def route(self, key: str, grid: int, node: str, cid: str) -> dict:
        """The book's answer, with the chunk servers of the peers it names (a peer without one is left out)."""
        answer = self.book.route(key, grid, node, cid)
        if answer["from"] == "peer":
            answer["peers"] = [p for p in answer["peers"] if p in self.servers]
            answer["servers"] = {p: self.servers[p] for p in answer["peers"]}
            if not answer["peers"]:   # holders this tracker cannot reach (it restarted): the origin
                return {"from": "origin"}
        return answer

    def have(self, key: str, grid: int, node: str, cid: str, sha: str) -> None:
        self.book.have(key, grid, node, cid, sha)

    def seed(self, key: str, grid: int, node: str, chunks: dict[str, str]) -> None:
        self.book.seed(key, grid, node, chunks)

    def reject(self, key: str, grid: int, node: str, holder: str, cid: str) -> None:
        self.book.reject(key, grid, node, holder, cid)

    def gone(self, node: str) -> None:
        self.book.gone(node)

    def file_failed(self, key: str, grid: int, file_prefix: str) -> None:
        self.book.file_failed(key, grid, file_prefix)

    def heartbeat(self, node: str) -> None:
        self.book.heartbeat(node)

    def leave(self, key: str, grid: int, node: str) -> None:
        self.book.leave(key, grid, node)


_tracker_class = None


def get_or_create_tracker():
    """The cluster's tracker, started if missing: detached, free (num_cpus=0), on the head node when it can be
    (the head outlives workers); a crashed tracker is restarted empty and re-seeds from the agents."""
    global _tracker_class
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .node import alive_nodes

    if _tracker_class is None:
        _tracker_class = ray.remote(PeerTracker)
    head = next((n.node_id for n in alive_nodes() if n.is_head), None)
    strategy = NodeAffinitySchedulingStrategy(node_id=head, soft=True) if head else "DEFAULT"
    return _tracker_class.options(name=TRACKER_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                                  num_cpus=0, max_concurrency=64, max_restarts=-1, max_task_retries=0,
                                  scheduling_strategy=strategy).remote()


# -- what an agent serves ------------------------------------------------------------------------------------------
class _Inflight:
    """A download running in this process, as peers may read it: its data tree, its files, its finished chunks."""

    def __init__(self, data: Path, files: list[FileEntry]):
        self.data = data
        self.files = {f.path: f for f in files}
        self.done: dict[str, str] = {}       # chunk id -> sha256


_inflight_lock = threading.Lock()
_inflight: dict[tuple[str, int], _Inflight] = {}


def locate(store, key: str, path: str) -> Path | None:
    """The file holding `path` of `key` on this node, for the chunk server: its running download of key (a file it
    lists), else its committed object (a file its manifest lists); None when it has neither. The path is checked to
    stay inside the artifact dir; the server opens it without following symlinks."""
    path = safe_relpath(path)
    for (k, _grid), inflight in list(_inflight.items()):
        if k == key and path in inflight.files:
            return inflight.data / path
    manifest = store.lookup(key, touch=False)
    if manifest is None or path not in {f.path for f in manifest.files}:
        return None
    return store.paths.object_dir(key) / path


def served(n: int) -> None:
    """Bytes the chunk server sent to a peer."""
    _count("peer_bytes_out", n)


def chunk_map(store, key: str, grid: int) -> dict[str, str]:
    """chunk id -> sha256 of what this node holds of key on that grid: its committed object (from the manifest's
    per-chunk sha256s), or the chunks its running download finished."""
    inflight = _inflight.get((key, grid))
    if inflight is not None:
        return dict(inflight.done)
    manifest = store.lookup(key, touch=False)
    return files_chunks(manifest.files, grid) if manifest is not None else {}


def files_chunks(files: list[FileEntry], grid: int) -> dict[str, str]:
    """chunk id -> sha256 of every chunk these entries (a manifest's, or a finished download's) record on grid."""
    out = {}
    for f in files:
        chunks = f.chunks or {}
        if chunks.get("size") == grid:
            for i, sha in enumerate(chunks.get("sha256") or []):
                out[chunk_id(f.path, f.size, f.etag, i)] = sha
    return out


# -- what a downloading agent reads through ------------------------------------------------------------------------
class PeerSource:
    """A Source that routes each chunk of the grid to a peer or to the origin (the wrapped source). The transfer
    engine sees `per_chunk` and reads one chunk per call, in random order (so the nodes of one warm start on
    different chunks), and tells it `chunk_done` / `file_restarted`."""

    per_chunk = True

    def __init__(self, origin: "Source", key: str, files: list[FileEntry], data: Path, grid: int, node: str,
                 tracker, concurrency: int, timeout: float, server: tuple[str, str] | None = None):
        self.origin, self.key, self.grid, self.node = origin, key, grid, node
        self.uri = origin.uri
        self.supports_ranges = True
        self.tracker, self.timeout = tracker, timeout
        self.files = {f.path: f for f in files}
        self.peer_bytes = 0
        self.notes: list[str] = []
        self._conns = threading.local()       # per reader thread: holder url -> a kept-alive HTTPConnection
        self._origin_only: set[str] = set()   # files restarted after a failed origin check: origin only
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._broken = False                   # the tracker stopped answering: origin only from now on
        self._inflight = _Inflight(data, files)
        with _inflight_lock:
            _inflight[(key, grid)] = self._inflight
        self._call("join", key, grid, node, concurrency, server, wait=TRACKER_START_TIMEOUT)
        self._beat = threading.Thread(target=self._heartbeat, name="prefetch-peer-heartbeat", daemon=True)
        self._beat.start()

    # the Source protocol: listing and identity are the origin's
    def list(self) -> list[FileEntry]:
        return self.origin.list()

    def identity(self) -> dict:
        return self.origin.identity()

    def origin_facts(self, entry: FileEntry):
        facts = getattr(self.origin, "origin_facts", None)
        if facts is None:
            from ..integrity import OriginFacts

            return OriginFacts()
        return facts(entry)

    def part_sizes(self, entry: FileEntry, parts: int) -> tuple[int, ...] | None:
        learn = getattr(self.origin, "part_sizes", None)
        return learn(entry, parts) if learn is not None else None

    def read(self, path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        entry = self.files[path]
        end = entry.size if end is None else end
        index = start // self.grid
        aligned = start == index * self.grid and end == min(start + self.grid, entry.size)
        if not aligned or path in self._origin_only or self._broken:
            # A retry from the middle of a chunk (the origin cut us off there), or a file we no longer trust peers
            # for: straight to the origin.
            yield from self.origin.read(path, start, end)
            return
        cid = chunk_id(path, entry.size, entry.etag, index)
        data = self._from_peers(cid, path, start, end)
        if data is not None:
            yield data
            return
        yield from self.origin.read(path, start, end)

    def _from_peers(self, cid: str, path: str, start: int, end: int) -> bytes | None:
        """The chunk's bytes from a peer (verified), or None: fetch it from the origin (we hold the claim)."""
        pause, waited = WAIT_POLL[0], 0.0
        while not self._closed.is_set():
            route = self._call("route", self.key, self.grid, self.node, cid, wait=True)
            if route is None:
                return None
            if route["from"] == "origin":
                return None
            if route["from"] == "wait":
                if waited >= WAIT_MAX:
                    self._note(f"waited {WAIT_MAX:.0f}s for another node's fetch of a chunk of {path}; fetched it")
                    return None        # the origin stays the fallback of last resort
                time.sleep(pause)
                waited += pause
                pause = min(pause * 2, WAIT_POLL[1])
                continue
            for holder in route["peers"]:
                data = self._read_peer(holder, route["servers"][holder], cid, path, start, end)
                if data is None:
                    continue
                if hashlib.sha256(data).hexdigest() != route["sha256"]:
                    _count("peer_chunks_rejected")
                    self._note(f"a chunk of {path} from node {holder[:12]} failed its sha256; fetched elsewhere")
                    self._call("reject", self.key, self.grid, self.node, holder, cid)
                    continue
                with self._lock:
                    self.peer_bytes += len(data)
                _count("peer_bytes_in", len(data))
                return data
            # every holder offered failed: ask again (the tracker now routes around them)
        return None

    def _read_peer(self, holder: str, server: tuple[str, str], cid: str, path: str, start: int,
                   end: int) -> bytes | None:
        """One ranged GET from holder's chunk server (a kept-alive connection per reader thread)."""
        url, secret = server
        conns = self._conns.__dict__
        try:
            conn = conns.get(url)
            if conn is None:
                host, port = url.removeprefix("http://").rsplit(":", 1)
                conn = conns[url] = http.client.HTTPConnection(host, int(port), timeout=self.timeout)
            query = urlencode({"key": self.key, "path": path, "start": start, "end": end})
            conn.request("GET", f"/chunk?{query}", headers={"Authorization": f"Bearer {secret}"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            conns.pop(url, None)
            self._lost(holder, "no answer" if isinstance(e, TimeoutError) else f"failed ({type(e).__name__})")
            return None
        if resp.status != 200 or len(data) != end - start:
            self._call("reject", self.key, self.grid, self.node, holder, cid)
            return None
        return data

    def _lost(self, holder: str, why: str) -> None:
        _count("peers_unreachable")
        self._note(f"peer node {holder[:12]}: {why} within {self.timeout:g}s; routed around")
        self._call("gone", holder)

    # hooks the transfer engine calls
    def chunk_done(self, entry: FileEntry, index: int, sha: str) -> None:
        cid = chunk_id(entry.path, entry.size, entry.etag, index)
        self._inflight.done[cid] = sha
        self._call("have", self.key, self.grid, self.node, cid, sha)

    def file_restarted(self, entry: FileEntry) -> None:
        prefix = file_of(chunk_id(entry.path, entry.size, entry.etag, 0))
        for cid in [c for c in self._inflight.done if file_of(c) == prefix]:
            self._inflight.done.pop(cid, None)
        self._origin_only.add(entry.path)
        self._call("file_failed", self.key, self.grid, prefix)

    def close(self, committed: list[FileEntry] | None = None) -> None:
        """End of this download: leave the swarm; after a commit, stay a holder of every chunk (served from
        objects/ from now on)."""
        self._closed.set()
        with _inflight_lock:
            if _inflight.get((self.key, self.grid)) is self._inflight:
                del _inflight[(self.key, self.grid)]
        if committed is not None:
            self._call("seed", self.key, self.grid, self.node, files_chunks(committed, self.grid))
        self._call("leave", self.key, self.grid, self.node)

    def _heartbeat(self) -> None:
        while not self._closed.wait(HEARTBEAT_EVERY):
            self._call("heartbeat", self.node)

    def _note(self, text: str) -> None:
        with self._lock:
            if text not in self.notes and len(self.notes) < 10:
                self.notes.append(text)

    def _call(self, method: str, *args, wait: bool | float = False):
        """One tracker call; waited for when its answer is needed (wait=True: up to TRACKER_TIMEOUT; a number:
        that many seconds). A tracker that fails turns this download into an origin-only one (said in the notes),
        never into a failed warm."""
        if self._broken:
            return None
        try:
            ref = getattr(self.tracker, method).remote(*args)
            if not wait:
                return None
            import ray

            return ray.get(ref, timeout=TRACKER_TIMEOUT if wait is True else float(wait))
        except Exception as e:  # noqa: BLE001
            self._broken = True
            self._note(f"the peer tracker failed ({type(e).__name__}); the rest came from the origin")
            return None


def peer_factory(node: str, concurrency: int, timeout: float, server: tuple[str, str] | None):
    """What the agent hands prefetch.warm(peers=...): builds this download's PeerSource (None: no tracker here).
    server: this agent's chunk server (url, secret), registered with the tracker so others can read from us."""
    def make(key: str, source: "Source", files: list[FileEntry], data: Path, grid: int) -> PeerSource | None:
        try:
            tracker = get_or_create_tracker()
        except Exception:  # noqa: BLE001 - no tracker: this warm goes to the origin, as without peers
            return None
        return PeerSource(source, key, files, data, grid, node, tracker, concurrency, timeout, server)
    return make
