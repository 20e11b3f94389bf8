"""`power_of_two`: two random replicas, the less loaded one wins (a baseline).

"The power of two choices" (Mitzenmacher 2001): sampling two replicas and taking the less
loaded one avoids most of random's imbalance at almost no cost, and ignores prefixes.
Load is per capacity (router/policies/load.py).  The rest of the ranking, for failover:
the loser of the pair, then the other healthy replicas by load, then SUSPECT ones by load.

Parameters:
    seed (integer, optional): seed of the policy's own random generator.
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from router.policies.base import Decision, StatelessPolicy
from router.policies.load import capacity, split_by_health

if TYPE_CHECKING:
    from router.fleet import Replica
    from router.prefix.index import PrefixIndex
    from router.requests import RouteRequest
    from yamlcheck import Node

PARAMS = ("seed",)


def _relative_load(replica: Replica) -> float:
    return replica.queued / capacity(replica)


class PowerOfTwo(StatelessPolicy):
    name = "power_of_two"

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = _random.Random(seed)

    def rank(self, request: RouteRequest, replicas: Sequence[Replica],
             index: PrefixIndex) -> Decision:
        healthy, suspect = split_by_health(replicas)
        suspect.sort(key=_relative_load)
        if len(healthy) < 2:
            return Decision(ranked=healthy + suspect, why={"policy": self.name})
        a, b = self._rng.sample(range(len(healthy)), 2)
        pair = sorted((healthy[a], healthy[b]), key=_relative_load)
        rest = sorted((r for i, r in enumerate(healthy) if i not in (a, b)), key=_relative_load)
        why = {"policy": self.name, "load": pair[0].queued, "other_load": pair[1].queued}
        return Decision(ranked=pair + rest + suspect, why=why)


def build(params: Node) -> PowerOfTwo:
    params.mapping(PARAMS)
    seed = params.get("seed", None)
    return PowerOfTwo(seed=None if seed.value is None else seed.integer())
