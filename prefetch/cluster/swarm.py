"""The swarm book: which node holds which verified chunk of which key, and who fetches what from the origin.
Ray-free (the tracker actor in prefetch/cluster/peers.py is its shell), so its rules are tested without a cluster.

Kraken's and BitTorrent's shape: a key's files are cut into the transfer's chunk grid; each chunk has an id
(`chunk_id`: path, size, origin etag and index, so a changed object never matches an old chunk) and the sha256 its
first holder computed. A node that misses a chunk asks `route()`:

- "peer": some live nodes hold it (verified against that sha256 on arrival): fetch from one, check the sha256;
- "origin": nobody holds it and nobody is fetching it: this node claims it and fetches it from the origin, so the
  nodes of a warm start on different chunks and each becomes a source early (a swarm, not a chain);
- "wait": another node is fetching it from the origin now (or this node already fetches its fair share of the
  origin's chunks): ask again shortly.

A claim lasts while its node heartbeats (`heartbeat`); a node that stops (killed, frozen, removed) loses its claims
after HEARTBEAT_TTL seconds and someone else takes them. A holder whose bytes fail verification, or that does not
answer, is `reject`ed / `gone` and routed around. The first sha256 reported for a chunk is the one every later copy
must match; a node whose whole file then fails the origin's own check reports `file_failed`, which forgets the
file's chunks everywhere (the next copies come from the origin again).
"""
from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from typing import Callable

HEARTBEAT_TTL = 15.0     # seconds without a heartbeat (or any call) before a node's origin claims go to others
IDLE_SWARM_S = 3600.0    # a swarm nobody touched for this long is forgotten (its holders' disks still have it)


def chunk_id(path: str, size: int, etag: str | None, index: int) -> str:
    """One chunk of one version of one file: equal ids mean the same bytes are expected."""
    return f"{path}\x00{size}\x00{etag or ''}\x00{index}"


def file_of(cid: str) -> str:
    """The file part of a chunk id (everything but the index)."""
    return cid.rsplit("\x00", 1)[0]


@dataclasses.dataclass
class _Chunk:
    sha256: str | None = None
    holders: set[str] = dataclasses.field(default_factory=set)
    claim: str | None = None          # the node fetching it from the origin now


@dataclasses.dataclass
class _Swarm:
    chunks: dict[str, _Chunk] = dataclasses.field(default_factory=dict)
    needy: dict[str, int] = dataclasses.field(default_factory=dict)      # node -> its max_concurrency, while fetching
    avoid: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # node -> holders it must not ask again
    touched: float = 0.0


