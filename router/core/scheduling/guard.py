"""The bounded-load guard: a reorder step, not a cost term.

Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): with total
load L over a health group (healthy, or suspect) and the new request counted, replica r's
fair share is ``share_r = (L + 1) x capacity_r / sum(capacity)`` and it may take the
request only while ``load_r + 1 <= max(ceil(c x share_r), ceil(share_r) + headroom)``.
Replicas over it rank after every replica of their group within it (the key sorts right
after the health group), so a burst of requests sharing a prefix (a common system prompt)
cannot pile onto the replica that first cached it.  It never drops: the proxy fails over
down the whole list.

The headroom (default 2 requests) matters only at small loads, where c x the share is less
than one request above it: without it, a handful of conversations in flight were pushed
off their cached prefixes to even out a one-request difference (tests/integration/
test_prefix_routing.py's simulated fleet, three runs each: hit rate 0.72-0.76 with the
headroom, 0.62-0.64 without).  From about 8 requests per replica on, c x share is the
bound.  With integer loads some replica always qualifies (if none did, each load_r would
be at least its allowance and L >= sum of allowances >= c x (L + 1) > L).

The same allowance bounds a replica's share of the *recent* traffic in the queue term's
``over_share`` (producers.RecentShare), so the arithmetic lives here once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.core.requests import RouteRequest
    from router.core.scheduling.candidates import Candidates
    from yamlcheck import Node

DEFAULT_LOAD_FACTOR = 1.25  # c: no replica above c x its fair share of the load ...
DEFAULT_LOAD_HEADROOM = 2.0  # ... unless within this many requests of its fair share
PARAMS = ("load_factor", "load_headroom")
_EPS = 1e-9  # keeps float noise such as 2.0000000000000004 from adding a whole request


def group_allowances(values: list[float], cands: Candidates, factor: float,
                     headroom: float) -> tuple[dict[float, float], dict[float, float]]:
    """Per health group, {capacity: the most of `values` a replica of that capacity may
    carry after taking one more request}, the group carrying the sum of `values`."""
    (healthy_cap, healthy_set), (suspect_cap, suspect_set) = cands.capacity_groups()
    if cands.n_healthy == cands.n:  # the common case: no suspect replica
        return _allowance(sum(values), healthy_cap, healthy_set, factor, headroom), {}
    group = cands.group
    suspect_total = sum([v for v, g in zip(values, group) if g])
    healthy_total = sum([v for v, g in zip(values, group) if not g])
    return (_allowance(healthy_total, healthy_cap, healthy_set, factor, headroom),
            _allowance(suspect_total, suspect_cap, suspect_set, factor, headroom))


def _allowance(total: float, total_capacity: float, capacities: set[float], factor: float,
               headroom: float) -> dict[float, float]:
    scale = (total + 1.0) / (total_capacity or 1.0)
    ceil = math.ceil
    table: dict[float, float] = {}
    for cap in capacities:  # fleets have few distinct capacities
        bounded = ceil(factor * scale * cap - _EPS)
        near = ceil(scale * cap - _EPS) + headroom
        table[cap] = bounded if bounded >= near else near
    return table


class BoundedLoad:
    """Order key: False for replicas within the guard, True for those held back."""

    name = "bounded_load"

    def __init__(self, *, load_factor: float = DEFAULT_LOAD_FACTOR, load_headroom: float = DEFAULT_LOAD_HEADROOM,
                 healthy_only: bool = False) -> None:
        self.load_factor = load_factor
        self.load_headroom = load_headroom
        self.healthy_only = healthy_only  # `session` guards its ring walk over healthy replicas only

    def values(self, request: RouteRequest, cands: Candidates) -> list[bool] | None:
        """Per row, whether it is held back; None when no row is."""
        queued = cands.queued
        healthy, suspect = group_allowances(queued, cands, self.load_factor, self.load_headroom)
        if not suspect:
            if max(queued) + 1.0 <= min(healthy.values()):  # the common case: nobody is over
                return None
            held = [q + 1.0 > healthy[c] for q, c in zip(queued, cands.capacity)]
        else:
            tables = (healthy, {} if self.healthy_only else suspect)
            held = [c in tables[g] and q + 1.0 > tables[g][c]
                    for q, c, g in zip(queued, cands.capacity, cands.group)]
        return held if True in held else None

    def explain(self, cands: Candidates, column: list[bool] | None, winner: int, runner_up: int | None,
                why: dict[str, object]) -> None:
        if column is None:
            why["held_back"] = 0
        else:
            why["held_back"] = sum([held for held, g in zip(column, cands.group) if not g])


def build(params: Node, *, healthy_only: bool = False) -> BoundedLoad:
    return BoundedLoad(
        load_factor=params.get("load_factor", DEFAULT_LOAD_FACTOR).number(minimum=1.0, exclusive_minimum=True),
        load_headroom=params.get("load_headroom", DEFAULT_LOAD_HEADROOM).number(minimum=0.0),
        healthy_only=healthy_only,
    )
