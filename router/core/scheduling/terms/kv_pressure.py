"""`kv_pressure`: the wait for KV-cache room on a replica whose cache is nearly full, in seconds.

The eviction term sees only what this router sent; the replica's own
``vllm:kv_cache_usage_perc`` (scraped, ``EngineLoad.kv_cache_usage``) sees every client.
When usage nears 1, vLLM's scheduler cannot allocate blocks for a new prompt until running
requests finish or are preempted (and preempted ones are recomputed later), so the new
request waits about a typical request's prefill, the likelier the fuller the cache:

    pressure_r     = max(0, usage_r - onset) / (1 - onset)          (0 below the onset, 1 full)
    kv_pressure_s_r = pressure_r x typical_tokens / rate_r

A replica never scraped (``scraped_at == 0``) has no pressure.  Off by default (weight 0 in
every preset): see benchmarks/results/ for the run that decides whether it earns a weight.

Parameters: kv_pressure_onset (0 <= x < 1, default 0.8): usage where the pressure starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.core.requests import RouteRequest
    from router.core.scheduling.candidates import Candidates
    from yamlcheck import Node

NAME = "kv_pressure"
NEEDS = ("rates",)
PARAMS = ("kv_pressure_onset",)
DEFAULT_ONSET = 0.8


class KvPressure:
    name = NAME

    def __init__(self, *, onset: float = DEFAULT_ONSET) -> None:
        self.onset = onset

    def costs(self, request: RouteRequest, cands: Candidates) -> list[float]:
        typical = cands.data["typical_tokens"]
        onset, span = self.onset, 1.0 - self.onset
        out = []
        for r, rate in zip(cands.replicas, cands.data["rates"]):
            load = r.load
            usage = load.kv_cache_usage if load.scraped_at > 0 else 0.0
            out.append((min(usage, 1.0) - onset) / span * typical / rate if usage > onset else 0.0)
        return out


def build(params: Node) -> KvPressure:
    return KvPressure(onset=params.get("kv_pressure_onset", DEFAULT_ONSET).number(minimum=0.0, maximum=0.99))
