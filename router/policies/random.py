"""`random`: a uniformly random order, prefixes and load ignored (a baseline).

Healthy replicas in random order, then SUSPECT ones in random order.

Parameters:
    seed (integer, optional): seed of the policy's own random generator, for repeatable
        experiments; without it the order is unpredictable.
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from router.policies.base import Decision, StatelessPolicy
from router.policies.load import split_by_health

if TYPE_CHECKING:
    from router.fleet import Replica
    from router.prefix.index import PrefixIndex
    from router.requests import RouteRequest
    from yamlcheck import Node

PARAMS = ("seed",)


class RandomPolicy(StatelessPolicy):
    name = "random"

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = _random.Random(seed)

    def rank(self, request: RouteRequest, replicas: Sequence[Replica],
             index: PrefixIndex) -> Decision:
        healthy, suspect = split_by_health(replicas)
        self._rng.shuffle(healthy)
        self._rng.shuffle(suspect)
        return Decision(ranked=healthy + suspect, why={"policy": self.name})


def build(params: Node) -> RandomPolicy:
    params.mapping(PARAMS)
    seed = params.get("seed", None)
    return RandomPolicy(seed=None if seed.value is None else seed.integer())
