"""The settings of a `python -m benchmarks chaos` run, and the command line that fills them.

Every chaos experiment module reads one `Settings` (sizes, rates, durations, which
experiments and faults to run, where to write); it lives here, below all of them, so that
none of them has to import the orchestrator (benchmarks/chaos.py) to know its type.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

FAULTS = ("kill", "stop", "status_500", "status_429", "slow", "flap")


@dataclass
class Settings:
    output: Path
    replicas: int = 4
    time_scale: float = 5.0  # the simulator's schedule runs this much faster than real time
    rate: float = 20.0  # requests/s during the fault experiment
    max_tokens: int = 24
    baseline_s: float = 6.0
    fault_s: float = 12.0
    recovery_s: float = 6.0
    streams: int = 5000
    stream_tokens: int = 32
    slowloris: int = 1000
    slowloris_s: float = 30.0
    prompts: int = 100_000
    prompt_concurrency: int = 32
    reload_rate: float = 100.0  # requests/s while reloads swap the backends (chaos_fleet.py)
    reload_s: float = 20.0
    slow_s: float = 20.0  # seconds of load per case of the slow-replica experiment
    slow_policies: tuple[str, ...] = ("round_robin", "cache_aware")
    flood_connections: int = 1000
    flood_cap: int = 100  # server.max_connections during the flood
    pool_size: int = 20  # proxy.max_connections during the pool experiment
    body_mib: int = 32
    body_count: int = 8
    experiments: tuple[str, ...] = ("faults", "streams", "slowloris", "prompts",
                                    "reload", "slow", "flood", "pool", "bodies")
    faults: tuple[str, ...] = FAULTS
    command: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Settings(output=Path("benchmarks/results/reliability"))
    parser.add_argument("--output", default=str(d.output))
    parser.add_argument("--experiments", default=",".join(d.experiments),
                        help="comma-separated subset of " + ",".join(d.experiments))
    parser.add_argument("--faults", default=",".join(d.faults),
                        help="comma-separated subset of " + ",".join(d.faults))
    for name in ("replicas", "streams", "slowloris", "prompts"):
        parser.add_argument("--" + name, type=int, default=getattr(d, name))
    for name in ("rate", "fault_s"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))


def settings_from(args: argparse.Namespace, command: str) -> Settings:
    experiments = tuple(e.strip() for e in args.experiments.split(",") if e.strip())
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    for what, chosen, known in (("experiments", experiments, Settings.experiments),
                                ("faults", faults, FAULTS)):
        unknown = set(chosen) - set(known)
        if unknown:
            raise SystemExit(f"error: unknown {what} {sorted(unknown)}; known: {', '.join(known)}")
    return Settings(output=Path(args.output), replicas=args.replicas, streams=args.streams,
                    slowloris=args.slowloris, prompts=args.prompts, rate=args.rate,
                    fault_s=args.fault_s, experiments=experiments, faults=faults, command=command)
