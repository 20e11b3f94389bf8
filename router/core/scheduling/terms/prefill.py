"""`prefill`: computing the prompt tokens the replica does not have cached, in seconds.

With T the request's estimated prompt tokens (``RouteRequest.estimated_prompt_tokens``)
and m_r the blocks of its prefix the index says replica r holds (producers.PrefixMatch):

    prefill_s_r = max(0, T - m_r x tokens_per_block) / rate_r

``rate_r`` is the replica's learned prefill rate (producers.LearnedRates), so for a long
uncached prompt a TP=4 replica is rightly preferred to an idle TP=1 one, while a short or
mostly cached prompt goes where its prefix is.

Parameters: none of its own (the rates' parameters are the profile's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.core.requests import RouteRequest
    from router.core.scheduling.candidates import Candidates
    from yamlcheck import Node

NAME = "prefill"
NEEDS = ("prefix", "rates")
PARAMS: tuple[str, ...] = ()


class Prefill:
    name = NAME

    def costs(self, request: RouteRequest, cands: Candidates) -> list[float]:
        prefix = cands.data["prefix"]
        prompt = request.estimated_prompt_tokens
        return [(prompt - m) / rate if prompt > m else 0.0
                for m, rate in zip(prefix.matched_tokens, cands.data["rates"])]


def build(params: Node) -> Prefill:
    return Prefill()
