"""Scenario files: what to run, on which fleet, through which targets, and where to write.

A scenario is YAML validated with `yamlcheck.Node`, so every mistake names the
file, the key path, what was found and what was expected (unknown keys get a "did you
mean").  See benchmarks/README.md for the full schema with an example per workload.

This module reads and validates a file into the typed `Scenario` (benchmarks/scenario_specs.py)
against the names it may use (benchmarks/scenario_schema.py); both are importable from here too.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from benchmarks.scenario_schema import (
    ARRIVAL_KINDS,
    FLEET_KINDS,
    MODES,
    OUR_POLICIES,
    PEER_POLICIES,
    TARGET_KINDS,
    WORKLOAD_KINDS,
    WORKLOAD_PARAMS,
)
from benchmarks.scenario_specs import (
    ArrivalSpec,
    FleetSpec,
    LimitsSpec,
    OverheadSpec,
    ReplicaSpec,
    Scenario,
    TargetSpec,
    WorkloadSpec,
)
from yamlcheck import ConfigError, Node, describe, load_yaml

_TOP_KEYS = ("name", "description", "mode", "output", "seed", "model", "api", "ignore_eos",
             "workload", "arrival", "limits", "slo", "fleet", "targets", "variants", "repeats", "overhead")


def load_scenario(file: str | Path) -> Scenario:
    """Read and validate a scenario file; raises ConfigError with a precise path."""
    return parse_scenario(load_yaml(file))


def parse_scenario(root: Node) -> Scenario:
    root.mapping(_TOP_KEYS)
    name = root.get("name").string()
    mode = root.get("mode", "routing").choice(MODES)
    fleet = _fleet(root.get("fleet", {}))
    variants = _variants(root.get("variants", {}))
    targets = _targets(root.get("targets"), fleet, variants)
    output = Path(root.get("output", f"benchmarks/results/{name}").string())
    limits_node = root.get("limits", {}).mapping(("max_requests", "max_duration_s", "request_timeout_s"))
    limits = LimitsSpec(
        max_requests=limits_node.get("max_requests", 1000).integer(minimum=1),
        max_duration_s=limits_node.get("max_duration_s", 120.0).number(minimum=0, exclusive_minimum=True),
        request_timeout_s=limits_node.get("request_timeout_s", 60.0).number(minimum=0, exclusive_minimum=True),
    )
    slo = root.get("slo", {}).mapping(("ttft_s",))
    common = dict(
        name=name,
        file=str(root.file),
        output=output,
        fleet=fleet,
        targets=targets,
        description=root.get("description", "").string(non_empty=False),
        mode=mode,
        seed=root.get("seed", 0).integer(minimum=0),
        model=root.get("model", "sim-model").string(),
        api=root.get("api", "chat").choice(("chat", "completions", "responses", "messages")),
        ignore_eos=root.get("ignore_eos", True).boolean(),
        limits=limits,
        slo_ttft_s=slo.get("ttft_s", 1.0).number(minimum=0, exclusive_minimum=True),
        repeats=root.get("repeats", 1).integer(minimum=1, maximum=20),
        raw=dict(root.value),
    )
    if mode == "overhead":
        if root.has("workload"):
            root.get("workload").fail("an overhead scenario generates its own tiny requests; remove 'workload'")
        return Scenario(overhead=_overhead(root.get("overhead", {})), **common)
    if root.has("overhead"):
        root.get("overhead").fail("only valid with mode: overhead")
    workload, arrival = _workload(root.get("workload")), _arrival(root.get("arrival"))
    if (workload.kind == "trace") != (arrival.kind == "trace"):
        root.get("arrival").fail("a trace workload arrives at its own timestamps: use arrival {kind: trace} "
                                 "with workload {kind: trace}, and only there")
    return Scenario(workload=workload, arrival=arrival, **common)


def _workload(node: Node) -> WorkloadSpec:
    node.mapping(("kind", *{k for params in WORKLOAD_PARAMS.values() for k in params}))
    kind = node.get("kind").choice(WORKLOAD_KINDS)
    allowed = WORKLOAD_PARAMS[kind]
    node.mapping(("kind", *allowed))  # now reject keys of other kinds with a precise path
    params: dict[str, Any] = {}
    for key, (default, typ) in allowed.items():
        child = node.get(key, default)
        if typ == "int":
            params[key] = child.integer(minimum=0)
        elif typ == "bool":
            params[key] = child.boolean()
        elif typ == "str":
            params[key] = child.string()
        else:
            params[key] = child.number(minimum=0)
    for key in ("users", "rounds", "groups", "prompts_per_group", "agents", "steps", "requests", "adapters",
                "answer_tokens", "prompt_tokens"):
        if key == "prompt_tokens" and kind == "lora":
            continue  # 0: the adapters' requests share no instructions
        if key in params and params[key] < 1:
            node.get(key).fail(f"expected a value >= 1, found {params[key]}")
    return WorkloadSpec(kind=kind, params=params)


def _arrival(node: Node) -> ArrivalSpec:
    node.mapping(("kind", "qps", "qps_values", "concurrency"))
    kind = node.get("kind").choice(ARRIVAL_KINDS)
    if kind == "trace":
        node.mapping(("kind",))
        return ArrivalSpec(kind)
    if kind == "poisson":
        node.mapping(("kind", "qps"))
        return ArrivalSpec(kind, qps=node.get("qps").number(minimum=0, exclusive_minimum=True))
    if kind == "sweep":
        node.mapping(("kind", "qps_values"))
        values_node = node.get("qps_values")
        values = tuple(item.number(minimum=0, exclusive_minimum=True) for item in values_node.items())
        if not values:
            values_node.fail("expected at least one QPS value")
        return ArrivalSpec(kind, qps_values=values)
    node.mapping(("kind", "concurrency"))
    return ArrivalSpec(kind, concurrency=node.get("concurrency").integer(minimum=1))


def _fleet(node: Node) -> FleetSpec:
    node.mapping(("kind", "replicas", "kv_blocks", "block_size", "time_scale", "max_num_seqs",
                  "kv_events", "sim_args", "engines_config", "startup_timeout_s"))
    replicas = []
    reps_node = node.get("replicas", [{"tp": 1, "count": 2}])
    for item in reps_node.items():
        item.mapping(("tp", "count", "kv_blocks", "role"))
        replicas.append(ReplicaSpec(
            tp=item.get("tp", 1).integer(minimum=1, maximum=8),
            count=item.get("count", 1).integer(minimum=1, maximum=64),
            kv_blocks=item.get("kv_blocks").integer(minimum=1) if item.has("kv_blocks") else None,
            role=item.get("role", "both").choice(("prefill", "decode", "both")),
        ))
    if not replicas:
        reps_node.fail("expected at least one replica")
    return FleetSpec(
        kind=node.get("kind", "sim").choice(FLEET_KINDS),
        replicas=tuple(replicas),
        kv_blocks=node.get("kv_blocks", 512).integer(minimum=1),
        block_size=node.get("block_size", 16).integer(minimum=1),
        time_scale=node.get("time_scale", 1.0).number(minimum=0, exclusive_minimum=True),
        max_num_seqs=node.get("max_num_seqs", 64).integer(minimum=1),
        kv_events=node.get("kv_events", False).boolean(),
        sim_args=tuple(node.get("sim_args", []).string_list()),
        engines_config=node.get("engines_config", "config/engines-cpu.yaml").string(),
        startup_timeout_s=node.get("startup_timeout_s", 60.0).number(minimum=1),
    )


def parse_target(node: Node, variants: dict[str, Node] | None = None) -> TargetSpec:
    """`direct`, `ours:POLICY`, `envoy-picker:POLICY`, `vllm-router:POLICY`, `smg:POLICY` or
    `sglang-router:POLICY`, each optionally
    `@VARIANT` naming an entry of the scenario's `variants:` (peer flags, or our routing params)."""
    text = node.string()
    text, _, variant = text.partition("@")
    kind, _, policy = text.partition(":")
    kind = Node(kind, node.path, node.file).choice(TARGET_KINDS)
    if kind == "direct":
        if policy:
            node.fail("'direct' takes no policy")
        return TargetSpec("direct")
    if not policy:
        node.fail(f"expected '{kind}:POLICY'")
    ours = kind in ("ours", "envoy-picker")
    options = OUR_POLICIES if ours else PEER_POLICIES[kind]
    policy = Node(policy, node.path, node.file).choice(options)
    if not variant:
        return TargetSpec(kind, policy)
    variants = variants or {}
    if variant not in variants:
        hint = difflib.get_close_matches(variant, list(variants), n=1)
        node.fail(f"unknown variant '{variant}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
                  + f" (variants: {', '.join(variants) or 'none defined'})")
    spec = variants[variant]
    if ours:
        if not isinstance(spec.value, dict):
            spec.fail("a variant used by our router is a mapping of routing params (and `terms`: weights)")
        return TargetSpec(kind, policy, variant, params=tuple(sorted(spec.value.items())))
    if not isinstance(spec.value, list):
        spec.fail(f"a variant used by {kind} is a list of its command-line flags")
    return TargetSpec(kind, policy, variant, args=tuple(str(a) for a in spec.value))


