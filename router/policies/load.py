"""Load and health helpers shared by the prefix-aware and baseline policies.

* **Health order.**  HEALTHY replicas rank first, SUSPECT ones after all of them (they get
  traffic only when nothing better exists); anything else (UNKNOWN, UNHEALTHY) is never
  ranked, even if a caller passes it.
* **Load** of a replica is ``Replica.queued``: the larger of the router's in-flight count
  (fresh, rises at dispatch so a burst spreads at once) and the replica's scraped
  running + waiting (sees other clients, lags a scrape).
* **Capacity** of a replica is ``tensor_parallel_size x weight``: a TP=4 replica does about
  four times the prefill work of a TP=1 one in the same time, and ``weight`` is the
  operator's relative-capacity hint.
* **Bounded load** (consistent hashing with bounded loads, Mirrokni et al. 2018): with
  total load L over a group (healthy, or suspect) and the new request counted, replica r's
  fair share is ``share_r = (L + 1) * capacity_r / sum(capacity)`` and it may take the
  request only while ``load_r + 1 <= max(ceil(c * share_r), ceil(share_r) + headroom)``.
  The headroom (default 2 requests) matters only at small loads, where c x the share is
  less than one request above it: without it, a handful of conversations in flight were
  pushed off their cached prefixes to even out a one-request difference (on the
  simulated fleet of tests/integration/test_prefix_routing.py, three runs each: hit rate
  0.72-0.76 with the headroom, 0.62-0.64 without).  From about 8 requests per replica on, c x share is the bound.  With
  integer loads some replica always qualifies (if none did, each load_r would be at least
  its allowance and L >= sum of allowances >= c * (L + 1) > L).  The guard only reorders:
  replicas over it rank after those within it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from router.fleet import Health

if TYPE_CHECKING:
    from router.fleet import Replica

DEFAULT_LOAD_FACTOR = 1.25  # c: no replica above c x its fair share of the load ...
DEFAULT_LOAD_HEADROOM = 2  # ... unless within this many requests of its fair share
_EPS = 1e-9  # keeps float noise such as 2.0000000000000004 from adding a whole request


def split_by_health(replicas: Sequence[Replica]) -> tuple[list[Replica], list[Replica]]:
    """(healthy, suspect) in the given order; other states are dropped."""
    healthy: list[Replica] = []
    suspect: list[Replica] = []
    for replica in replicas:
        if replica.health is Health.HEALTHY:
            healthy.append(replica)
        elif replica.health is Health.SUSPECT:
            suspect.append(replica)
    return healthy, suspect


def capacity(replica: Replica) -> float:
    """Relative compute of a replica: tensor-parallel size x weight (> 0)."""
    weight = replica.weight if replica.weight > 0 else 1.0
    return max(1, replica.tensor_parallel_size) * weight


def allowance_by_capacity(total_load: float, total_capacity: float, capacities: Iterable[float],
                          factor: float, headroom: float = DEFAULT_LOAD_HEADROOM) -> dict[float, float]:
    """The bounded-load allowance of a replica of each capacity in `capacities`: the most
    load it may carry after taking one more request, the group carrying `total_load`."""
    scale = (total_load + 1.0) / (total_capacity or 1.0)
    ceil = math.ceil
    return {cap: max(ceil(factor * scale * cap - _EPS), ceil(scale * cap - _EPS) + headroom)
            for cap in set(capacities)}  # fleets have few distinct capacities


def load_allowances(loads: Sequence[float], capacities: Sequence[float], factor: float,
                    headroom: float = DEFAULT_LOAD_HEADROOM) -> list[float]:
    """Per replica, the most load it may carry after taking one more request."""
    table = allowance_by_capacity(sum(loads), sum(capacities), capacities, factor, headroom)
    return [table[cap] for cap in capacities]


def within_bound(loads: Sequence[float], capacities: Sequence[float], factor: float,
                 headroom: float = DEFAULT_LOAD_HEADROOM) -> list[bool]:
    """Per replica, whether taking the request keeps it within the bounded-load guard."""
    allowances = load_allowances(loads, capacities, factor, headroom)
    return [current + 1.0 <= allowed for current, allowed in zip(loads, allowances)]


class RecentDispatches:
    """Exponentially decayed count of the requests dispatched to each replica.

    Each dispatch adds 1 and every older one decays by ``1 - 1/window``, so the counts
    sum to about ``window`` in steady state and a replica's count over the sum is its
    share of the recent requests.  O(1) per dispatch: instead of decaying every count,
    each new dispatch weighs ``1/decay`` times the previous one, and reads divide by the
    current weight (everything is rescaled when the weight grows large).
    """

    def __init__(self, window: float = 100.0, max_tracked: int = 4096) -> None:
        self._decay = 1.0 - 1.0 / window
        self._unit = 1.0
        self._counts: dict[str, float] = {}
        self._max_tracked = max_tracked

    def add(self, replica_id: str) -> None:
        self._unit /= self._decay
        counts = self._counts
        if replica_id not in counts and len(counts) >= self._max_tracked:
            del counts[min(counts, key=counts.__getitem__)]  # the least recently busy
        counts[replica_id] = counts.get(replica_id, 0.0) + self._unit
        if self._unit > 1e100:
            scale = 1.0 / self._unit
            for rid in counts:
                counts[rid] *= scale
            self._unit = 1.0

    def scaled(self) -> tuple[dict[str, float], float]:
        """(raw counts, unit): a replica's count is raw / unit (for hot loops; read-only)."""
        return self._counts, self._unit
