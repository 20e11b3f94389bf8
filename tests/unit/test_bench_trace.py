"""Trace replay (benchmarks/trace.py): Mooncake's format, deterministic synthesized prompts
whose shared hash-id prefixes are shared text prefixes, the window and its time compression."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.scenario import load_scenario
from benchmarks.trace import read_mooncake, window
from benchmarks.workloads import build

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "benchmarks/traces/mooncake/conversation_trace.jsonl"


def _trace(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_equal_hash_prefixes_are_equal_text_prefixes(tmp_path) -> None:
    path = _trace(tmp_path, [
        {"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": list(range(46, 58)) + [2353, 2354]},
        {"timestamp": 3000, "input_length": 6472, "output_length": 26, "hash_ids": list(range(46, 58)) + [2366]},
        {"timestamp": 9000, "input_length": 100, "output_length": 5, "hash_ids": [7]},
    ])
    a, b, c = window(read_mooncake(path), start_s=0, duration_s=60, time_scale=2.0, token_scale=0.25,
                     output_scale=1.0)
    shared = 12 * 128 * 4  # 12 blocks of 512 * 0.25 tokens, 4 characters a token
    assert a.prompt[:shared] == b.prompt[:shared] and a.prompt[shared:shared + 64] != b.prompt[shared:shared + 64]
    assert len(a.prompt) == round(6955 * 0.25) * 4 and len(c.prompt) == 25 * 4
    assert not c.prompt.startswith(a.prompt[:16])  # another first block: another text
    assert (a.at_s, b.at_s, c.at_s) == (0.0, 1.5, 4.5)  # compressed 2x
    assert a.output_tokens == 52
    again = window(read_mooncake(path), start_s=0, duration_s=60, time_scale=2.0, token_scale=0.25,
                   output_scale=1.0)
    assert [r.prompt for r in again] == [a.prompt, b.prompt, c.prompt]  # deterministic


def test_the_window_and_request_cap(tmp_path) -> None:
    path = _trace(tmp_path, [{"timestamp": t, "input_length": 600, "output_length": 10, "hash_ids": [t, t + 1]}
                             for t in range(0, 10_000, 1000)])
    got = window(read_mooncake(path), start_s=3, duration_s=4, time_scale=1, token_scale=1, output_scale=0.5)
    assert [r.at_s for r in got] == [0.0, 1.0, 2.0, 3.0] and got[0].output_tokens == 5
    assert len(window(read_mooncake(path), start_s=0, duration_s=100, time_scale=1, token_scale=1,
                      output_scale=1, max_requests=3)) == 3
    bad = _trace(tmp_path, [{"timestamp": 0, "input_length": 1}])
    with pytest.raises(ValueError, match="no .output_length."):
        list(read_mooncake(bad))


def test_the_shipped_trace_scenario_builds_a_timed_workload() -> None:
    scenario = load_scenario(ROOT / "benchmarks/scenarios/trace_conversation.yaml")
    assert scenario.arrival.kind == "trace" and scenario.api == "completions"
    workload = build(scenario.workload, scenario.seed)
    sessions = workload.sessions
    assert len(sessions) == 275  # the trace's 900-990 s
    starts = [s.start_s for s in sessions]
    assert starts == sorted(starts) and 0 <= starts[0] < 5 and 55 < starts[-1] < 60  # replayed 1.5x faster
    assert all(s.prompt and len(s.turns) == 1 for s in sessions)
    assert SHIPPED.stat().st_size > 2_000_000 and (SHIPPED.parent / "LICENSE-APACHE").exists()


def test_a_trace_workload_needs_trace_arrivals(tmp_path) -> None:
    doc = (ROOT / "benchmarks/scenarios/trace_conversation.yaml").read_text().replace(
        "arrival: {kind: trace}", "arrival: {kind: closed, concurrency: 4}")
    path = tmp_path / "s.yaml"
    path.write_text(doc)
    with pytest.raises(Exception, match="arrives at its own timestamps"):
        load_scenario(path)
