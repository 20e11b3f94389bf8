"""The typed scenario: frozen dataclasses for a run's workload, arrivals, fleet, targets,
limits and overhead phases, as the parser (benchmarks/scenario.py) builds them.

Every other module of the harness (fleet, targets, workloads, runner, overhead) reads
these, never the YAML; keeping them apart from the parsing lets those modules depend on
the types alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
