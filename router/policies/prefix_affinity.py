"""`prefix_affinity`: the longest cached prefix wins, ties go to the least loaded.

The classic trie router, kept as the baseline that `cache_aware` must beat: it ignores
load except to break ties, so a prefix shared by every request (a common system prompt)
sends all of them to whichever replica saw it first.  No bounded-load guard, by design.

Order: healthy replicas by (most matched blocks, least load per capacity, rotation),
then SUSPECT ones the same way.  Load and capacity as in router/policies/load.py.

Parameters: none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from router.policies.base import Decision, StatelessPolicy
from router.policies.load import capacity, split_by_health

if TYPE_CHECKING:
    from router.fleet import Replica
    from router.prefix.index import PrefixIndex
    from router.requests import RouteRequest
    from yamlcheck import Node

PARAMS: tuple[str, ...] = ()


class PrefixAffinity(StatelessPolicy):
    name = "prefix_affinity"

    def __init__(self) -> None:
        self._turn = 0

    def rank(self, request: RouteRequest, replicas: Sequence[Replica],
             index: PrefixIndex) -> Decision:
        healthy, suspect = split_by_health(replicas)
        candidates = healthy + suspect
        if not candidates:
            return Decision(ranked=[], why={"policy": self.name})
        matched = index.match(request.block_hashes, [r.id for r in candidates])
        n = len(candidates)
        self._turn = (self._turn + 1) & 0x3FFFFFFF
        start = self._turn % n
        n_healthy = len(healthy)
        keyed = sorted(
            (i >= n_healthy, -matched[r.id], r.queued / capacity(r), (i - start) % n, i)
            for i, r in enumerate(candidates)
        )
        ranked = [candidates[k[4]] for k in keyed]
        why: dict[str, object] = {"policy": self.name, "matched_blocks": -keyed[0][1],
                                  "load": ranked[0].queued}
        if n > 1:
            why["runner_up_matched_blocks"] = -keyed[1][1]
        return Decision(ranked=ranked, why=why, matched_blocks=matched)


def build(params: Node) -> PrefixAffinity:
    params.mapping(PARAMS)
    return PrefixAffinity()
