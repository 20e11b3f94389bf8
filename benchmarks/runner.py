"""One routing scenario end to end: fleet up, every target in turn on the same fleet, report.

For each target (and each QPS of a sweep, and each repeat): the replicas' caches are reset
and drained, their counters read, the workload run through the target, the counters read
again, and the run's prompts replayed through the oracle.  One raw JSON per run goes to
OUTPUT/runs/, then the report (markdown + PNG) is rebuilt from all of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import loadgen, report
from benchmarks.fleet import Fleet, fleet_counters
from benchmarks.oracle import oracle
from benchmarks.procs import Processes
from benchmarks.scenario_specs import Scenario, TargetSpec
from benchmarks.stats import summarize
from benchmarks.targets import RunningTarget, start_target, stop_target, versions
from benchmarks.workloads import Workload, build


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        import psutil
        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib,
            "python": platform.python_version()}


def git_state() -> dict[str, Any]:
    """The commit the code under test came from, and which of its files differed from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no", "--",
                                      "router", "engines", "benchmarks").splitlines()]
    return {"git_commit": git("rev-parse", "--short", "HEAD").strip() or "unknown", "uncommitted": dirty}


def run_file_name(target: TargetSpec, qps: float | None, repeat: int) -> str:
    name = target.slug
    if qps is not None:
        name += f"__qps{qps:g}"
    return f"{name}__rep{repeat}.json"


def clear_runs(runs_dir: Path, target: TargetSpec) -> None:
    """Forget `target`'s earlier raw runs in this folder (other targets' runs stay, so one
    target can be re-run with --targets and the report still shows everyone)."""
    for old in runs_dir.glob(f"{target.slug}__*.json"):
        if json.loads(old.read_text()).get("target") == target.name:  # not a variant's runs
            old.unlink()


def write_meta(scenario: Scenario, out: Path, extra: dict[str, Any] | None = None,
               git: dict[str, Any] | None = None) -> None:
    meta = {
        "scenario": scenario.name,
        "description": scenario.description,
        "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
        "scenario_file": scenario.file,
        "scenario_yaml": scenario.raw,
        "versions": versions(),
        **(git or git_state()),
        "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **(extra or {}),
    }
    # Every command that wrote runs into this folder, oldest first: a later `--targets` run
    # replaces only the runs of the targets it names.
    previous = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    history = previous.get("history") or ([{k: previous.get(k) for k in _HISTORY_KEYS}] if previous else [])
    meta["history"] = [*history, {k: meta.get(k) for k in _HISTORY_KEYS}]
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))


_HISTORY_KEYS = ("command", "git_commit", "uncommitted", "finished_at")


class Progress:
    """A tqdm bar if tqdm is installed (the bench extra), else silent."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="req", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                print("benchmarks: install tqdm (pip install -e '.[bench]') for a progress bar", file=sys.stderr)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)
        else:
            print(f"benchmarks: {text}", file=sys.stderr)

    def update(self, _record: Any = None) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def _sample(sampler, stop: asyncio.Event) -> None:
    while not stop.is_set():
        sampler.sample()
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


async def load_with_resources(target: RunningTarget, spec: loadgen.LoadSpec, workload: Workload, *,
                              on_done, http) -> tuple[loadgen.LoadResult, dict[str, Any] | None]:
    """Run the load while sampling the target router's CPU and RSS (None for `direct`)."""
    stop = asyncio.Event()
    sampler_task = None
    if target.sampler is not None:
        target.sampler.start()
        sampler_task = asyncio.create_task(_sample(target.sampler, stop))
    try:
        result = await loadgen.run(spec, workload, on_done=on_done, http=http)
    finally:
        stop.set()
        if sampler_task is not None:
            await sampler_task
    return result, (target.sampler.stop() if target.sampler is not None else None)


def parse_prediction_counts(page: str) -> dict[tuple[str, str], float]:
    """router_prefix_predictions_total of a /metrics page, by (index, outcome)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(page):
        if family.name == "router_prefix_predictions":
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[(s.labels["index"], s.labels["outcome"])] = s.value
    return out


async def prediction_counts(http, target: RunningTarget) -> dict[tuple[str, str], float] | None:
    """Our router's prediction outcomes so far; None for the peers."""
    if target.spec.kind != "ours":
        return None
    total: dict[tuple[str, str], float] = {}
    for url in target.urls:  # a split target: every router's predictions
        async with http.get(url + "/metrics") as resp:
            for key, value in parse_prediction_counts(await resp.text()).items():
                total[key] = total.get(key, 0.0) + value
    return total


