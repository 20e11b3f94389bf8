"""`session`: consistent hashing with bounded loads on the request's session key.

A client that names its conversation (``routing.session_header``, default X-Session-Id, or
the body's ``user``; see ``RouteRequest.session_key``) gets every turn on the same replica,
whose prefix cache then holds the conversation, without the router remembering sessions.

* **Ring.**  Each replica owns ``virtual_nodes x capacity`` points on a 64-bit ring
  (xxh3_64 of "replica id#i"; capacity = tensor_parallel_size x weight, so a TP=4 replica
  takes about four times the sessions).  A key hashes to a point; its replica is the owner
  of the next point clockwise.  A replica joining or leaving moves only the keys of the
  arcs it gains or loses, about 1/N of them; the others keep their replica.
* **Bounded loads** (Mirrokni, Thorup, Zadimoghaddam 2018): walking clockwise, replicas
  above the bounded-load guard (``load_factor`` x their fair share of the load, with
  ``load_headroom``; router/policies/load.py) are skipped, so a heavy session spills to the
  next replica on the ring instead of piling up.
* **Ranking**: healthy replicas in ring order from the key's point, those within the bound
  first; then SUSPECT ones in ring order.  Every given replica is ranked.
* **No key**: the request is routed by ``cache_aware`` (whose parameters this policy
  accepts too), which finds the conversation by its prefix instead.

Rings are cached per replica set (at most ``MAX_CACHED_RINGS``), so a replica flapping
in and out of health does not rebuild the ring on every request.

Parameters:
    virtual_nodes (integer >= 1, default 160): ring points per unit of capacity.
    load_factor (number > 1, default 1.25), load_headroom (number >= 0, default 2): the
        bounded-load guard (router/policies/load.py), also cache_aware's.
    and cache_aware's parameters, for requests without a session key.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING

import xxhash

from router.policies import cache_aware
from router.policies.base import Decision
from router.policies.load import DEFAULT_LOAD_FACTOR, DEFAULT_LOAD_HEADROOM, capacity, split_by_health, within_bound

if TYPE_CHECKING:
    from router.fleet import Replica
    from router.prefix.index import PrefixIndex
    from router.requests import RouteRequest
    from yamlcheck import Node

DEFAULT_VIRTUAL_NODES = 160  # ring points per unit of capacity: ~±8% spread of key shares
MAX_CACHED_RINGS = 32  # distinct replica sets whose rings are kept

PARAMS = ("virtual_nodes",) + cache_aware.PARAMS

_xxh3 = xxhash.xxh3_64_intdigest


class _Ring:
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


class Session:
    name = "session"

    def __init__(
        self,
        *,
        virtual_nodes: int = DEFAULT_VIRTUAL_NODES,
        load_factor: float = DEFAULT_LOAD_FACTOR,
        load_headroom: float = DEFAULT_LOAD_HEADROOM,
        fallback: cache_aware.CacheAware | None = None,
    ) -> None:
        self.virtual_nodes = virtual_nodes
        self.load_factor = load_factor
        self.load_headroom = load_headroom
        self.fallback = fallback or cache_aware.CacheAware(load_factor=load_factor, load_headroom=load_headroom)
        self._rings: dict[frozenset[tuple[str, float]], _Ring] = {}

    def _ring(self, replicas: Sequence[Replica]) -> _Ring:
        members = frozenset((r.id, capacity(r)) for r in replicas)
        ring = self._rings.get(members)
        if ring is None:
            if len(self._rings) >= MAX_CACHED_RINGS:
                del self._rings[next(iter(self._rings))]
            ring = self._rings[members] = _Ring(sorted(members), self.virtual_nodes)
        return ring

    def rank(self, request: RouteRequest, replicas: Sequence[Replica],
             index: PrefixIndex) -> Decision:
        if not request.session_key:
            decision = self.fallback.rank(request, replicas, index)
            decision.why = {**decision.why, "policy": self.name, "fallback": self.fallback.name}
            return decision
        healthy, suspect = split_by_health(replicas)
        candidates = healthy + suspect
        if not candidates:
            return Decision(ranked=[], why={"policy": self.name})
        by_id = {r.id: r for r in candidates}
        key_hash = _xxh3(request.session_key.encode())

        ranked: list[Replica] = []
        held_back: list[Replica] = []
        if healthy:
            order = [by_id[rid] for rid in self._ring(healthy).walk(key_hash, len(healthy))]
            ok = within_bound([r.queued for r in order], [capacity(r) for r in order], self.load_factor,
                              self.load_headroom)
            ranked = [r for r, fits in zip(order, ok) if fits]
            held_back = [r for r, fits in zip(order, ok) if not fits]
        ranked += held_back
        if suspect:
            ranked += [by_id[rid] for rid in self._ring(suspect).walk(key_hash, len(suspect))]
        matched = index.match(request.block_hashes, [r.id for r in candidates])
        why = {"policy": self.name, "matched_blocks": matched[ranked[0].id],
               "load": ranked[0].queued, "held_back": len(held_back)}
        return Decision(ranked=ranked, why=why, matched_blocks=matched)

    def observe(self, replica: Replica, request: RouteRequest, *,
                time_to_first_byte_s: float, matched_blocks: int) -> None:
        self.fallback.observe(replica, request, time_to_first_byte_s=time_to_first_byte_s,
                              matched_blocks=matched_blocks)


def build(params: Node) -> Session:
    params.mapping(PARAMS)
    fallback = cache_aware.build(_without(params, "virtual_nodes"))
    return Session(
        virtual_nodes=params.get("virtual_nodes", DEFAULT_VIRTUAL_NODES).integer(minimum=1),
        load_factor=fallback.load_factor,
        load_headroom=fallback.load_headroom,
        fallback=fallback,
    )


def _without(params: Node, key: str) -> Node:
    from yamlcheck import Node

    value = {k: v for k, v in (params.value or {}).items() if k != key}
    return Node(value, params.path, params.file)
