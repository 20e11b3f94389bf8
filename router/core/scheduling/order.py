"""Order keys: the columns a profile sorts on after the health group.

A profile's ranking is one sort of the candidate rows by a tuple of columns: the health
group (candidates.py), then its keys in order, then the row number (so the sort is total
and equal rows keep the given order).  Each key returns one column, in one call:

* `BoundedLoad` (guard.py): held back by the bounded-load guard, a reorder step;
* `Cost` (profile.py): the weighted sum of the cost terms, in seconds;
* here, the tie-breaks and the baselines' orders: `LoadPerCapacity`, `LongestMatch`,
  `Rotation` (spreads ties of an idle fleet), `RequestsPerWeight` (least_load's load),
  `ModelTurn` (round_robin), `Shuffle` (random), `TwoChoices` (power_of_two); and
  ring.py's `RingOrder` (session).
A key returns None when every row is equal on it (no row held back, every cost 0), so
the sort leaves it out.  A key may add to ``Decision.why`` (``explain``) what it knows of the winner and runner-up.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from router.core.requests import RouteRequest
    from router.core.scheduling.candidates import Candidates

_TURN_MASK = 0x3FFFFFFF
MAX_MODEL_COUNTERS = 4096  # bound on round_robin's per-model counters (models are few)


class OrderKey(Protocol):
    name: str

    def values(self, request: RouteRequest, cands: Candidates) -> list[Any] | None:
        """One sort value per candidate row, lower ranks first; None when every row is equal
        on this key (it then does not enter the sort)."""
        ...


def load_per_capacity(cands: Candidates) -> list[float]:
    """Requests ahead per unit of capacity (queued / capacity), per row."""
    return [q / c for q, c in zip(cands.queued, cands.capacity)]


class LoadPerCapacity:
    """Less load per unit of capacity first."""

    name = "load_per_capacity"

    def values(self, request: RouteRequest, cands: Candidates) -> list[float]:
        return load_per_capacity(cands)


class LongestMatch:
    """More matched prefix blocks first (needs the "prefix" producer)."""

    name = "longest_match"

    def values(self, request: RouteRequest, cands: Candidates) -> list[int]:
        return [-m for m in cands.data["prefix"].matched_tokens]


class Rotation:
    """Equal rows take turns: each decision starts the order one row further.

    ``over_split``: count rows in the healthy-then-suspect order instead of the given one
    (prefix_affinity's historical tie-break; identical when every candidate is healthy).
    """

    name = "rotation"

    def __init__(self, *, over_split: bool = False) -> None:
        self.over_split = over_split
        self._turn = 0

    def tick(self) -> None:
        """Every decision turns the rotation, whether its values are needed or not."""
        self._turn = (self._turn + 1) & _TURN_MASK

    def values(self, request: RouteRequest, cands: Candidates) -> list[int]:
        n = cands.n
        start = self._turn % n
        rows = cands.split_positions() if self.over_split else range(n)
        return [(i - start) % n for i in rows]


class RequestsPerWeight:
    """least_load's load: router in-flight (+ scraped waiting + running) (/ weight)."""

    name = "requests_per_weight"

    def __init__(self, *, use_scraped: bool = True, use_weight: bool = True) -> None:
        self.use_scraped = use_scraped
        self.use_weight = use_weight

    def values(self, request: RouteRequest, cands: Candidates) -> list[float]:
        out = []
        for r in cands.replicas:
            work = float(r.in_flight)
            if self.use_scraped:
                work += r.load.waiting + r.load.running
            if self.use_weight and r.weight > 0:
                work /= r.weight
            out.append(work)
        return out

    def explain(self, cands: Candidates, column: list[float], winner: int, runner_up: int | None,
                why: dict[str, object]) -> None:
        why["load"] = round(column[winner], 3)
        if runner_up is not None:
            why["runner_up_load"] = round(column[runner_up], 3)


class ModelTurn:
    """round_robin: each model's candidates in turn, the rotation kept per model (an
    adapter's requests take their base model's turn: one rotation over the same replicas,
    not one per adapter, which would send every adapter to every replica in lockstep)."""

    name = "model_turn"

    def __init__(self) -> None:
        self._next: dict[str, int] = {}
        self.last_start = 0  # the last decision's first row, for why

    def values(self, request: RouteRequest, cands: Candidates) -> list[int]:
        n = cands.n
        turns = self._next
        model = request.index_model
        turn = turns.get(model, 0)
        if len(turns) >= MAX_MODEL_COUNTERS and model not in turns:
            turns.clear()
        turns[model] = (turn + 1) % n
        start = turn % n
        self.last_start = start
        return [(i - start) % n for i in range(n)]

    def explain(self, cands: Candidates, column: list[int], winner: int, runner_up: int | None,
                why: dict[str, object]) -> None:
        why["turn"] = self.last_start


class Shuffle:
    """random: a uniformly random order within each health group."""

    name = "shuffle"

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def values(self, request: RouteRequest, cands: Candidates) -> list[int]:
        healthy, suspect = cands.group_rows(0), cands.group_rows(1)
        self._rng.shuffle(healthy)
        self._rng.shuffle(suspect)
        out = [0] * cands.n
        for position, row in enumerate(healthy + suspect):
            out[row] = position
        return out


class TwoChoices:
    """power_of_two: two random healthy candidates first, the less loaded of them winning;
    then the other healthy ones by load, then the suspect ones by load (for failover).
    Load is per capacity.  Values are (not in the pair, load, tie-break) tuples."""

    name = "two_choices"

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def values(self, request: RouteRequest, cands: Candidates) -> list[tuple[int, float, int]]:
        load = load_per_capacity(cands)
        healthy = cands.group_rows(0)
        pair: dict[int, int] = {}
        if len(healthy) >= 2:
            a, b = self._rng.sample(range(len(healthy)), 2)
            pair = {healthy[a]: 0, healthy[b]: 1}
        return [(0, load[i], pair[i]) if i in pair else (1, load[i], 2 + i) for i in range(cands.n)]

    def explain(self, cands: Candidates, column: list[tuple[int, float, int]], winner: int,
                runner_up: int | None, why: dict[str, object]) -> None:
        if runner_up is not None and column[winner][0] == 0 and column[runner_up][0] == 0:
            why["load"] = cands.queued[winner]
            why["other_load"] = cands.queued[runner_up]