def prediction_summary(before: dict | None, after: dict | None) -> dict[str, Any] | None:
    """How well the router predicted each answer's cached_tokens over one run."""
    if before is None or after is None:
        return None
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    total = sum(delta.values())
    if not total:
        return {"requests": 0}
    exact = sum(v for (index, _), v in delta.items() if index == "exact")
    within = sum(v for (_, outcome), v in delta.items() if outcome == "within_block")
    exact_within = delta.get(("exact", "within_block"), 0.0)
    return {"requests": total, "exact_share": exact / total, "within_block_share": within / total,
            "exact_within_block_share": exact_within / exact if exact else None,
            "over": sum(v for (_, outcome), v in delta.items() if outcome == "over"),
            "under": sum(v for (_, outcome), v in delta.items() if outcome == "under")}


async def measure(scenario: Scenario, fleet: Fleet, target: RunningTarget, workload: Workload, qps: float | None,
                  http, progress: Progress, tokenize) -> dict[str, Any]:
    """One run: reset, counters, load, counters, oracle, summary."""
    await fleet.idle(http)  # nothing running (vLLM refuses to reset a cache in use)
    reset_how = await fleet.reset(http, fresh=False)  # the router hears AllBlocksCleared
    before = await fleet.read_counters(http)
    predicted_before = await prediction_counts(http, target)
    arrival = scenario.arrival
    spec = loadgen.LoadSpec(
        url=target.url, alt_urls=tuple(target.urls[1:]), model=scenario.model, api=scenario.api,
        arrival="trace" if scenario.arrival.kind == "trace" else "poisson" if qps is not None else "closed",
        qps=qps or 0.0,
        concurrency=arrival.concurrency or 1, max_requests=scenario.limits.max_requests,
        max_duration_s=scenario.limits.max_duration_s, request_timeout_s=scenario.limits.request_timeout_s,
        ignore_eos=scenario.ignore_eos, seed=scenario.seed)
    result, resources = await load_with_resources(target, spec, workload, on_done=progress.update, http=http)
    await fleet.idle(http)
    after = await fleet.read_counters(http)
    predicted = prediction_summary(predicted_before, await prediction_counts(http, target))
    tokens = await tokenize(result.prompts)
    return {
        "scenario": scenario.name,
        "target": target.spec.name,
        "qps": qps,
        "concurrency": arrival.concurrency if qps is None else None,
        "stopped_by": result.stopped_by,
        "summary": summarize(result.records, result.itls, result.duration_s, scenario.slo_ttft_s),
        "replicas": fleet_counters(before, after),
        "oracle": oracle(tokens, fleet.block_size, fleet.capacity_blocks),
        "router_resources": resources,
        "prediction": predicted,
        "cache_reset": reset_how,
        "records": result.records,
    }


async def run_routing(scenario: Scenario, procs: Processes, *, targets: list[TargetSpec] | None = None,
                      progress: bool = True, port_base: int | None = None) -> Path:
    """Run a routing scenario; returns the output folder (raw JSON, table, plots)."""
    out = scenario.output
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    targets = targets or list(scenario.targets)
    git = git_state()  # before the run: the code that is about to be measured
    workload = build(scenario.workload, scenario.seed)
    per_run = min(workload.total_requests, scenario.limits.max_requests)
    points = scenario.arrival.points
    bar = Progress(per_run * len(points) * scenario.repeats * len(targets), progress)
    http = loadgen.make_client()
    fleet = Fleet(scenario.fleet, scenario.model, procs, out / "logs", port_base)
    try:
        bar.describe("starting fleet")
        await fleet.start(http)
        tokenize = await fleet.tokenizer(http)
        backends = fleet.backends()
        for target in targets:
            clear_runs(runs_dir, target)
        # Repeat-major: every target runs once (in a fresh process) before any runs again, so a
        # drift in the machine's background load spreads over all targets.
        for rep in range(scenario.repeats):
            for target in targets:
                bar.describe(f"{target.name}: starting")
                # The fresh reset (a new KV-event stream) before the target starts: started
                # first, a router replayed the last target's events and kept their blocks,
                # the same prompts' (the stream restarting at sequence 0 read as batches it
                # had replayed): exact mode began each run believing the prompts cached.
                await fleet.idle(http)
                await fleet.reset(http)
                running = await start_target(target, procs=procs, model=scenario.model, backends=backends,
                                             run_dir=out, http=http,
                                             startup_timeout_s=scenario.fleet.startup_timeout_s)
                try:
                    for qps in points:
                        label = f"{target.name}" + (f" @ {qps:g} qps" if qps is not None else "")
                        bar.describe(label + (f" (repeat {rep + 1})" if scenario.repeats > 1 else ""))
                        run = await measure(scenario, fleet, running, workload, qps, http, bar, tokenize)
                        run["repeat"] = rep
                        run["git_commit"] = git["git_commit"]
                        (runs_dir / run_file_name(target, qps, rep)).write_text(json.dumps(run, default=str))
                finally:
                    stop_target(running, procs)
        write_meta(scenario, out, {"fleet": fleet.describe(), "workload_requests": workload.total_requests,
                                   "time_scale": scenario.fleet.time_scale,
                                   "fleet_kind": scenario.fleet.kind}, git)
    finally:
        bar.close()
        fleet.stop()
        await http.close()
    report.write_report(out)
    return out
