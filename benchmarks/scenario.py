"""Scenario files: what to run, on which fleet, through which targets, and where to write.

A scenario is YAML validated with `yamlcheck.Node`, so every mistake names the
file, the key path, what was found and what was expected (unknown keys get a "did you
mean").  See benchmarks/README.md for the full schema with an example per workload.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yamlcheck import ConfigError, Node, describe, load_yaml

WORKLOAD_KINDS = ("multi_turn", "shared_prefix", "agentic", "no_reuse", "lora", "trace")
ARRIVAL_KINDS = ("poisson", "sweep", "closed", "trace")
FLEET_KINDS = ("sim", "real")
MODES = ("routing", "overhead")

OUR_POLICIES = ("round_robin", "least_load", "prefix_affinity", "session", "cache_aware",
                "power_of_two", "random")
PEER_POLICIES = {
    "vllm-router": ("cache_aware", "round_robin", "kv_aware", "power_of_two", "random",
                    "consistent_hash", "sticky_least_loaded"),
    "sglang-router": ("cache_aware", "round_robin", "power_of_two", "random"),
    # smg (Shepherd Model Gateway) 1.13, the successor of sglang-router
    "smg": ("cache_aware", "least_load", "prefix_hash", "round_robin", "power_of_two", "random",
            "consistent_hashing"),
}
TARGET_KINDS = ("ours", "vllm-router", "smg", "sglang-router", "direct")

# Per workload kind: parameter -> (default, kind) where kind is "int", "num", "bool" or "str".
WORKLOAD_PARAMS: dict[str, dict[str, tuple[Any, str]]] = {
    "multi_turn": {
        "users": (16, "int"),
        "rounds": (4, "int"),
        "system_prompt_tokens": (1000, "int"),
        "history_tokens": (0, "int"),  # each user's own earlier conversation, before round 1
        "question_tokens": (50, "int"),
        "answer_tokens": (100, "int"),
        "think_time_s": (1.0, "num"),
    },
    "shared_prefix": {
        "groups": (16, "int"),
        "prompts_per_group": (8, "int"),
        "prefix_tokens": (2000, "int"),
        "question_tokens": (128, "int"),
        "answer_tokens": (64, "int"),
        "zipf": (0.0, "num"),  # 0: every group gets prompts_per_group; s > 0: Zipf(s) popularity
    },
    "agentic": {
        "agents": (4, "int"),
        "steps": (12, "int"),
        "system_prompt_tokens": (1500, "int"),
        "context_tokens": (4000, "int"),
        "tool_result_tokens": (200, "int"),
        "answer_tokens": (48, "int"),
        "think_time_s": (0.0, "num"),
        "tool_calls": (False, "bool"),  # a real tool loop: each answer calls the tool (agent_apis.py)
    },
    "lora": {  # one adapter per task: its own instructions, Zipf-popular; names adapter-0..N-1
        "adapters": (8, "int"),
        "requests": (200, "int"),
        "prompt_tokens": (600, "int"),  # the adapter's task instructions, shared by its requests
        "question_tokens": (60, "int"),
        "answer_tokens": (48, "int"),
        "zipf": (1.0, "num"),
    },
    "trace": {  # a public production trace, replayed at its timestamps (benchmarks/trace.py)
        "file": ("benchmarks/traces/mooncake/conversation_trace.jsonl", "str"),
        "start_s": (0.0, "num"),  # the window: trace seconds [start_s, start_s + duration_s)
        "duration_s": (120.0, "num"),
        "time_scale": (1.0, "num"),  # arrivals this many times faster (load)
        "token_scale": (0.25, "num"),  # prompt lengths (and the 512-token blocks) times this
        "output_scale": (1.0, "num"),
        "max_requests": (0, "int"),  # 0: the whole window
    },
    "no_reuse": {
        "requests": (128, "int"),
        "prompt_tokens": (1000, "int"),
        "answer_tokens": (64, "int"),
    },
}


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    kind: str
    params: dict[str, Any]

    def __getattr__(self, name: str) -> Any:  # spec.users reads params["users"]
        try:
            return self.params[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True, slots=True)
class ArrivalSpec:
    kind: str  # poisson | sweep | closed | trace (each request at its trace timestamp)
    qps: float = 0.0  # poisson
    qps_values: tuple[float, ...] = ()  # sweep
    concurrency: int = 0  # closed

    @property
    def points(self) -> list[float | None]:
        """The load points of a run: one per QPS for a sweep, else a single one."""
        if self.kind == "sweep":
            return list(self.qps_values)
        return [self.qps if self.kind == "poisson" else None]


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    tp: int = 1
    count: int = 1
    kv_blocks: int | None = None  # None: the fleet default
    role: str = "both"  # prefill / decode / both: the router's pools (routes.yaml backends' role)


@dataclass(frozen=True, slots=True)
class FleetSpec:
    kind: str = "sim"
    replicas: tuple[ReplicaSpec, ...] = (ReplicaSpec(tp=1, count=2),)
    kv_blocks: int = 512
    block_size: int = 16
    time_scale: float = 1.0
    max_num_seqs: int = 64
    kv_events: bool = False
    sim_args: tuple[str, ...] = ()
    engines_config: str = "config/engines-cpu.yaml"  # real mode
    startup_timeout_s: float = 60.0

    @property
    def size(self) -> int:
        return sum(r.count for r in self.replicas)

    def expanded(self) -> list[ReplicaSpec]:
        """One ReplicaSpec per replica, kv_blocks filled in."""
        out = []
        for spec in self.replicas:
            for _ in range(spec.count):
                out.append(ReplicaSpec(tp=spec.tp, count=1, kv_blocks=spec.kv_blocks or self.kv_blocks,
                                       role=spec.role))
        return out


@dataclass(frozen=True, slots=True)
class TargetSpec:
    kind: str  # ours | vllm-router | sglang-router | direct
    policy: str = ""
    variant: str = ""  # a name from the scenario's `variants:`, e.g. "balanced"
    args: tuple[str, ...] = ()  # peers: extra command-line flags of the variant
    params: tuple[tuple[str, Any], ...] = ()  # ours: routing.params of the variant (`terms`: routing.terms)

    @property
    def name(self) -> str:
        if self.kind == "direct":
            return "direct"
        return f"{self.kind}:{self.policy}" + (f"@{self.variant}" if self.variant else "")

    @property
    def slug(self) -> str:
        return self.name.replace(":", "__").replace("@", "__")


@dataclass(frozen=True, slots=True)
class LimitsSpec:
    max_requests: int = 1000
    max_duration_s: float = 120.0
    request_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class OverheadSpec:
    rates: tuple[float, ...] = (50.0, 200.0)
    duration_s: float = 10.0
    prompt_tokens: int = 64
    output_tokens: int = 8
    saturation_concurrency: int = 64
    saturation_duration_s: float = 10.0
    streams: int = 1000
    stream_tokens: int = 40
    stream_step_s: float = 0.2  # many-streams phase: every engine step lasts at least this (paces tokens)
    stream_ramp_s: float = 2.0  # the streams start evenly over this long
    router_core: int = 0
    client_core: int = 1


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    file: str
    output: Path
    fleet: FleetSpec
    targets: tuple[TargetSpec, ...]
    workload: WorkloadSpec | None = None
    arrival: ArrivalSpec = ArrivalSpec(kind="closed", concurrency=8)
    description: str = ""
    mode: str = "routing"
    seed: int = 0
    model: str = "sim-model"
    api: str = "chat"
    ignore_eos: bool = True
    limits: LimitsSpec = LimitsSpec()
    slo_ttft_s: float = 1.0
    repeats: int = 1
    overhead: OverheadSpec | None = None
    raw: dict[str, Any] = field(default_factory=dict)


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
    """`direct`, `ours:POLICY`, `vllm-router:POLICY` or `sglang-router:POLICY`, each optionally
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
    options = OUR_POLICIES if kind == "ours" else PEER_POLICIES[kind]
    policy = Node(policy, node.path, node.file).choice(options)
    if not variant:
        return TargetSpec(kind, policy)
    variants = variants or {}
    if variant not in variants:
        hint = difflib.get_close_matches(variant, list(variants), n=1)
        node.fail(f"unknown variant '{variant}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
                  + f" (variants: {', '.join(variants) or 'none defined'})")
    spec = variants[variant]
    if kind == "ours":
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


__all__ = ["ConfigError", "Scenario", "load_scenario", "parse_scenario", "parse_target"]
