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
    # The router's requests this scrape counted that have been answered since (request_left).
    left: int = 0

    def request_left(self) -> None:
        """One of the router's requests in flight at this scrape has since been answered.

        The scrape is up to an interval old, and a request it saw waiting that has since
        been answered is not waiting any more: counted as waiting until the next scrape,
        it moved a conversation's next turn off the replica holding its prefix (the queue
        term charged a typical prompt for it).  Which of the requests was running and which
        waiting the scrape does not say; vLLM schedules first come first served, so the
        running ones are taken to leave first: once more have left than were running, each
        one more is one fewer waiting.  (Other clients' running requests make this lean
        to counting too many waiting, as without the correction.)"""
        self.left += 1
        if self.left > self.running and self.waiting >= 1.0:
            self.waiting -= 1.0
