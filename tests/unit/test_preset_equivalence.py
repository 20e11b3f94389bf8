"""Every old policy name, now a preset of the scheduling pipeline, decides as before.

tests/unit/decision_trace.json holds the rankings the monolithic policies (router/policies/,
commit 2153b69) made on the deterministic stream of tests/unit/decision_trace.py: 10 cases
(every preset, some with non-default parameters) x 400 decisions, with loads, health,
candidate sets, conversations, index records and forgets, and learned rates all moving.
(cache_aware and session: re-recorded when rates came to be learned per capacity class;
see decision_trace.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.core.scheduling import PRESET_NAMES, build_profile
from tests.unit import decision_trace
from yamlcheck import Node

TRACE = json.loads((Path(__file__).parent / "decision_trace.json").read_text())


def test_the_trace_covers_every_preset() -> None:
    assert {case["policy"] for case in TRACE["cases"].values()} == set(PRESET_NAMES)
    assert TRACE["seed"] == decision_trace.SEED and TRACE["steps"] == decision_trace.STEPS


@pytest.mark.parametrize("label", sorted(TRACE["cases"]))
def test_preset_ranks_the_recorded_trace_exactly_as_the_old_policy(label: str) -> None:
    recorded = TRACE["cases"][label]
    profile = build_profile(recorded["policy"], Node(dict(recorded["params"]), "routing.params"))
    ids = [r.id for r in decision_trace.fleet()]
    expected = recorded["rankings"]
    for step, ((_, ranked), want) in enumerate(zip(decision_trace.run(profile.rank, profile.observe), expected)):
        got = "".join(str(ids.index(rid)) for rid in ranked)
        assert got == want, f"{label}: step {step} ranked {got}, the old policy {want}"
    assert step == len(expected) - 1
