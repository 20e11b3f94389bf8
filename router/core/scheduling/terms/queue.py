"""`queue`: the wait for the requests ahead on the replica, in seconds.

What is ahead of the request on a replica is, first, prompt tokens to prefill: vLLM
prefills the prompts ahead of a new one before it (a token budget per step, chunked), so
the wait is those tokens over the replica's prefill rate.  Two views of them:
``pending_prefill`` (Candidates), the uncached tokens of the router's own requests there
not answered yet, fresh at dispatch and counted in tokens (three 12k-token prompts ahead
are not three short ones); and ``waiting`` (``vllm:num_requests_waiting``, what the
replica itself last reported, other clients included, one scrape old), each standing for
a typical request's prefill, ``typical_tokens`` (producers.LearnedRates: EWMA of the
uncached prompt tokens of the answered requests).  The larger of the two counts.  A
running request spends most of its life decoding, and continuous batching prefills the
new request beside it, so it only slows the shared steps: it counts ``running_weight`` of
a waiting one.  (Counting every in-flight request as a full prefill moves a conversation
off its cached history as soon as another replica has one request less in flight.)  A
replica that saturates (KV cache full, max_num_seqs reached) reports a waiting queue and
is then avoided.  The requests a replica took beyond its bounded share of the recent
traffic (producers.RecentShare) count as waiting too: under sustained skew they will be.

    ahead_r = max(pending_prefill_r, waiting_r x typical)
              + (running_weight x running_r + over_share_r) x typical
    queue_s_r = ahead_r / rate_r

Parameters: running_weight (0 <= w <= 1, default 0).  0 since benchmarks/scenarios/
multi_turn.yaml, same seed, 3 repeats each on the 2-core dev machine: 0.1 gave hit rate
65.5%, TTFT p50 37 ms; 0 gave 72.3%, 18.5 ms (agentic: no difference beyond noise).
Running requests still count in the bounded-load guard.
"""

from __future__ import annotations

from itertools import repeat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.core.requests import RouteRequest
    from router.core.scheduling.candidates import Candidates
    from yamlcheck import Node

NAME = "queue"
NEEDS = ("rates", "recent")
PARAMS = ("running_weight",)
DEFAULT_RUNNING_WEIGHT = 0.0  # a running (decoding) request vs a waiting one


class Queue:
    name = NAME

    def __init__(self, *, running_weight: float = DEFAULT_RUNNING_WEIGHT) -> None:
        self.running_weight = running_weight

    def costs(self, request: RouteRequest, cands: Candidates) -> list[float] | None:
        data = cands.data
        typical = data["typical_tokens"]
        # Requests counted beside the prompt tokens ahead: running ones at running_weight, and
        # those over the recent share (None, the common case: no one, and no extra pass).
        w = self.running_weight
        recent = data["recent"]
        extra: list[float] | None = None
        if w:
            extra = [w * (q - wt) for wt, q in zip(cands.waiting, cands.queued)]
        if recent is not None:
            extra = recent if extra is None else [e + over for e, over in zip(extra, recent)]
        return [((p if p > (t := wt * typical) else t) + e * typical) / rate
                for p, wt, e, rate in zip(cands.pending_prefill, cands.waiting,
                                          repeat(0.0) if extra is None else extra, data["rates"])]

    def explain(self, cands: Candidates, winner: int, why: dict[str, object]) -> None:
        recent = cands.data["recent"]
        why["over_share"] = 0.0 if recent is None else round(recent[winner], 3)


def build(params: Node) -> Queue:
    return Queue(running_weight=params.get("running_weight", DEFAULT_RUNNING_WEIGHT).number(minimum=0.0, maximum=1.0))
