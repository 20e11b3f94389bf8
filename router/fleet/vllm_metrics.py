"""vLLM's own answers, parsed: /metrics into `EngineLoad`, /v1/models into served names.

Pure functions (no I/O), so the monitor's polling (router/fleet/monitor.py) and the benchmarks
share one parser.  /metrics is read with prometheus_client's parser, summed over the
``engine`` label (data-parallel engines behind one server), accepting the current and the
older (gpu_*) metric names; only the lines of the wanted families are parsed, since a
vLLM server exports hundreds of series.  Names checked against a real vLLM 0.32 server
(../shared/reference/).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import orjson
from prometheus_client.parser import text_string_to_metric_families

from router.fleet.engine_load import EngineLoad

# Sample names read from vLLM /metrics: the current name first, then older fallbacks.
RUNNING = ("vllm:num_requests_running",)
WAITING = ("vllm:num_requests_waiting",)
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total",
                  "vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries")
PREFIX_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total",
               "vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits")
FINISHED = ("vllm:request_success_total",)
CACHE_CONFIG = "vllm:cache_config_info"
# One series per label set ever true, valued at the time it was last set: the newest is now.
LORA_INFO = "vllm:lora_requests_info"
_WANTED = frozenset((*RUNNING, *WAITING, *KV_USAGE, *PREFIX_QUERIES, *PREFIX_HITS, CACHE_CONFIG,
                     LORA_INFO, *FINISHED))
MAX_ADAPTER_NAMES = 256  # of one lora_requests_info label (a replica's page is not trusted to be small)


def _adapter_names(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(n for n in value.split(",")[:MAX_ADAPTER_NAMES] if n)


def _int_label(value: str | None) -> int | None:
    try:
        number = int(float(value)) if value not in (None, "", "None") else None
    except ValueError:
        return None
    return number if number and number > 0 else None


def _wanted_lines(text: str) -> str:
    """Only the sample lines the router reads (a vLLM page is ~50 kB, mostly histograms).

    Filtering first makes a scrape ~50x cheaper to parse, which matters because parsing
    runs on the event loop: 64 replicas scraped every second must cost milliseconds.
    """
    keep = []
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        cut = line.find("{")
        if cut < 0:
            cut = line.find(" ")
        if line[:cut] in _WANTED:
            keep.append(line)
    keep.append("")
    return "\n".join(keep)


def parse_engine_load(text: str, model_names: Iterable[str] = (), *,
                      scraped_at: float | None = None, previous: EngineLoad | None = None) -> EngineLoad:
    """Read the load of one vLLM server from its /metrics text.

    Samples are summed over every label but ``model_name``; when samples carry a
    model_name that is one of `model_names`, only those count (a server may report
    several models).  For each quantity the first name present in the fallback list wins.
    `previous` (the replica's last load) gives ``intake_rate``.
    """
    wanted_models = set(model_names)
    values: dict[str, list[tuple[str | None, float]]] = {}
    block_size: int | None = None
    num_blocks: int | None = None
    lora: tuple[float, dict[str, str]] | None = None  # (set at, labels) of the newest series
    for family in text_string_to_metric_families(_wanted_lines(text)):
        for sample in family.samples:
            if sample.name not in _WANTED:
                continue
            labels = sample.labels
            if sample.name == CACHE_CONFIG:
                if block_size is None:
                    block_size = _int_label(labels.get("block_size"))
                num = _int_label(labels.get("num_gpu_blocks"))
                if num:  # data-parallel engines: each has its own blocks
                    num_blocks = (num_blocks or 0) + num
                continue
            if sample.name == LORA_INFO:
                if lora is None or sample.value > lora[0]:
                    lora = (sample.value, labels)
                continue
            values.setdefault(sample.name, []).append((labels.get("model_name"), sample.value))

    present_models = {m for series in values.values() for m, _ in series if m is not None}
    keep = wanted_models & present_models

    def total(names: tuple[str, ...]) -> float | None:
        for name in names:
            series = values.get(name)
            if series is None:
                continue
            if keep:
                return sum(v for m, v in series if m in keep)
            return sum(v for _, v in series)
        return None

    lora_labels = lora[1] if lora is not None else {}
    kv = total(KV_USAGE)
    kv_series = next((values[n] for n in KV_USAGE if n in values), [])
    kv_count = len([1 for m, _ in kv_series if not keep or m in keep]) or 1
    running = total(RUNNING) or 0.0
    finished = total(FINISHED) or 0.0
    now = time.monotonic() if scraped_at is None else scraped_at
    intake: float | None = None
    if previous is not None and previous.scraped_at and now > previous.scraped_at \
            and finished >= previous.finished:  # (a restart resets the counter)
        taken = running - previous.running + finished - previous.finished
        intake = max(0.0, taken) / (now - previous.scraped_at)
    return EngineLoad(
        running=running,
        waiting=total(WAITING) or 0.0,
        # a fraction per engine: average, not sum, over data-parallel engines
        kv_cache_usage=(kv / kv_count) if kv is not None else 0.0,
        prefix_cache_queries=total(PREFIX_QUERIES) or 0.0,
        prefix_cache_hits=total(PREFIX_HITS) or 0.0,
        block_size=block_size,
        num_gpu_blocks=num_blocks,
        running_adapters=_adapter_names(lora_labels.get("running_lora_adapters")),
        waiting_adapters=_adapter_names(lora_labels.get("waiting_lora_adapters")),
        max_loras=_int_label(lora_labels.get("max_lora")),
        scraped_at=now,
        finished=finished,
        intake_rate=intake,
    )


def parse_models(payload: bytes) -> tuple[frozenset[str], int | None]:
    """Served model ids and the largest max_model_len from a /v1/models body."""
    names, _, max_len = parse_model_cards(payload)
    return names, max_len


def parse_model_cards(payload: bytes) -> tuple[frozenset[str], dict[str, str], int | None]:
    """(served ids, {adapter id: its parent} for LoRA adapters, largest max_model_len)."""
    data = orjson.loads(payload)
    names: set[str] = set()
    parents: dict[str, str] = {}
    max_len: int | None = None
    for entry in (data.get("data") or ()) if isinstance(data, dict) else ():
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            names.add(entry["id"])
            parent = entry.get("parent")
            if isinstance(parent, str) and parent and parent != entry["id"]:
                parents[entry["id"]] = parent
            length = entry.get("max_model_len")
            if isinstance(length, int) and (max_len is None or length > max_len):
                max_len = length
    return frozenset(names), parents, max_len
