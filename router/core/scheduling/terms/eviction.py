"""`eviction`: the future recomputation of the blocks this request would push out, in seconds.

The index knows how many blocks each replica can hold (``free_r`` from its KV capacity,
producers.PrefixMatch).  Storing the request's n - m_r new blocks on a full replica evicts
as many blocks of other prefixes, which will likely be asked for again and recomputed:

    eviction_s_r = max(0, n - m_r - free_r) / rate_r     (one recompute; all in tokens)

The weight says how many future prefills an evicted block costs (cache_aware's default 2,
also settable as ``routing.params.eviction_weight``).  So new conversations go where the
KV cache has room rather than all to the fastest replica whose cache is full of other
conversations.  (benchmarks/scenarios/multi_turn.yaml, one run each on the 2-core dev
machine, fair share of the busiest replica 50%: without this term and the queue's
over_share hit rate 42%, busiest share 69%; eviction alone 58%, 65%; both 68%, 62%.)

Parameters: none of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.core.requests import RouteRequest
    from router.core.scheduling.candidates import Candidates
    from yamlcheck import Node

NAME = "eviction"
NEEDS = ("prefix", "rates")
PARAMS: tuple[str, ...] = ()


class Eviction:
    name = NAME

    def costs(self, request: RouteRequest, cands: Candidates) -> list[float] | None:
        prefix = cands.data["prefix"]
        need = prefix.need_tokens
        free = prefix.free_tokens
        if min(free) >= max(need):  # every replica has room for the whole prompt: 0 everywhere
            return None
        return [(n - m - f) / rate if n - m > f else 0.0
                for n, m, f, rate in zip(need, prefix.matched_tokens, free, cands.data["rates"])]

    def explain(self, cands: Candidates, winner: int, why: dict[str, object]) -> None:
        prefix = cands.data["prefix"]
        evicted = prefix.need_tokens[winner] - prefix.matched_tokens[winner] - prefix.free_tokens[winner]
        why["evicts_tokens"] = int(evicted) if evicted > 0 else 0


def build(params: Node) -> Eviction:
    return Eviction()
