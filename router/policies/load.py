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
  Some replica always qualifies (the allowances sum to at least c * (L + 1) > L + 1), so
  the guard never empties the ranking; it only reorders it.
"""

from __future__ import annotations

import math
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
    eligible = [current + 1.0 <= allowed for current, allowed in zip(loads, allowances)]
    return eligible if any(eligible) else [True] * len(eligible)  # fractional loads only
