"""`least_load`: the replica with the least outstanding work, prefixes ignored.

Load of a replica = requests the router has in flight to it + the requests the replica
itself last reported as waiting and running on /metrics (``vllm:num_requests_waiting`` /
``vllm:num_requests_running``), divided by its configured ``weight`` (a relative capacity
hint; a tensor-parallel replica can be given more).  The router's count is fresh (it
rises at dispatch, so a burst spreads at once) but blind to other clients; the scraped
counts see every client but lag one scrape interval.  Their sum counts the router's own
running requests twice until the next scrape, which only makes a replica that just got
traffic look busier - the safe direction for spreading a burst.

Ties (e.g. an idle fleet) are broken by rotation, so equal replicas share traffic instead
of the first one taking it all.  Healthy replicas rank before suspect ones.

Parameters:
    use_scraped (bool, default true): add the scraped waiting + running counts.
    use_weight (bool, default true): divide the load by the replica's weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from router.fleet import Health
from router.policies.base import Decision, StatelessPolicy

if TYPE_CHECKING:
    from router.fleet import Replica
    from router.prefix.index import PrefixIndex
    from router.requests import RouteRequest
    from yamlcheck import Node

PARAMS = ("use_scraped", "use_weight")


class LeastLoad(StatelessPolicy):
    name = "least_load"

    def __init__(self, *, use_scraped: bool = True, use_weight: bool = True) -> None:
        self.use_scraped = use_scraped
        self.use_weight = use_weight
        self._turn = 0

    def load(self, replica: Replica) -> float:
        work = float(replica.in_flight)
        if self.use_scraped:
            work += replica.load.waiting + replica.load.running
        if self.use_weight and replica.weight > 0:
            work /= replica.weight
        return work

    def rank(self, request: RouteRequest, replicas: Sequence[Replica],
             index: PrefixIndex) -> Decision:
        n = len(replicas)
        if n == 0:
            return Decision(ranked=[], why={"policy": self.name})
        self._turn = (self._turn + 1) % (1 << 30)
        start = self._turn % n
        # Sort key: healthy first, then load, then the rotated position (tie-break).
        keyed = sorted(
            ((0 if r.health is Health.HEALTHY else 1, self.load(r), (i - start) % n, r)
             for i, r in enumerate(replicas)),
            key=lambda item: item[:3],
        )
        ranked = [item[3] for item in keyed]
        why = {"policy": self.name, "load": round(keyed[0][1], 3)}
        if len(keyed) > 1:
            why["runner_up_load"] = round(keyed[1][1], 3)
        return Decision(ranked=ranked, why=why)


def build(params: Node) -> LeastLoad:
    params.mapping(PARAMS)
    return LeastLoad(
        use_scraped=params.get("use_scraped", True).boolean(),
        use_weight=params.get("use_weight", True).boolean(),
    )
