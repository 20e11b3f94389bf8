"""`EngineLoad`: a replica's own view of its load, as its /metrics last said.

Its own module because three parts read it without needing the replica: the metric parser
that fills it (vllm_metrics.py), the adapter slots that learn from it (adapter_slots.py)
and the replica that holds it (replicas.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineLoad:
    """The replica's own view of its load, scraped from vLLM's /metrics.

    Values are summed over the `engine` label (data-parallel engines behind one server).
    Counters are cumulative as vLLM reports them; consumers take deltas.
    """

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0  # 0..1, blocks held by running requests
    prefix_cache_queries: float = 0.0  # tokens, cumulative
    prefix_cache_hits: float = 0.0  # tokens, cumulative
    block_size: int | None = None  # tokens per KV block, from cache_config_info
    num_gpu_blocks: int | None = None  # KV blocks, from cache_config_info
    scraped_at: float = 0.0  # time.monotonic() of the scrape; 0 = never
    # vllm:request_success_total (cumulative, every finished_reason) and, against the previous
    # scrape, how many requests a second the engine took into its batch since (the growth of
    # `running` plus those that finished); None without a previous scrape or after a restart.
    finished: float = 0.0
    intake_rate: float | None = None
    # LoRA (vllm:lora_requests_info, newest series): adapters of running / waiting requests,
    # and the adapters one batch may hold (--max-loras); None when LoRA is off or unreported.
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    max_loras: int | None = None
