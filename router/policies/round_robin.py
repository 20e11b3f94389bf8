"""`round_robin`: each model's replicas in turn, ignoring load and prefixes.

The baseline every other policy is measured against.  Healthy replicas come first in the
ranking, suspect ones after them; the rotation is per model so that two models served
by the same router do not skew each other's turns.

Parameters: none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from router.policies.base import Decision, StatelessPolicy
from router.policies.load import split_by_health

if TYPE_CHECKING:
    from router.fleet import Replica
    from router.prefix.index import PrefixIndex
    from router.requests import RouteRequest
    from yamlcheck import Node

PARAMS: tuple[str, ...] = ()
_MAX_COUNTERS = 4096  # bound on per-model rotation counters (models are few)


class RoundRobin(StatelessPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def rank(self, request: RouteRequest, replicas: Sequence[Replica],
             index: PrefixIndex) -> Decision:
        n = len(replicas)
        if n == 0:
            return Decision(ranked=[], why={"policy": self.name})
        turn = self._next.get(request.model, 0)
        if len(self._next) >= _MAX_COUNTERS and request.model not in self._next:
            self._next.clear()
        self._next[request.model] = (turn + 1) % n
        start = turn % n
        healthy, suspect = split_by_health(list(replicas[start:]) + list(replicas[:start]))
        return Decision(ranked=healthy + suspect, why={"policy": self.name, "turn": start})


def build(params: Node) -> RoundRobin:
    params.mapping(PARAMS)
    return RoundRobin()