def _variants(node: Node) -> dict[str, Node]:
    if node.value is None:
        return {}
    if not isinstance(node.value, dict):
        node.fail(f"expected a mapping of variant names, found {describe(node.value)}")
    out = {}
    for key in node.value:
        child = node.get(str(key))
        if not isinstance(child.value, (list, dict)):
            child.fail("expected a list of peer flags or a mapping of our routing params")
        out[str(key)] = child
    return out


def _targets(node: Node, fleet: FleetSpec, variants: dict[str, Node]) -> tuple[TargetSpec, ...]:
    targets = []
    seen = set()
    for item in node.items():
        target = parse_target(item, variants)
        if target.name in seen:
            item.fail(f"target '{target.name}' is listed twice")
        if target.kind == "vllm-router" and target.policy == "kv_aware" and not fleet.kv_events:
            item.fail("vllm-router:kv_aware needs KV events: set fleet.kv_events: true")
        seen.add(target.name)
        targets.append(target)
    if not targets:
        node.fail("expected at least one target")
    return tuple(targets)


def _overhead(node: Node) -> OverheadSpec:
    node.mapping(("rates", "duration_s", "prompt_tokens", "output_tokens", "saturation_concurrency",
                  "saturation_duration_s", "streams", "stream_tokens", "stream_step_s", "stream_ramp_s",
                  "router_core", "client_core"))
    d = OverheadSpec()
    rates_node = node.get("rates", list(d.rates))
    rates = tuple(item.number(minimum=0, exclusive_minimum=True) for item in rates_node.items())
    if not rates:
        rates_node.fail("expected at least one rate")
    return OverheadSpec(
        rates=rates,
        duration_s=node.get("duration_s", d.duration_s).number(minimum=0, exclusive_minimum=True),
        prompt_tokens=node.get("prompt_tokens", d.prompt_tokens).integer(minimum=1),
        output_tokens=node.get("output_tokens", d.output_tokens).integer(minimum=1),
        saturation_concurrency=node.get("saturation_concurrency", d.saturation_concurrency).integer(minimum=1),
        saturation_duration_s=node.get("saturation_duration_s", d.saturation_duration_s).number(
            minimum=0, exclusive_minimum=True),
        streams=node.get("streams", d.streams).integer(minimum=0),
        stream_tokens=node.get("stream_tokens", d.stream_tokens).integer(minimum=1),
        stream_step_s=node.get("stream_step_s", d.stream_step_s).number(minimum=0, exclusive_minimum=True),
        stream_ramp_s=node.get("stream_ramp_s", d.stream_ramp_s).number(minimum=0),
        router_core=node.get("router_core", d.router_core).integer(minimum=0),
        client_core=node.get("client_core", d.client_core).integer(minimum=0),
    )


__all__ = ["ARRIVAL_KINDS", "FLEET_KINDS", "MODES", "OUR_POLICIES", "PEER_POLICIES", "TARGET_KINDS",
           "WORKLOAD_KINDS", "WORKLOAD_PARAMS", "ArrivalSpec", "ConfigError", "FleetSpec", "LimitsSpec",
           "OverheadSpec", "ReplicaSpec", "Scenario", "TargetSpec", "WorkloadSpec", "load_scenario",
           "parse_scenario", "parse_target"]
