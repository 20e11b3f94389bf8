"""`python -m benchmarks chaos`: the router under faults and hostile load, with figures.

Nine experiments, each on a fresh fleet of simulated replicas behind our router (a real
`python -m router` process with the production defaults for health, breakers, timeouts
and admission; only the access log is off; benchmarks/chaos_rig.py):

* **faults** (benchmarks/chaos_faults.py): steady Poisson load of short streams; after a
  quiet baseline one replica is made sick for a while: SIGKILLed (stays dead), SIGSTOPped
  (then SIGCONT), answering 500 to everything, answering 429 with `Retry-After`, 10x
  slower, or flapping (1 s stopped, 1 s running).  Per fault: requests lost (any answer
  that is not a complete 200), TTFT p50/p99 before and during the fault, the time to
  reroute as a client sees it (from the fault to the start of the last request that still
  suffered from it: failed, or a TTFT above 3x the baseline p99 plus 50 ms; 0 when none
  did), and the sick replica's share of attempts before and during the fault (the router's
  `router_policy_decisions` plus `router_failovers` counters, sampled every 0.1 s).
* **streams**, **slowloris**, **prompts** (benchmarks/chaos_load.py): N concurrent streams
  opened at once (errors, the router's peak RSS and open file descriptors); M connections
  that send a request head one byte every 2 s while normal requests run; P unique prompts
  through the prefix index (the router's RSS must plateau at the index bound, not grow).
* **reload**, **slow** (benchmarks/chaos_fleet.py): reloads that swap the backends under
  load; one replica of four 20x slower, with and without latency ejection and hedging.
* **flood**, **pool**, **bodies** (benchmarks/chaos_limits.py): a connection flood over
  `server.max_connections`, a full upstream pool, memory per in-flight request body.

This module only runs the chosen experiments in that order and writes what they
measured: OUTPUT/results.json, then OUTPUT/results.md and one PNG per experiment
(benchmarks/chaos_report.py).  The settings and the command line: benchmarks/chaos_settings.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from benchmarks.chaos_faults import fault_run
from benchmarks.chaos_fleet import reload_run, slow_run
from benchmarks.chaos_limits import bodies_run, flood_run, pool_run
from benchmarks.chaos_load import prompts_run, slowloris_run, streams_run
from benchmarks.chaos_report import markdown, plot
from benchmarks.chaos_settings import Settings
from benchmarks.procs import Processes
from benchmarks.targets import versions

# The experiments after the first four, in the order they run: each takes the settings and
# the processes and returns its section of the results.
LATER_EXPERIMENTS: dict[str, Callable[[Settings, Processes], Awaitable[Any]]] = {
    "reload": reload_run, "slow": slow_run, "flood": flood_run, "pool": pool_run, "bodies": bodies_run}


async def run_chaos(settings: Settings, procs: Processes) -> Path:
    """Run the chosen experiments, one after another; returns the output folder."""
    out = settings.output
    out.mkdir(parents=True, exist_ok=True)
    # A run of some experiments updates their sections of the results already there (each
    # section says which command produced it); the others stay as they were measured.
    earlier: dict[str, Any] = {}
    if (out / "results.json").exists():
        earlier = json.loads((out / "results.json").read_text())
    known = set(Settings.experiments)
    results: dict[str, Any] = {k: v for k, v in earlier.items() if k in known and k not in settings.experiments}
    commands = {k: earlier.get("commands", {}).get(k, earlier.get("command", "")) for k in results}
    commands.update({e: settings.command for e in settings.experiments})
    results.update({"command": settings.command, "commands": commands, "versions": versions(),
                    "machine": f"{psutil.cpu_count()} CPUs, "
                               f"{round(psutil.virtual_memory().total / 2**30)} GiB",
                    "settings": {k: v for k, v in asdict(settings).items() if k not in ("output", "command")}})
    if "faults" in settings.experiments:
        results["faults"] = []
        for kind in settings.faults:
            print(f"chaos: fault {kind}", file=sys.stderr)
            results["faults"].append(await fault_run(settings, procs, kind))
    if "streams" in settings.experiments:
        print(f"chaos: {settings.streams} streams", file=sys.stderr)
        results["streams"] = await streams_run(settings, procs)
    if "slowloris" in settings.experiments:
        print(f"chaos: slowloris x{settings.slowloris}", file=sys.stderr)
        results["slowloris"] = await slowloris_run(settings, procs)
    if "prompts" in settings.experiments:
        print(f"chaos: {settings.prompts} unique prompts", file=sys.stderr)
        results["prompts"] = await prompts_run(settings, procs)
    for name, run in LATER_EXPERIMENTS.items():
        if name in settings.experiments:
            print(f"chaos: {name}", file=sys.stderr)
            results[name] = await run(settings, procs)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    figures = plot(results, out)
    (out / "results.md").write_text(markdown(results, figures))
    return out


__all__ = ["Settings", "run_chaos"]
