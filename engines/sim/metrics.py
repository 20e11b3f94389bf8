"""The simulator's /metrics: vLLM 0.32's names, types, labels, help texts and buckets.

Every metric lives in this process's own ``CollectorRegistry`` (never the global one), labelled
``model_name`` and ``engine="0"`` exactly like ../shared/reference/metrics_sample.txt.
``legacy_names`` switches the three renamed metrics back to their pre-0.10 names
(``vllm:gpu_cache_usage_perc``, ``vllm:gpu_prefix_cache_queries``, ``vllm:gpu_prefix_cache_hits``)
so the router's fallback parsing can be tested.
"""

from __future__ import annotations

from collections import OrderedDict

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
ITERATION_BUCKETS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
                     8192.0, 16384.0)
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
LABELS = ("model_name", "engine")
LORA_SERIES = 64  # vLLM keeps every lora_requests_info label set; the simulator the newest 64


class SimMetrics:
    """Owns the registry; the engine calls the ``on_*`` hooks."""

    def __init__(self, model_name: str, *, block_size: int, num_gpu_blocks: int,
                 enable_prefix_caching: bool, gpu_memory_utilization: float, max_model_len: int = 8192,
                 num_gpu_blocks_override: int | None = None, user_specified_block_size: bool = False,
                 legacy_names: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        # The process/python collectors a real vLLM scrape starts with, in this registry too.
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        reg.register(GC_COLLECTOR)
        lv = {"model_name": model_name, "engine": "0"}

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=reg).labels(**lv)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=reg).labels(**lv)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=reg).labels(**lv)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        if legacy_names:
            self.kv_usage = gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.")
            self.prefix_queries = counter("vllm:gpu_prefix_cache_queries",
                                          "GPU prefix cache queries, in terms of number of queried tokens.")
            self.prefix_hits = counter("vllm:gpu_prefix_cache_hits",
                                       "GPU prefix cache hits, in terms of number of cached tokens.")
        else:
            self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
            self.prefix_queries = counter("vllm:prefix_cache_queries",
                                          "Prefix cache queries, in terms of number of queried tokens.")
            self.prefix_hits = counter("vllm:prefix_cache_hits",
                                       "Prefix cache hits, in terms of number of cached tokens.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        by_source = Counter("vllm:prompt_tokens_by_source", "Number of prompt tokens by source.",
                            LABELS + ("source",), registry=reg)
        self.prompt_compute = by_source.labels(**lv, source="local_compute")
        self.prompt_cache_hit = by_source.labels(**lv, source="local_cache_hit")
        by_source.labels(**lv, source="external_kv_transfer")
        self.prompt_tokens_cached = counter("vllm:prompt_tokens_cached",
                                            "Number of cached prompt tokens (local + external).")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          LABELS + ("finished_reason",), registry=reg)
        self.success = {r: success.labels(**lv, finished_reason=r) for r in FINISH_REASONS}
        rejections = Counter("vllm:admission_rejections",
                             "Number of admission attempts rejected by a queue limit, by reason.",
                             ("model_name", "reason"), registry=reg)
        self.rejected_queue_full = rejections.labels(model_name=model_name, reason="max_num_queued_reqs")
        rejections.labels(model_name=model_name, reason="max_num_queued_tokens")
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens",
                                               "Number of prefill tokens processed.", TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.", TOKEN_BUCKETS)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total",
                                          "Histogram of number of tokens per engine_step.", ITERATION_BUCKETS)
        self.params_max_tokens = histogram("vllm:request_params_max_tokens",
                                           "Histogram of the max_tokens request parameter.", TOKEN_BUCKETS)
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.tpot = histogram("vllm:request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", LATENCY_BUCKETS)
        self.inference_time = histogram("vllm:request_inference_time_seconds",
                                        "Histogram of time spent in RUNNING phase for request.", LATENCY_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.", LATENCY_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.", LATENCY_BUCKETS)
        config = _cache_config_labels(block_size, num_gpu_blocks, enable_prefix_caching, gpu_memory_utilization,
                                      max_model_len, num_gpu_blocks_override, user_specified_block_size)
        info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                     tuple(sorted(config)) + ("engine",), registry=reg)
        info.labels(**config, engine="0").set(1)
        # vLLM: one series per (max_lora, waiting, running) combination ever seen, each set to
        # the time it was last true; readers take the newest.  Kept to the last LORA_SERIES here.
        self.lora_info: Gauge | None = None
        self._lora_series: OrderedDict[tuple[str, str, str], None] = OrderedDict()

    def enable_lora(self) -> None:
        # The simulator's own counter (vLLM has none): adapters moved into GPU slots.
        self.lora_loads = Counter("sim:lora_loads", "Adapters the simulated replica loaded into a GPU "
                                  "slot (simulator only).", registry=self.registry)
        self.lora_info = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                               ("max_lora", "waiting_lora_adapters", "running_lora_adapters"),
                               registry=self.registry)

    def set_lora_info(self, max_lora: int, running: set[str], waiting: set[str]) -> None:
        if self.lora_info is None:
            return
        key = (str(max_lora), ",".join(sorted(waiting)), ",".join(sorted(running)))
        self.lora_info.labels(*key).set_to_current_time()
        self._lora_series[key] = None
        self._lora_series.move_to_end(key)
        while len(self._lora_series) > LORA_SERIES:
            old, _ = self._lora_series.popitem(last=False)
            self.lora_info.remove(*old)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- hooks ------------------------------------------------------------------------------
    def on_scheduled(self, queried_tokens: int, hit_tokens: int) -> None:
        """At admission of a request never preempted (vLLM keeps re-admissions apart)."""
        self.prefix_queries.inc(queried_tokens)
        self.prefix_hits.inc(hit_tokens)

    def on_step(self, running: int, waiting: int, kv_usage: float, step_tokens: int) -> None:
        self.set_load(running, waiting, kv_usage)
        if step_tokens:
            self.iteration_tokens.observe(step_tokens)

    def set_load(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)

    def on_first_token(self, prompt_len: int, cached: int, ttft: float) -> None:
        """vLLM counts prompt tokens (and their cached part) when the first token comes out."""
        self.prompt_tokens.inc(prompt_len)
        self.prompt_tokens_cached.inc(cached)
        self.prompt_cache_hit.inc(cached)
        self.prompt_compute.inc(prompt_len - cached)
        self.ttft.observe(ttft)


