from benchmarks.stats import distribution, median, percentile, summarize


def test_percentile_interpolates_like_numpy():
    data = [1, 2, 3, 4]
    assert percentile(data, 50) == 2.5
    assert percentile(data, 0) == 1
    assert percentile(data, 100) == 4
    assert percentile([5], 99) == 5
    assert percentile([], 50) is None
    assert abs(percentile(list(range(101)), 99) - 99) < 1e-9


def test_distribution_and_median():
    d = distribution([3, 1, 2])
    assert d == {"count": 3, "mean": 2.0, "p50": 2.0, "p90": 2.8, "p99": 2.98, "max": 3.0}
    assert distribution([])["mean"] is None
    assert median([None, 1, 3]) == 2


def test_summarize_counts_goodput_errors_and_usage():
    records = [
        {"ttft_s": 0.1, "e2e_s": 1.0, "output_tokens": 10, "prompt_tokens": 100, "cached_tokens": 50, "turn": 1},
        {"ttft_s": 2.0, "e2e_s": 3.0, "output_tokens": 10, "prompt_tokens": 100, "cached_tokens": 0, "turn": 0},
        {"ttft_s": None, "e2e_s": 0.5, "output_tokens": 0, "error": "http 500: boom"},
    ]
    s = summarize(records, itls=[0.01, 0.03], duration_s=2.0, slo_ttft_s=1.0)
    assert (s["requests"], s["ok"], s["errors"]) == (3, 2, 1)
    assert s["error_kinds"] == {"http 500": 1}
    assert s["goodput"] == 0.5  # one request within the 1 s TTFT SLO, over 2 s
    assert s["output_throughput"] == 10.0
    assert s["usage_hit_rate"] == 0.25
    assert (s["followup_usage_hit_rate"], s["first_turn_usage_hit_rate"]) == (0.5, 0.0)
    assert abs(s["itl_s"]["p50"] - 0.02) < 1e-12
    assert s["ttft_s"]["count"] == 2
