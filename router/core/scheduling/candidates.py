"""`Candidates`: the per-request table every pipeline stage reads, and the health filter.

The proxy hands the scheduler the replicas that serve the request's model and that their
circuit breakers admit.  `gather` turns them into one table, columns as parallel lists (one
row per candidate, in the given order), so that producers, cost terms and order keys each
work on whole columns in one call: at 64 candidates a Python call per replica per stage
would cost more than the decision itself (benchmarks/routing_micro.py).

**The health filter** lives here and only here: HEALTHY replicas are group 0, SUSPECT ones
group 1 (they rank after every healthy one: they get traffic only when nothing better is
left), anything else (UNKNOWN, UNHEALTHY) is dropped even if a caller passes it.  Every
profile sorts on ``group`` first.

Base columns, read from the replicas on first use (``ids`` at once):
* ``queued``: ``Replica.queued``, the larger of the router's in-flight count (fresh, rises
  at dispatch so a burst spreads at once) and the replica's scraped running + waiting
  (sees other clients, lags a scrape);
* ``capacity``: `capacity_of` each replica: tensor-parallel size x weight (a TP=4 replica
  prefills about four times as fast; ``weight`` is the operator's relative-capacity hint,
  <= 0 counts as 1);
* ``waiting``: the replica's own last reported waiting queue (``vllm:num_requests_waiting``);
* ``pending_prefill``: ``Replica.pending_prefill_tokens``, the uncached prompt tokens of the
  router's requests there that have not had their first byte yet (hooks.InFlight).
Producers add what they compute to ``data`` under their own name.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from router.fleet.replicas import Health

if TYPE_CHECKING:
    from router.fleet.replicas import Replica
    from router.prefix.exact import ExactIndex
    from router.prefix.index import PrefixIndex

HEALTHY_GROUP = 0
SUSPECT_GROUP = 1
_url = attrgetter("url")


class Candidates:
    """The routable candidates of one request, as columns; see the module docstring."""

    __slots__ = ("replicas", "ids", "group", "n", "n_healthy", "index", "exact", "data", "_queued",
                 "_waiting", "_capacity", "_capacity_groups", "_pending_prefill")

    def __init__(self, replicas: list[Replica], group: list[int], index: PrefixIndex,
                 exact: ExactIndex | None = None) -> None:
        self.replicas = replicas
        self.group = group
        self.n = len(replicas)
        self.n_healthy = self.n - sum(group)
        self.index = index
        self.exact = exact  # the KV-event index, where the router subscribes to any replica
        self.ids: list[str] = list(map(_url, replicas))
        self.data: dict[str, Any] = {}
        # The load columns are read on first use: a baseline that orders by turn or at
        # random never pays for them.
        self._queued: list[float] | None = None
        self._waiting: list[float] | None = None
        self._capacity: list[float] | None = None
        self._capacity_groups: tuple[tuple[float, set[float]], ...] | None = None
        self._pending_prefill: list[int] | None = None

    @property
    def pending_prefill(self) -> list[int]:
        pending = self._pending_prefill
        if pending is None:
            pending = self._pending_prefill = [r.pending_prefill_tokens for r in self.replicas]
        return pending

    @property
    def waiting(self) -> list[float]:
        waiting = self._waiting
        if waiting is None:
            self._read_load()
            waiting = self._waiting
            assert waiting is not None
        return waiting

    @property
    def queued(self) -> list[float]:
        queued = self._queued
        if queued is None:
            self._read_load()
            queued = self._queued
            assert queued is not None
        return queued

    def _read_load(self) -> None:
        """``waiting`` and ``queued`` in one pass over the replicas (the guard and the
        queue term both read them; one loop costs less than a comprehension each)."""
        waiting: list[float] = []
        queued: list[float] = []
        add_waiting = waiting.append
        add_queued = queued.append
        for r in self.replicas:
            load = r.load
            w = load.waiting
            add_waiting(w)
            s = load.running + w
            f = r.in_flight
            add_queued(float(f) if f > s else s)
        self._waiting = waiting
        self._queued = queued

    @property
    def capacity(self) -> list[float]:
        capacity = self._capacity
        if capacity is None:  # capacity_of, inlined: a call per row costs more than the rest
            capacity = self._capacity = [
                (tp if (tp := r.tensor_parallel_size) > 1 else 1) * (w if (w := r.weight) > 0 else 1.0)
                for r in self.replicas]
        return capacity

    def capacity_groups(self) -> tuple[tuple[float, set[float]], ...]:
        """Per health group (healthy, suspect): total capacity and the distinct capacities
        (computed once per request; the guard and the recent share both need them)."""
        groups = self._capacity_groups
        if groups is None:
            caps = self.capacity
            if self.n_healthy == self.n:
                groups = ((sum(caps), set(caps)), (0.0, set()))
            else:
                per = [[c for c, g in zip(caps, self.group) if g == k] for k in (0, 1)]
                groups = tuple((sum(p), set(p)) for p in per)
            self._capacity_groups = groups
        return groups

    def group_rows(self, group: int) -> list[int]:
        """Row numbers of one health group, in the given order."""
        return [i for i, g in enumerate(self.group) if g == group]

    def split_positions(self) -> list[int]:
        """Each row's position in the healthy-then-suspect order (stable within a group)."""
        healthy = 0
        suspect = self.n_healthy
        out = []
        for g in self.group:
            if g:
                out.append(suspect)
                suspect += 1
            else:
                out.append(healthy)
                healthy += 1
        return out


def capacity_of(replica: Replica) -> float:
    """Relative compute of a replica: tensor-parallel size x weight (> 0)."""
    weight = replica.weight if replica.weight > 0 else 1.0
    return max(1, replica.tensor_parallel_size) * weight


def health_groups(replicas: Sequence[Replica]) -> list[int]:
    """The health filter: per replica its group, HEALTHY 0, SUSPECT 1, anything else -1."""
    healthy, suspect = Health.HEALTHY, Health.SUSPECT
    return [HEALTHY_GROUP if (h := r.health) is healthy else SUSPECT_GROUP if h is suspect else -1
            for r in replicas]


def gather(replicas: Sequence[Replica], index: PrefixIndex, exact: ExactIndex | None = None) -> Candidates:
    """Routable replicas in the given order, with their group and load columns."""
    group = health_groups(replicas)
    if -1 not in group:
        return Candidates(replicas if isinstance(replicas, list) else list(replicas), group, index, exact)
    rows = [r for r, g in zip(replicas, group) if g >= 0]
    return Candidates(rows, [g for g in group if g >= 0], index, exact)


def health_order(replicas: Sequence[Replica]) -> list[Replica]:
    """Routable replicas, healthy before suspect, each group in the given order (what the
    proxy falls back to if a profile fails)."""
    keyed = sorted((g, i) for i, g in enumerate(health_groups(replicas)) if g >= 0)
    return [replicas[i] for _, i in keyed]
