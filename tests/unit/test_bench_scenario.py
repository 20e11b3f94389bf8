"""Scenario files: precise errors for every mistake, and every shipped scenario is valid."""

from pathlib import Path

import pytest
import yaml

from benchmarks.scenario import ConfigError, load_scenario, parse_scenario
from yamlcheck import Node

SCENARIOS = sorted(Path(__file__).resolve().parents[2].joinpath("benchmarks", "scenarios").glob("*.yaml"))

BASE = {
    "name": "t",
    "workload": {"kind": "multi_turn", "users": 2, "rounds": 2},
    "arrival": {"kind": "poisson", "qps": 2},
    "fleet": {"replicas": [{"tp": 1, "count": 2}]},
    "targets": ["ours:round_robin", "vllm-router:cache_aware", "direct"],
}


def parse(data):
    return parse_scenario(Node(data, "", "s.yaml"))


def error(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return str(info.value)


def with_(path, value):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    node = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return data


def test_base_is_valid():
    s = parse(BASE)
    assert [t.name for t in s.targets] == ["ours:round_robin", "vllm-router:cache_aware", "direct"]
    assert s.workload.users == 2 and s.workload.answer_tokens == 100  # defaults filled in
    assert s.arrival.points == [2.0]
    assert s.output == Path("benchmarks/results/t")


def test_unknown_top_key_suggests():
    assert error(with_("fleeet", {})) == "s.yaml: fleeet: unknown key 'fleeet'; did you mean 'fleet'? " \
        "(allowed: name, description, mode, output, seed, model, api, ignore_eos, workload, arrival, limits, " \
        "slo, fleet, targets, variants, repeats, overhead)"


def test_wrong_type_names_the_path():
    assert "s.yaml: workload.users: expected an integer, found str 'many'" in error(with_("workload.users", "many"))


def test_key_of_another_workload_kind():
    msg = error(with_("workload.groups", 3))
    assert msg.startswith("s.yaml: workload.groups: unknown key 'groups'")


def test_target_policy_typo():
    data = with_("targets", ["ours:cache_awre"])
    assert "targets[0]: expected one of" in error(data) and "did you mean 'cache_aware'?" in error(data)


def test_target_errors():
    assert "targets[0]: expected 'ours:POLICY'" in error(with_("targets", ["ours"]))
    assert "targets[1]: target 'direct' is listed twice" in error(with_("targets", ["direct", "direct"]))
    assert "needs KV events" in error(with_("targets", ["vllm-router:kv_aware"]))
    assert "sglang-router:kv_aware" not in error(with_("targets", ["sglang-router:kv_aware"]))
    assert "targets: expected at least one target" in error(with_("targets", []))


def test_arrival_errors():
    assert "arrival.qps_values: expected at least one QPS value" in error(
        with_("arrival", {"kind": "sweep", "qps_values": []}))
    assert "arrival.qps: expected a number greater than 0" in error(with_("arrival", {"kind": "poisson", "qps": 0}))
    assert "arrival.concurrency: unknown key" in error(
        with_("arrival", {"kind": "poisson", "qps": 1, "concurrency": 3}))


def test_fleet_errors():
    assert "fleet.replicas[0].tp: expected a value <= 8, found 16" in error(with_("fleet.replicas", [{"tp": 16}]))
    assert "fleet.kind: expected one of sim, real" in error(with_("fleet.kind", "k8s"))


def test_overhead_only_in_overhead_mode():
    assert "overhead: only valid with mode: overhead" in error(with_("overhead", {"rates": [10]}))


def test_missing_name():
    data = dict(BASE)
    del data["name"]
    assert error(data) == "s.yaml: name: required key is missing"


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_shipped_scenarios_are_valid(path):
    scenario = load_scenario(path)
    assert scenario.name == path.stem
    assert str(scenario.output) == f"benchmarks/results/{path.stem}"


def test_the_required_scenarios_exist():
    names = {p.stem for p in SCENARIOS}
    assert {"multi_turn", "shared_prefix", "agentic", "no_reuse", "overhead", "real_vllm"} <= names


def test_variants_for_peers_and_ours():
    data = with_("targets", ["vllm-router:cache_aware@balanced", "ours:cache_aware@wide", "vllm-router:cache_aware"])
    data["variants"] = {"balanced": ["--balance-abs-threshold", 2], "wide": {"load_factor": 1.5}}
    s = parse(data)
    peer, ours, plain = s.targets
    assert peer.name == "vllm-router:cache_aware@balanced" and peer.args == ("--balance-abs-threshold", "2")
    assert peer.slug == "vllm-router__cache_aware__balanced"
    assert ours.params == (("load_factor", 1.5),) and plain.args == ()


def test_variant_errors():
    data = with_("targets", ["vllm-router:cache_aware@balancd"])
    data["variants"] = {"balanced": ["--x"]}
    assert "targets[0]: unknown variant 'balancd'; did you mean 'balanced'?" in error(data)
    data = with_("targets", ["ours:cache_aware@balanced"])
    data["variants"] = {"balanced": ["--x"]}
    assert "variants.balanced: a variant used by our router is a mapping of routing params" in error(data)
    data["variants"] = {"balanced": 3}
    assert "variants.balanced: expected a list of peer flags" in error(data)


def test_envoy_picker_targets_take_our_policies_and_variants():
    data = with_("targets", ["envoy-picker:cache_aware", "envoy-picker:cache_aware@lean"])
    data["variants"] = {"lean": {"lean": True}}
    targets = parse(data).targets
    assert [t.name for t in targets] == ["envoy-picker:cache_aware", "envoy-picker:cache_aware@lean"]
    assert dict(targets[1].params) == {"lean": True}
    assert "did you mean 'cache_aware'?" in error(with_("targets", ["envoy-picker:cache_awre"]))
