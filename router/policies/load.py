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
  total load L over the healthy replicas and the new request counted, replica r may take
  the request only while ``load_r + 1 <= ceil(c * (L + 1) * capacity_r / sum(capacity))``.
  With integer loads some replica always qualifies (if none did, each load_r would be at
  least its allowance and L >= sum of allowances >= c * (L + 1) > L).  The guard only
  reorders: replicas over it rank after those within it, so were a whole group over it
  (fractional scraped loads), the group would simply be ordered by cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from router.fleet import Health

if TYPE_CHECKING:
    from router.fleet import Replica

DEFAULT_LOAD_FACTOR = 1.25  # c: no replica above c x its fair share of the load


def split_by_health(replicas: Sequence["Replica"]) -> tuple[list["Replica"], list["Replica"]]:
    """(healthy, suspect) in the given order; other states are dropped."""
    healthy: list[Replica] = []
    suspect: list[Replica] = []
    for replica in replicas:
        if replica.health is Health.HEALTHY:
            healthy.append(replica)
        elif replica.health is Health.SUSPECT:
            suspect.append(replica)
    return healthy, suspect


def capacity(replica: "Replica") -> float:
    """Relative compute of a replica: tensor-parallel size x weight (> 0)."""
    weight = replica.weight if replica.weight > 0 else 1.0
    return max(1, replica.tensor_parallel_size) * weight


def load(replica: "Replica") -> float:
    """Requests ahead of a new one on `replica` (see the module docstring)."""
    return replica.queued


def load_allowances(loads: Sequence[float], capacities: Sequence[float], factor: float) -> list[float]:
    """Per replica, the most load it may carry after taking one more request."""
    total = sum(loads) + 1.0
    total_capacity = sum(capacities) or 1.0
    # (the epsilon keeps float noise such as 2.0000000000000004 from adding a whole request)
    return [math.ceil(factor * total * cap / total_capacity - 1e-9) for cap in capacities]


def within_bound(loads: Sequence[float], capacities: Sequence[float], factor: float) -> list[bool]:
    """Per replica, whether taking the request keeps it within the bounded-load guard."""
    allowances = load_allowances(loads, capacities, factor)
    return [current + 1.0 <= allowed for current, allowed in zip(loads, allowances)]


@dataclass(slots=True)
class Candidates:
    """The routable replicas of one decision with their id, load and capacity, in one pass.

    Same definitions as ``load()`` / ``capacity()`` above (``Replica.queued`` and
    tp x weight), computed inline: at 64 replicas the per-replica function calls alone
    cost more than the rest of a decision (measured by benchmarks/routing_micro.py).
    Order is the given order; ``suspect[i]`` says which group replica i is in.
    """

    replicas: list["Replica"]
    ids: list[str]
    loads: list[float]
    capacities: list[float]
    suspect: list[bool]
    load_totals: list[float]  # [healthy, suspect]
    capacity_totals: list[float]  # [healthy, suspect]

    @classmethod
    def of(cls, replicas: Sequence["Replica"]) -> "Candidates":
        healthy_state, suspect_state = Health.HEALTHY, Health.SUSPECT
        kept: list[Replica] = []
        ids: list[str] = []
        loads: list[float] = []
        caps: list[float] = []
        flags: list[bool] = []
        load_totals = [0.0, 0.0]
        cap_totals = [0.0, 0.0]
        for r in replicas:
            health = r.health
            if health is healthy_state:
                group = 0
            elif health is suspect_state:
                group = 1
            else:
                continue
            engine = r.load
            queued = float(r.in_flight)
            scraped = engine.running + engine.waiting
            if scraped > queued:
                queued = scraped
            weight = r.weight
            cap = (r.tensor_parallel_size if r.tensor_parallel_size > 1 else 1) * (weight if weight > 0 else 1.0)
            kept.append(r)
            ids.append(r.url)
            loads.append(queued)
            caps.append(cap)
            flags.append(group == 1)
            load_totals[group] += queued
            cap_totals[group] += cap
        return cls(kept, ids, loads, caps, flags, load_totals, cap_totals)

    def __len__(self) -> int:
        return len(self.replicas)

    def within_bound(self, factor: float) -> list[bool]:
        """Per replica, whether taking the request keeps it within the guard of its group."""
        scale = [factor * (self.load_totals[g] + 1.0) / (self.capacity_totals[g] or 1.0) for g in (0, 1)]
        ceil = math.ceil
        return [load + 1.0 <= ceil(scale[s] * cap - 1e-9)
                for load, cap, s in zip(self.loads, self.capacities, self.suspect)]
