"""`python -m benchmarks run --scenario FILE` | `chaos [...]` | `report DIR` | `check FILE`.

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
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.procs import Processes
from benchmarks.scenario import ConfigError, load_scenario, parse_target
from yamlcheck import Node


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
    if scenario.mode == "overhead":
        from benchmarks.overhead import run_overhead

        return _execute(lambda procs: run_overhead(scenario, procs, targets=targets,
                                                   progress=not args.no_progress))
    from benchmarks.runner import run_routing

    return _execute(lambda procs: run_routing(scenario, procs, targets=targets,
                                              progress=not args.no_progress))


def _chaos(args: argparse.Namespace, argv: list[str] | None) -> int:
    from benchmarks.chaos import run_chaos
    from benchmarks.chaos_settings import settings_from

    settings = settings_from(args, "python -m benchmarks " + " ".join(
        sys.argv[1:] if argv is None else argv))
    return _execute(lambda procs: run_chaos(settings, procs))


def _execute(run: Callable[[Processes], Coroutine[Any, Any, Path]]) -> int:
    """Run one benchmark coroutine; every process it started is stopped whatever happens."""
    procs = Processes()
    # Outside the event loop SIGTERM behaves like Ctrl-C too: KeyboardInterrupt unwinds the
    # run and the finally stops everything.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        out = asyncio.run(_interruptible(run(procs)))
    except KeyboardInterrupt:
        print("\nbenchmarks: interrupted; stopping every process this run started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
    print(f"results: {out / 'results.md'}")
    return 0


T = TypeVar("T")

RECANCEL_INTERVAL_S = 0.5  # how often an interrupted run is cancelled again until it stops


async def _interruptible(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro`; SIGINT or SIGTERM cancels it and ends in KeyboardInterrupt.

    asyncio.run's own Ctrl-C handling cancels the main task once; a cancellation that lands
    while an inner asyncio.wait_for completes is swallowed (a known race in Python 3.11), and
    the run then went on to the end and exited 0.  Here the run is cancelled again every
    RECANCEL_INTERVAL_S until it stops, and whatever it returns, an interrupted run ends in
    KeyboardInterrupt (exit status 130 after every started process is stopped).
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    interrupted = False

    def cancel_again() -> None:
        if not task.done():
            task.cancel()
            loop.call_later(RECANCEL_INTERVAL_S, cancel_again)

    def interrupt() -> None:
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            cancel_again()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupt)
    try:
        result = await task
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.default_int_handler)
    if interrupted:
        raise KeyboardInterrupt
    return result

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
    chaos = sub.add_parser("chaos", help="the reliability experiments (benchmarks/chaos.py)")
    from benchmarks.chaos_settings import add_arguments

    add_arguments(chaos)
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
        if args.command == "chaos":
            return _chaos(args, argv)
        if args.command == "report":
            from benchmarks.overhead import write_overhead_report
            from benchmarks.report import read_meta, write_report

            out = Path(args.output)
            meta = read_meta(out)
            written = write_overhead_report(out, meta) if meta.get("mode") == "overhead" else write_report(out)
            print(f"results: {written}")
            return 0
        return _run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