def _cache_config_labels(block_size: int, num_gpu_blocks: int, enable_prefix_caching: bool,
                         gpu_memory_utilization: float, max_model_len: int, num_gpu_blocks_override: int | None,
                         user_specified_block_size: bool) -> dict[str, str]:
    """The CacheConfig fields vLLM 0.32 puts on cache_config_info, with a simulated replica's values."""
    return {
        "_block_size_resolved": "True", "block_size": str(block_size), "cache_dtype": "auto",
        "cache_hit_alignment_tokens": "None", "effective_attention_block_size": str(block_size),
        "enable_mamba_shared_prefix_checkpoint": "False",
        "enable_prefix_caching": str(enable_prefix_caching),
        "gpu_memory_utilization": str(gpu_memory_utilization), "hash_block_size": "None",
        "is_attention_free": "False", "kv_cache_dtype_skip_layers": "[]", "kv_cache_layout": "None",
        "kv_cache_max_concurrency": str(block_size * num_gpu_blocks / max_model_len),
        "kv_cache_memory_bytes": "None",
        "kv_cache_size_tokens": str(block_size * num_gpu_blocks), "kv_offloading_backend": "native",
        "kv_offloading_size": "None", "kv_sharing_fast_prefill": "False", "mamba_block_size": "None",
        "mamba_cache_dtype": "auto", "mamba_cache_mode": "none", "mamba_page_size_padded": "None",
        "mamba_ssm_cache_dtype": "float32", "num_cpu_blocks": "None",
        "num_gpu_blocks": str(num_gpu_blocks), "num_gpu_blocks_override": str(num_gpu_blocks_override),
        "prefix_cache_retention_interval": "0", "prefix_caching_hash_algo": "sha256",
        "prefix_match_unit": "None", "replayssm_buffer_len": "16", "skip_page_size_padded": "None",
        "sliding_window": "None", "swa_bounded_replay": "True", "use_kda_recoverssm": "False",
        "use_replayssm": "False", "user_specified_block_size": str(user_specified_block_size),
    }