class SwarmBook:
    """Every swarm this tracker knows, behind one lock (the tracker actor answers from many threads)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.lock = threading.Lock()
        self.swarms: dict[tuple[str, int], _Swarm] = {}
        self.beats: dict[str, float] = {}       # node -> last heartbeat
        self.gone_nodes: set[str] = set()       # unreachable holders (until they heartbeat again)

    # -- membership --------------------------------------------------------------------------------------------
    def known(self, key: str, grid: int) -> bool:
        with self.lock:
            return (key, grid) in self.swarms

    def join(self, key: str, grid: int, node: str, concurrency: int) -> None:
        with self.lock:
            swarm = self._swarm(key, grid)
            swarm.needy[node] = max(1, int(concurrency))
            self._beat(node)

    def leave(self, key: str, grid: int, node: str) -> None:
        """node stops fetching this key (done or failed): its claims go; what it holds stays."""
        with self.lock:
            swarm = self.swarms.get((key, grid))
            if swarm is None:
                return
            swarm.needy.pop(node, None)
            swarm.avoid.pop(node, None)
            for c in swarm.chunks.values():
                if c.claim == node:
                    c.claim = None

    def heartbeat(self, node: str) -> None:
        with self.lock:
            self._beat(node)

    def _beat(self, node: str) -> None:
        self.beats[node] = self.clock()
        self.gone_nodes.discard(node)

    def _live(self, node: str) -> bool:
        return node not in self.gone_nodes and self.clock() - self.beats.get(node, -math.inf) <= HEARTBEAT_TTL

    # -- what nodes hold ---------------------------------------------------------------------------------------
    def seed(self, key: str, grid: int, node: str, chunks: dict[str, str]) -> None:
        """What a node's disk holds (a committed object, or chunks of its download): chunk id -> sha256.
        A node is a holder of a seeded chunk only if its sha256 agrees with the one already recorded."""
        with self.lock:
            swarm = self._swarm(key, grid)
            for cid, sha in chunks.items():
                self._add_holder(swarm, cid, node, sha)
            self.gone_nodes.discard(node)

    def have(self, key: str, grid: int, node: str, cid: str, sha: str) -> None:
        with self.lock:
            swarm = self._swarm(key, grid)
            self._add_holder(swarm, cid, node, sha)
            chunk = swarm.chunks[cid]
            if chunk.claim == node:
                chunk.claim = None

    @staticmethod
    def _add_holder(swarm: _Swarm, cid: str, node: str, sha: str) -> None:
        chunk = swarm.chunks.setdefault(cid, _Chunk())
        if chunk.sha256 is None:
            chunk.sha256 = sha
        if chunk.sha256 == sha:
            chunk.holders.add(node)
        # A different sha256 for the same chunk id: that node's copy is not the one the others verified; it is not
        # offered (its own origin check decides whether its file is good).

    # -- routing -------------------------------------------------------------------------------------------------
    def route(self, key: str, grid: int, node: str, cid: str) -> dict:
        """Where node should get chunk cid: {"from": "peer", "peers": [...], "sha256": ...} | {"from": "origin"}
        | {"from": "wait", "why": ...}."""
        with self.lock:
            swarm = self._swarm(key, grid)
            self._beat(node)
            chunk = swarm.chunks.setdefault(cid, _Chunk())
            avoid = swarm.avoid.get(node, set())
            holders = [h for h in chunk.holders if h != node and h not in avoid and h not in self.gone_nodes]
            if holders and chunk.sha256:
                random.shuffle(holders)      # spread the serving over every holder
                return {"from": "peer", "peers": holders, "sha256": chunk.sha256}
            if chunk.claim and chunk.claim != node and self._live(chunk.claim):
                return {"from": "wait", "why": f"{chunk.claim} is fetching it from the origin"}
            if chunk.claim != node and self._claims(swarm, node) >= self._fair_share(swarm, node):
                return {"from": "wait", "why": "this node fetches its share of the origin's chunks already"}
            chunk.claim = node
            return {"from": "origin"}

    def _claims(self, swarm: _Swarm, node: str) -> int:
        return sum(1 for c in swarm.chunks.values() if c.claim == node)

    def _fair_share(self, swarm: _Swarm, node: str) -> int:
        """Origin chunks one node may fetch at once: its concurrency split among the nodes still fetching, so a
        lone node uses all its connections and N nodes each pull a different part of the model."""
        live = [n for n in swarm.needy if self._live(n)] or [node]
        mine = swarm.needy.get(node, 1)
        return max(2, math.ceil(mine / len(live)))

    # -- faults ----------------------------------------------------------------------------------------------------
    def reject(self, key: str, grid: int, node: str, holder: str, cid: str) -> None:
        """holder sent node bytes of cid that failed verification: never route node to holder again for this key,
        and nobody to holder for that chunk."""
        with self.lock:
            swarm = self._swarm(key, grid)
            swarm.avoid.setdefault(node, set()).add(holder)
            chunk = swarm.chunks.get(cid)
            if chunk is not None:
                chunk.holders.discard(holder)

    def gone(self, node: str) -> None:
        """node did not answer (dead, frozen, removed): route around it everywhere until it heartbeats again."""
        with self.lock:
            self.gone_nodes.add(node)
            self.beats.pop(node, None)

    def file_failed(self, key: str, grid: int, file_prefix: str) -> None:
        """A file assembled from these chunks failed the origin's check: forget every record of its chunks."""
        with self.lock:
            swarm = self._swarm(key, grid)
            for cid in [c for c in swarm.chunks if file_of(c) == file_prefix]:
                del swarm.chunks[cid]

    # -- housekeeping ----------------------------------------------------------------------------------------------
    def _swarm(self, key: str, grid: int) -> _Swarm:
        now = self.clock()
        for k in [k for k, s in self.swarms.items() if now - s.touched > IDLE_SWARM_S]:
            del self.swarms[k]
        swarm = self.swarms.setdefault((key, grid), _Swarm())
        swarm.touched = now
        return swarm
