"""`queue`: the wait for the requests ahead on the replica, in seconds.

Of the requests ahead (``Candidates.queued``), ``waiting`` are the ones the replica itself
last reported waiting (``vllm:num_requests_waiting``) and the rest are running.  A waiting
request must be prefilled before this one: it costs a typical request's prefill,
``typical_tokens`` (producers.LearnedRates: EWMA of the uncached prompt tokens of the
answered requests).  A running request spends most of its life decoding, and continuous
batching prefills the new request beside it, so it only slows the shared steps: it counts
``running_weight`` of a waiting one.  (Counting every in-flight request as a full prefill
moves a conversation off its cached history as soon as another replica has one request
less in flight.)  A replica that saturates (KV cache full, max_num_seqs reached) reports a
waiting queue and is then avoided.  The requests a replica took beyond its bounded share
of the recent traffic (producers.RecentShare) count as waiting too: under sustained skew
they will be.

    queue_s_r = (waiting_r + running_weight x running_r + over_share_r) x typical / rate_r

Parameters: running_weight (0 <= w <= 1, default 0).  0 since benchmarks/scenarios/
multi_turn.yaml, same seed, 3 repeats each on the 2-core dev machine: 0.1 gave hit rate
65.5%, TTFT p50 37 ms; 0 gave 72.3%, 18.5 ms (agentic: no difference beyond noise).
Running requests still count in the bounded-load guard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.requests import RouteRequest
    from router.scheduling.candidates import Candidates
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
        typical = cands.data["typical_tokens"]
        data = cands.data
        w = self.running_weight
        recent = data["recent"]  # None: nobody is over its share
        if w:
            ahead = [wt + w * (q - wt) for wt, q in zip(cands.waiting, cands.queued)]
            if recent is not None:
                ahead = [a + over for a, over in zip(ahead, recent)]
            return [a * typical / rate for a, rate in zip(ahead, data["rates"])]
        if recent is None:
            return [wt * typical / rate for wt, rate in zip(cands.waiting, data["rates"])]
        return [(wt + over) * typical / rate for wt, over, rate in zip(cands.waiting, recent, data["rates"])]

    def explain(self, cands: Candidates, winner: int, why: dict[str, object]) -> None:
        recent = cands.data["recent"]
        why["over_share"] = 0.0 if recent is None else round(recent[winner], 3)


def build(params: Node) -> Queue:
    return Queue(running_weight=params.get("running_weight", DEFAULT_RUNNING_WEIGHT).number(minimum=0.0,
                                                                                          maximum=1.0))
