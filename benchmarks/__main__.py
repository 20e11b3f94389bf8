"""`python -m benchmarks run --scenario FILE` | `report DIR` | `check FILE`.

Ctrl-C or SIGTERM at any point stops every process the run started (each by its own PID)
before exiting with status 130; a scenario error exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import resource
import signal
import sys
from pathlib import Path

from benchmarks.procs import Processes
from benchmarks.scenario import ConfigError, load_scenario, parse_target
from router.validation import Node


def _raise_fd_limit() -> None:
    """Thousands of concurrent streams need thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def _run(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario)
    if args.output:
        scenario = dataclasses.replace(scenario, output=Path(args.output))
    targets = None
    if args.targets:
        variants = {name: Node(value, f"variants.{name}", scenario.file)
                    for name, value in (scenario.raw.get("variants") or {}).items()}
        targets = [parse_target(Node(t.strip(), "--targets", "command line"), variants)
                   for t in args.targets.split(",")]
    procs = Processes()
    # SIGTERM behaves like Ctrl-C: KeyboardInterrupt unwinds the run, the finally stops everything.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if scenario.mode == "overhead":
            from benchmarks.overhead import run_overhead
            out = asyncio.run(run_overhead(scenario, procs, targets=targets, progress=not args.no_progress))
        else:
            from benchmarks.runner import run_routing
            out = asyncio.run(run_routing(scenario, procs, targets=targets, progress=not args.no_progress))
    except KeyboardInterrupt:
        print("\nbenchmarks: interrupted; stopping every process this run started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
    print(f"results: {out / 'results.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a scenario: fleet, every target, report")
    run.add_argument("--scenario", required=True, help="benchmarks/scenarios/NAME.yaml")
    run.add_argument("--targets", help="comma-separated subset, e.g. ours:cache_aware,sglang-router:cache_aware")
    run.add_argument("--output", help="write here instead of the scenario's output folder")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    rep = sub.add_parser("report", help="rebuild results.md and the plots from OUTPUT/runs/*.json")
    rep.add_argument("output")
    check = sub.add_parser("check", help="validate a scenario file")
    check.add_argument("scenario")
    args = parser.parse_args(argv)
    _raise_fd_limit()
    try:
        if args.command == "check":
            scenario = load_scenario(args.scenario)
            print(f"{args.scenario}: ok ({scenario.mode}, {len(scenario.targets)} targets, "
                  f"{scenario.fleet.size} replicas)")
            return 0
        if args.command == "report":
            from benchmarks.report import write_report
            print(f"results: {write_report(Path(args.output))}")
            return 0
        return _run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
