"""`lora`: the wait for a request's LoRA adapter on a replica, in seconds.

A request naming an adapter (``RouteRequest.lora``) runs at once only where vLLM has that
adapter in a GPU slot; elsewhere the step that admits it first loads the adapter, and
where the batch already holds ``--max-loras`` other adapters it waits for one of them to
drain.  Per candidate, from the "adapters" producer (router/fleet/lora.py's AdapterSlots):

    lora_s_r = 0                           the adapter is (likely) in one of r's slots
             = lora_load_s                 r must load it into a free slot
             = lora_load_s + lora_evict_s  ... in place of another adapter (which some later
                                           request will have to load again)
             = lora_load_s + lora_busy_s   r must load it and its batch is full of others

Only a cost, never a filter: a burst for one adapter spreads once the loaded replica's
queue costs more than a load elsewhere (the queue term), so one adapter cannot pin every
request to one replica.  None (no cost at all) for requests without an adapter.

Parameters: lora_load_s (default 0.1 s: a rank-16 adapter of an 8B model from host memory
is tens of milliseconds, from disk hundreds), lora_evict_s (default 0.05 s), lora_busy_s
(default 1.0 s).  Not learned from the answers yet: set them for the fleet's adapters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.core.requests import RouteRequest
    from router.core.scheduling.candidates import Candidates
    from yamlcheck import Node

NAME = "lora"
NEEDS = ("adapters",)
PARAMS = ("lora_load_s", "lora_evict_s", "lora_busy_s")
DEFAULT_LOAD_S = 0.1
DEFAULT_EVICT_S = 0.05
DEFAULT_BUSY_S = 1.0
LOADED, LOAD_FREE_SLOT, LOAD_EVICTING, BATCH_FULL = 0, 1, 2, 3  # the "adapters" producer's states


class Lora:
    name = NAME

    def __init__(self, *, load_s: float = DEFAULT_LOAD_S, evict_s: float = DEFAULT_EVICT_S,
                 busy_s: float = DEFAULT_BUSY_S) -> None:
        self.by_state = (0.0, load_s, load_s + evict_s, load_s + busy_s)

    def costs(self, request: RouteRequest, cands: Candidates) -> list[float] | None:
        states = cands.data.get("adapters")
        if states is None:
            return None
        by_state = self.by_state
        return [by_state[s] for s in states]


def build(params: Node) -> Lora:
    return Lora(load_s=params.get("lora_load_s", DEFAULT_LOAD_S).number(minimum=0.0),
                evict_s=params.get("lora_evict_s", DEFAULT_EVICT_S).number(minimum=0.0),
                busy_s=params.get("lora_busy_s", DEFAULT_BUSY_S).number(minimum=0.0))
