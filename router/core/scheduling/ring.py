"""session's order: consistent hashing on the request's session key.

A client that names its conversation (``routing.session_header``, default X-Session-Id, or
the body's ``user``; see ``RouteRequest.session_key``) gets every turn on the same replica,
whose prefix cache then holds the conversation, without the router remembering sessions.

* **Ring.**  Each replica owns ``virtual_nodes x capacity`` points on a 64-bit ring
  (xxh3_64 of "replica id#i"; capacity = tensor_parallel_size x weight, so a TP=4 replica
  takes about four times the sessions).  A key hashes to a point; its replica is the owner
  of the next point clockwise.  A replica joining or leaving moves only the keys of the
  arcs it gains or loses, about 1/N of them; the others keep their replica.
* **Order**: each health group in ring order from the key's point (a ring per group).
  With the bounded-load guard before it (healthy replicas only), a heavy session spills
  to the next replica on the ring instead of piling up (Mirrokni, Thorup, Zadimoghaddam
  2018).
Rings are cached per replica set (at most ``MAX_CACHED_RINGS``), so a replica flapping
in and out of health does not rebuild the ring on every request.

Parameters: virtual_nodes (integer >= 1, default 160): ring points per unit of capacity.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    from router.core.requests import RouteRequest
    from router.core.scheduling.candidates import Candidates
    from yamlcheck import Node

DEFAULT_VIRTUAL_NODES = 160  # ring points per unit of capacity: ~±8% spread of key shares
MAX_CACHED_RINGS = 32  # distinct replica sets whose rings are kept
PARAMS = ("virtual_nodes",)

_xxh3 = xxhash.xxh3_64_intdigest


class Ring:
    __slots__ = ("points", "owners")

    def __init__(self, members: Sequence[tuple[str, float]], virtual_nodes: int) -> None:
        pairs = sorted(
            (_xxh3(f"{rid}#{i}".encode()), rid)
            for rid, cap in members
            for i in range(max(1, round(virtual_nodes * cap)))
        )
        self.points = [p for p, _ in pairs]
        self.owners = [rid for _, rid in pairs]

    def walk(self, key_hash: int, count: int) -> list[str]:
        """The first `count` distinct replica ids clockwise from `key_hash`."""
        order: list[str] = []
        seen: set[str] = set()
        owners = self.owners
        n = len(owners)
        start = bisect.bisect_left(self.points, key_hash)
        for step in range(n):
            rid = owners[(start + step) % n]
            if rid not in seen:
                seen.add(rid)
                order.append(rid)
                if len(order) == count:
                    break
        return order


class RingOrder:
    """Position of each row in its health group's ring walk from the session key."""

    name = "ring"

    def __init__(self, *, virtual_nodes: int = DEFAULT_VIRTUAL_NODES) -> None:
        self.virtual_nodes = virtual_nodes
        self._rings: dict[frozenset[tuple[str, float]], Ring] = {}

    def ring(self, members: frozenset[tuple[str, float]]) -> Ring:
        ring = self._rings.get(members)
        if ring is None:
            if len(self._rings) >= MAX_CACHED_RINGS:
                del self._rings[next(iter(self._rings))]
            ring = self._rings[members] = Ring(sorted(members), self.virtual_nodes)
        return ring

    def values(self, request: RouteRequest, cands: Candidates) -> list[int]:
        key_hash = _xxh3((request.session_key or "").encode())
        out = [0] * cands.n
        for g in (0, 1):
            rows = cands.group_rows(g)
            if not rows:
                continue
            row_of = {cands.ids[i]: i for i in rows}
            members = frozenset((cands.ids[i], cands.capacity[i]) for i in rows)
            for position, rid in enumerate(self.ring(members).walk(key_hash, len(rows))):
                out[row_of[rid]] = position
        return out


def build(params: Node) -> RingOrder:
    return RingOrder(virtual_nodes=params.get("virtual_nodes", DEFAULT_VIRTUAL_NODES).integer(minimum=1))
