"""Counters from /metrics, and the report's tables, ratios and plots from raw runs."""

import json

import pytest

from benchmarks.fleet import counters, fleet_counters
from benchmarks.report import write_report
from benchmarks.report_runs import aggregate
from benchmarks.report_tables import ratio_table, routing_tables

PAGE = """
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 500.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 300.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 7.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 3.0
vllm:prompt_tokens_total{engine="0",model_name="m"} 1500.0
vllm:prompt_tokens_cached_total{engine="0",model_name="m"} 300.0
vllm:cache_config_info{block_size="16",enable_prefix_caching="True",num_gpu_blocks="1024"} 1.0
"""

LEGACY = 'vllm:gpu_prefix_cache_queries_total{model_name="m"} 10\nvllm:gpu_prefix_cache_hits_total{model_name="m"} 4\n'


def test_counters_sum_label_sets_and_read_cache_config():
    c = counters(PAGE)
    assert c["queries"] == 1500 and c["hits"] == 300 and c["requests"] == 10
    assert c["block_size"] == 16 and c["num_gpu_blocks"] == 1024
    assert counters(LEGACY) == {"queries": 10, "hits": 4}


def test_fleet_counters_deltas_and_balance():
    before = [{"queries": 100, "hits": 0, "requests": 1, "prompt_tokens": 100, "cached_prompt_tokens": 0}] * 2
    after = [
        {"queries": 1100, "hits": 600, "requests": 7, "prompt_tokens": 1100, "cached_prompt_tokens": 600},
        {"queries": 600, "hits": 100, "requests": 3, "prompt_tokens": 600, "cached_prompt_tokens": 100},
    ]
    f = fleet_counters(before, after)
    assert f["hit_rate"] == 700 / 1500
    assert f["busiest_request_share"] == 0.75  # deltas 6 and 2 requests
    assert f["busiest_prefill_share"] == 400 / 800


def run(target, ttft, hit, qps=None, repeat=0, oracle=0.8):
    return {
        "target": target, "qps": qps, "repeat": repeat,
        "summary": {"ttft_s": {"mean": ttft, "p50": ttft, "p90": ttft, "p99": 2 * ttft},
                    "itl_s": {"p50": 0.01, "p99": 0.02}, "e2e_s": {"p50": 1.0, "p99": 2.0},
                    "output_throughput": 100.0, "goodput": 5.0, "errors": 0},
        "replicas": {"hit_rate": hit, "busiest_request_share": 0.4, "busiest_prefill_share": 0.5},
        "oracle": {"hit_rate": oracle, "hit_rate_unbounded": 0.9, "capacity_blocks": 100, "block_size": 16},
        "router_resources": {"cpu_s": 1.0, "peak_rss_mb": 50.0},
    }


RUNS = [
    run("ours:round_robin", 0.2, 0.4),
    run("ours:cache_aware", 0.1, 0.7),
    run("ours:cache_aware", 0.3, 0.7, repeat=1),
    run("ours:cache_aware", 0.2, 0.7, repeat=2),
    run("vllm-router:cache_aware", 0.25, 0.6),
    run("sglang-router:cache_aware", 0.15, 0.5),
]


def test_repeats_are_combined_by_median():
    agg = aggregate(RUNS)
    row = agg[("ours:cache_aware", None)]
    assert row["summary"]["ttft_s"]["p50"] == 0.2 and row["repeats"] == 3


def test_ratios_to_best_peer_and_round_robin():
    agg = aggregate(RUNS)
    rows = {t: r for (t, _), r in agg.items()}
    table = ratio_table(rows, list(rows))
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table.splitlines() if "`" in line}
    best_peer = lines[("`ours:cache_aware`", "best peer")].split("|")
    assert best_peer[3].strip() == f"{0.2 / 0.15:.2f}"  # TTFT p50 vs sglang's 0.15 (lowest of the peers)
    assert best_peer[7].strip() == f"{0.7 / 0.6:.2f}"  # hit rate vs vllm-router's 0.6 (highest)
    assert lines[("`ours:cache_aware`", "round robin")].split("|")[3].strip() == "1.00"
    assert ("`ours:round_robin`", "round robin") not in lines  # no comparison with itself


def test_table_shows_fraction_of_oracle():
    text = routing_tables(aggregate(RUNS))
    row = next(line for line in text.splitlines() if line.startswith("| `ours:cache_aware`"))
    assert "87.5%" in row  # 0.7 / 0.8
    assert "Oracle hit rate (one cache of the fleet's 100 blocks x 16 tokens): 80.0%" in text


def test_write_report_with_plots(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "runs").mkdir()
    more = [run("ours:cache_aware", 0.3, 0.7, qps=4.0), run("ours:round_robin", 0.4, 0.4, qps=4.0)]
    for i, r in enumerate(RUNS + more):
        (tmp_path / "runs" / f"{i}.json").write_text(json.dumps(r))
    (tmp_path / "meta.json").write_text(json.dumps({"scenario": "s", "command": "python -m benchmarks run x"}))
    path = write_report(tmp_path)
    text = path.read_text()
    assert "![TTFT](ttft.png)" in text and "Command: `python -m benchmarks run x`" in text
    assert (tmp_path / "ttft.png").stat().st_size > 1000 and (tmp_path / "hit_rate.png").stat().st_size > 1000


def test_index_puts_scenarios_side_by_side(tmp_path):
    from benchmarks.report import write_index

    for scenario, hit in (("alpha", 0.72), ("beta", 0.4)):
        folder = tmp_path / scenario
        (folder / "runs").mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"scenario": scenario, "description": "A thing. More."}))
        (folder / "runs" / "a.json").write_text(json.dumps(run("ours:cache_aware", 0.1, hit)))
    text = write_index(tmp_path).read_text()
    assert "| target | alpha | beta |" in text
    assert "| `ours:cache_aware` | 100 / 200, 90% | 100 / 200, 50% |" in text
    assert "- [alpha](alpha/results.md): A thing." in text
