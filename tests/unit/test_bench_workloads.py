"""Workloads: deterministic for a seed, and shaped as their scenario says."""

import pytest

from benchmarks.scenario import WORKLOAD_PARAMS, WorkloadSpec
from benchmarks.workloads import CHARS_PER_TOKEN, build, messages_for, render, words, zipf_counts


def spec(kind, **overrides):
    params = {k: v[0] for k, v in WORKLOAD_PARAMS[kind].items()}
    params.update(overrides)
    return WorkloadSpec(kind, params)


@pytest.mark.parametrize("kind", list(WORKLOAD_PARAMS))
def test_same_seed_same_workload_other_seed_other_text(kind):
    small = {"duration_s": 5.0} if kind == "trace" else {}
    assert build(spec(kind, **small), 7) == build(spec(kind, **small), 7)
    a, b = build(spec(kind, **small), 7), build(spec(kind, **small), 8)
    if kind == "trace":  # the trace is the data: its text is per hash id, whatever the seed
        assert a == b
    else:
        assert a.sessions[0].turns[0].text != b.sessions[0].turns[0].text


def test_words_have_the_asked_size():
    import random
    for tokens in (1, 5, 100, 1000):
        assert len(words(random.Random(1), tokens)) == tokens * CHARS_PER_TOKEN


def test_multi_turn_shape():
    w = build(spec("multi_turn", users=3, rounds=5, system_prompt_tokens=200, question_tokens=20,
                   answer_tokens=30, think_time_s=0.5, history_tokens=100), 1)
    assert len(w.sessions) == 3 and w.total_requests == 15
    systems = {s.system for s in w.sessions}
    assert len(systems) == 1  # one system prompt shared by every user
    assert len(next(iter(systems))) >= 200 * CHARS_PER_TOKEN
    s = w.sessions[0]
    assert all(t.max_tokens == 30 for t in s.turns)
    assert [t.think_s for t in s.turns] == [0.0, 0.5, 0.5, 0.5, 0.5]
    history_chars = sum(len(c) for _, c in s.history)
    assert 100 * CHARS_PER_TOKEN <= history_chars <= 110 * CHARS_PER_TOKEN
    assert s.history != w.sessions[1].history  # each user has their own history


def test_next_turn_prompt_extends_the_previous_one():
    w = build(spec("multi_turn", users=1, rounds=3), 1)
    s = w.sessions[0]
    first = render(messages_for(s, [], 0))
    second = render(messages_for(s, ["an answer"], 1))
    assert second.startswith(first)  # the template closes turn 1 after the generation prompt
    msgs = messages_for(s, ["a1", "a2"], 2)
    assert [m["role"] for m in msgs] == ["system", *["user", "assistant"] * (len(s.history) // 2), "user",
                                         "assistant", "user", "assistant", "user"][: len(msgs)]
    assert msgs[-2] == {"role": "assistant", "content": "a2"}


def test_shared_prefix_groups_and_order():
    w = build(spec("shared_prefix", groups=4, prompts_per_group=3, prefix_tokens=100, question_tokens=10), 1)
    assert w.total_requests == 12
    by_group = {}
    for s in w.sessions:
        by_group.setdefault(s.group, set()).add(s.system)
        assert len(s.turns) == 1
    assert len(by_group) == 4 and all(len(v) == 1 for v in by_group.values())  # one prefix per group
    assert [s.group for s in w.sessions] != sorted(s.group for s in w.sessions)  # shuffled


def test_zipf_popularity():
    import random
    assert zipf_counts(4, 12, 0, random.Random(1)) == [3, 3, 3, 3]
    counts = zipf_counts(8, 4000, 1.2, random.Random(1))
    assert sum(counts) == 4000
    assert counts[0] > 2 * counts[3] > 0  # the most popular group dominates


def test_agentic_contexts_grow_by_short_tool_results():
    w = build(spec("agentic", agents=2, steps=4, context_tokens=500, tool_result_tokens=20), 1)
    assert w.total_requests == 8
    s = w.sessions[0]
    assert len(s.turns[0].text) > 500 * CHARS_PER_TOKEN
    assert all(len(t.text) < 30 * CHARS_PER_TOKEN for t in s.turns[1:])


def test_no_reuse_prompts_share_no_first_block():
    w = build(spec("no_reuse", requests=50, prompt_tokens=64), 1)
    assert all(s.system is None for s in w.sessions)
    assert len({s.turns[0].text[:16] for s in w.sessions}) == 50
