"""Router overhead with an instantly answering replica: what the router itself costs.

Three phases, every target against `direct` (the client straight to the replica):

1. added latency at fixed request rates: open-loop Poisson at each rate, tiny prompts and a
   few output tokens, a simulator whose cost model runs `fleet.time_scale` times faster than
   real time (so the engine answers in microseconds); added = target percentile - direct
   percentile at the same rate;
2. maximum sustained request rate: a closed loop of `saturation_concurrency` clients; the
   router runs pinned to one core (`taskset -c router_core`, set before exec so all its
   threads inherit it) while the simulator and the load generator share `client_core`.
   The router's CPU use over the phase says whether the router or the client/simulator side
   was the limit (100% of one core: the router);
3. added inter-token latency with `streams` concurrent streams of `stream_tokens` tokens,
   started evenly over `stream_ramp_s`; the simulator runs in real time with every engine
   step lasting at least `stream_step_s` (its --step-overhead-s), which paces the tokens so
   that two cores can carry thousands of streams (slowing the whole cost model instead would
   make prefill steps last seconds).

Figures are medians over `repeats`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.fleet import Fleet
from benchmarks.procs import Processes
from benchmarks.report import provenance
from benchmarks.report_columns import dig
from benchmarks.report_plots import pyplot, save_figure, target_colors
from benchmarks.report_runs import load_runs, read_meta, target_order
from benchmarks.runner import Progress, clear_runs, git_state, load_with_resources, write_meta
from benchmarks.scenario_specs import Scenario, TargetSpec
from benchmarks.stats import median, summarize
from benchmarks.targets import start_target, stop_target
from benchmarks.workloads import Session, Turn, Workload

_FILLER = "Reply with a few words about routing. " * 64


def tiny_workload(count: int, prompt_tokens: int, output_tokens: int) -> Workload:
    """`count` single-turn sessions with short, distinct prompts (cheap to build in bulk)."""
    filler = _FILLER[: max(0, prompt_tokens * 4 - 12)]
    sessions = tuple(
        Session(f"o{i}", None, (), (Turn(text=f"req {i:07d} " + filler, max_tokens=output_tokens),))
        for i in range(count)
    )
    return Workload("overhead", sessions)


def _pin_self(core: int | None) -> set[int] | None:
    if core is None or not hasattr(os, "sched_setaffinity"):
        return None
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {core})
    except OSError:
        return None
    return before


async def _phase(scenario: Scenario, fleet: Fleet, running, http, bar, *, phase: str, rate: float | None,
                 concurrency: int, duration_s: float, workload: Workload, repeat: int,
                 out: Path, ramp_s: float = 0.0) -> dict[str, Any]:
    ov = scenario.overhead
    spec = loadgen.LoadSpec(
        url=running.url, model=scenario.model, api="completions",
        arrival="poisson" if rate is not None else "closed", qps=rate or 0.0, concurrency=concurrency,
        max_requests=workload.total_requests, max_duration_s=duration_s,
        request_timeout_s=scenario.limits.request_timeout_s, ignore_eos=True, seed=scenario.seed + repeat,
        ramp_s=ramp_s)
    await fleet.idle(http)
    result, resources = await load_with_resources(running, spec, workload, on_done=bar.update, http=http)
    if resources is not None:
        resources["core_utilization"] = round(resources["cpu_s"] / max(result.duration_s, 1e-9), 3)
        done = sum(1 for r in result.records if not r.get("error"))
        resources["cpu_ms_per_request"] = round(resources["cpu_s"] * 1000 / done, 4) if done else None
    run = {
        "scenario": scenario.name, "target": running.spec.name, "phase": phase, "rate": rate,
        "concurrency": concurrency if rate is None else None, "repeat": repeat,
        "summary": summarize(result.records, result.itls, result.duration_s, scenario.slo_ttft_s),
        "router_resources": resources, "stopped_by": result.stopped_by,
        "settings": {"prompt_tokens": ov.prompt_tokens, "output_tokens": ov.output_tokens if phase != "streams"
                     else ov.stream_tokens},
    }
    name = f"{running.spec.slug}__{phase}" + (f"{rate:g}" if rate is not None else "") + f"__rep{repeat}.json"
    (out / "runs" / name).write_text(json.dumps(run, default=str))
    return run


async def _target_phases(scenario: Scenario, fleet: Fleet, running, http, bar, phase_fleet: str, rep: int,
                         out: Path, sat_reqs: int) -> None:
    ov = scenario.overhead
    name = running.spec.name
    if phase_fleet == "streams":
        bar.describe(f"{name}: {ov.streams} streams (repeat {rep + 1})")
        await _phase(scenario, fleet, running, http, bar, phase="streams", rate=None, concurrency=ov.streams,
                     duration_s=scenario.limits.max_duration_s,
                     workload=tiny_workload(ov.streams, ov.prompt_tokens, ov.stream_tokens),
                     repeat=rep, out=out, ramp_s=ov.stream_ramp_s)
        return
    for rate in ov.rates:
        bar.describe(f"{name}: {rate:g} req/s (repeat {rep + 1})")
        await _phase(scenario, fleet, running, http, bar, phase="rate", rate=rate, concurrency=0,
                     duration_s=ov.duration_s,
                     workload=tiny_workload(math.ceil(rate * ov.duration_s * 1.2) + 10, ov.prompt_tokens,
                                            ov.output_tokens),
                     repeat=rep, out=out)
    bar.describe(f"{name}: saturation, {ov.saturation_concurrency} clients (repeat {rep + 1})")
    await _phase(scenario, fleet, running, http, bar, phase="saturation", rate=None,
                 concurrency=ov.saturation_concurrency, duration_s=ov.saturation_duration_s,
                 workload=tiny_workload(sat_reqs, ov.prompt_tokens, ov.output_tokens), repeat=rep, out=out)


async def run_overhead(scenario: Scenario, procs: Processes, *, targets: list[TargetSpec] | None = None,
                       progress: bool = True, port_base: int | None = None) -> Path:
    ov = scenario.overhead
    out = scenario.output
    (out / "runs").mkdir(parents=True, exist_ok=True)
    targets = list(targets or scenario.targets)
    if not any(t.kind == "direct" for t in targets):
        targets.insert(0, TargetSpec("direct"))
    reps = scenario.repeats
    git = git_state()
    for target in targets:
        clear_runs(out / "runs", target)
    sat_reqs = int(ov.saturation_duration_s * 4000)  # more than one core can send: the deadline ends it
    bar = Progress(None, progress)  # saturation runs are bounded by time, not count
    saved = _pin_self(ov.client_core)
    cores = str(ov.router_core)
    http = loadgen.make_client()
    sim_pin = ["taskset", "-c", str(ov.client_core)] if saved is not None else []
    try:
        for phase_fleet in ("instant", "streams"):
            if phase_fleet == "streams" and ov.streams == 0:
                continue
            fleet_spec = scenario.fleet
            if phase_fleet == "streams":
                fleet_spec = dataclasses.replace(
                    scenario.fleet, time_scale=1.0, max_num_seqs=max(scenario.fleet.max_num_seqs, ov.streams + 16),
                    sim_args=(*scenario.fleet.sim_args, "--step-overhead-s", repr(ov.stream_step_s)))
            fleet = Fleet(fleet_spec, scenario.model, procs, out / "logs", port_base, argv_prefix=sim_pin)
            bar.describe(f"starting fleet ({phase_fleet})")
            await fleet.start(http)
            backends = fleet.backends()
            try:
                # Repeat-major order: every target runs once before any runs again, so a drift in
                # the machine's background load spreads over all targets instead of hitting one.
                for rep in range(reps):
                    for target in targets:
                        # `workers: N` (ours): N processes get every core, shared with the client side
                        workers = int(dict(target.params).get("workers", 1))
                        running = await start_target(target, procs=procs, model=scenario.model, backends=backends,
                                                     run_dir=out, http=http, cores=cores if workers == 1 else None,
                                                     startup_timeout_s=scenario.fleet.startup_timeout_s)
                        try:
                            await _target_phases(scenario, fleet, running, http, bar, phase_fleet, rep, out, sat_reqs)
                        finally:
                            stop_target(running, procs)
            finally:
                fleet.stop()
        write_meta(scenario, out, {"mode": "overhead", "settings": dataclasses.asdict(ov),
                                   "time_scale": scenario.fleet.time_scale}, git)
    finally:
        bar.close()
        await http.close()
        if saved is not None:
            os.sched_setaffinity(0, saved)
    write_overhead_report(out, read_meta(out))
    return out


# -- report -----------------------------------------------------------------------------------

def _ms(v: Any) -> str:
    return "–" if v is None else f"{v * 1000:.2f}"


def _agg(runs: list[dict[str, Any]]) -> dict[tuple[str, str, float | None], dict[str, Any]]:
    """(target, phase, rate) -> figures, each the median over repeats."""
    groups: dict[tuple[str, str, float | None], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["target"], run["phase"], run.get("rate"))].append(run)
    out = {}
    paths = {
        "ttft_p50": ("summary", "ttft_s", "p50"), "ttft_p99": ("summary", "ttft_s", "p99"),
        "e2e_p50": ("summary", "e2e_s", "p50"), "e2e_p99": ("summary", "e2e_s", "p99"),
        "itl_p50": ("summary", "itl_s", "p50"), "itl_p99": ("summary", "itl_s", "p99"),
        "rate": ("summary", "request_rate",), "errors": ("summary", "errors"),
        "cpu_s": ("router_resources", "cpu_s"), "rss": ("router_resources", "peak_rss_mb"),
        "cpu_ms": ("router_resources", "cpu_ms_per_request"),
        "core": ("router_resources", "core_utilization"),
    }
    for key, items in groups.items():
        out[key] = {name: median(dig(r, *path) for r in items) for name, path in paths.items()}
        out[key]["repeats"] = len(items)
    return out


def _order(names: set[str]) -> list[str]:
    """direct first, then the report's fixed target order (the same colours as other plots)."""
    return ["direct"] * ("direct" in names) + target_order([n for n in names if n != "direct"])


def _added(agg, target: str, phase: str, rate, field: str) -> float | None:
    mine, base = agg.get((target, phase, rate), {}).get(field), agg.get(("direct", phase, rate), {}).get(field)
    return None if mine is None or base is None else mine - base


def write_overhead_report(out: Path, meta: dict[str, Any]) -> Path:
    runs = load_runs(out)
    agg = _agg(runs)
    targets = _order({t for t, _, _ in agg})
    rates = sorted({r for _, p, r in agg if p == "rate"})
    s = meta.get("settings", {})
    lines = [f"# Scenario `{meta.get('scenario', out.name)}`: router overhead", ""]
    if meta.get("description"):
        lines += [meta["description"].strip(), ""]
    lines += [f"Requests: {s.get('prompt_tokens')}-token prompts, {s.get('output_tokens')} output tokens, streamed; "
              f"simulator time scale {meta.get('time_scale')} (answers in microseconds). Routers pinned to core "
              f"{s.get('router_core')}; simulator and load generator on core {s.get('client_core')}.", ""]
    lines += ["## Added latency at fixed request rates (ms; added = target - direct at the same rate)", "",
              "| target | rate req/s | TTFT p50 | TTFT p99 | added TTFT p50 | added TTFT p99 | e2e p50 | e2e p99 | "
              "added e2e p50 | added e2e p99 | errors | router CPU s |",
              "|" + "---|" * 12]
    for rate in rates:
        for t in targets:
            row = agg.get((t, "rate", rate))
            if row is None:
                continue
            lines.append("| " + " | ".join([
                f"`{t}`", f"{rate:g}", _ms(row["ttft_p50"]), _ms(row["ttft_p99"]),
                _ms(_added(agg, t, "rate", rate, "ttft_p50")), _ms(_added(agg, t, "rate", rate, "ttft_p99")),
                _ms(row["e2e_p50"]), _ms(row["e2e_p99"]),
                _ms(_added(agg, t, "rate", rate, "e2e_p50")), _ms(_added(agg, t, "rate", rate, "e2e_p99")),
                f"{row['errors']:.0f}" if row["errors"] is not None else "–",
                f"{row['cpu_s']:.2f}" if row["cpu_s"] is not None else "–"]) + " |")
    lines += ["", f"## Maximum sustained request rate (closed loop, {s.get('saturation_concurrency')} clients)", "",
              "| target | req/s | e2e p50 ms | e2e p99 ms | errors | router core use | router CPU ms / request | "
              "one-core ceiling req/s (1 / CPU per request) | router peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in targets:
        row = agg.get((t, "saturation", None))
        if row is None:
            continue
        lines.append("| " + " | ".join([
            f"`{t}`", f"{row['rate']:.0f}" if row["rate"] else "–", _ms(row["e2e_p50"]), _ms(row["e2e_p99"]),
            f"{row['errors']:.0f}" if row["errors"] is not None else "–",
            f"{row['core'] * 100:.0f}%" if row["core"] is not None else "–",
            f"{row['cpu_ms']:.3f}" if row["cpu_ms"] else "–",
            f"{1000 / row['cpu_ms']:,.0f}" if row["cpu_ms"] else "–",
            f"{row['rss']:.0f}" if row["rss"] is not None else "–"]) + " |")
    direct_sat = agg.get(("direct", "saturation", None), {}).get("rate")
    if direct_sat:
        lines += ["", f"`direct` is the ceiling of the client + simulator side on one core ({direct_sat:.0f} req/s): "
                  "a router reaching it was not the bottleneck; a router whose core use is near 100% was. Where "
                  "the router's core was not saturated, the one-core ceiling (1 / its CPU time per request) is "
                  "the rate it could sustain if the client side were faster, assuming CPU per request stays flat."]
    streams = [t for t in targets if (t, "streams", None) in agg]
    if streams:
        lines += ["", f"## Added inter-token latency with {s.get('streams')} concurrent streams "
                  f"({s.get('stream_tokens')} tokens each, started over {s.get('stream_ramp_s')} s; "
                  f"every simulator step lasts at least {s.get('stream_step_s')} s)", "",
                  "| target | ITL p50 ms | ITL p99 ms | added ITL p50 | added ITL p99 | TTFT p99 ms | errors "
                  "| router core use |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in streams:
            row = agg[(t, "streams", None)]
            lines.append("| " + " | ".join([
                f"`{t}`", _ms(row["itl_p50"]), _ms(row["itl_p99"]),
                _ms(_added(agg, t, "streams", None, "itl_p50")), _ms(_added(agg, t, "streams", None, "itl_p99")),
                _ms(row["ttft_p99"]), f"{row['errors']:.0f}" if row["errors"] is not None else "–",
                f"{row['core'] * 100:.0f}%" if row["core"] is not None else "–"]) + " |")
    plt = pyplot()
    if plt is not None:
        _plot(agg, targets, rates, out / "overhead.png", plt)
        lines += ["", "![overhead](overhead.png)", ""]
    lines += provenance(meta)
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def _plot(agg, targets: list[str], rates: list[float], path: Path, plt) -> None:
    """Added e2e latency p50 and p99 per rate, and added ITL p50/p99 with many streams."""
    routers = [t for t in targets if t != "direct"]
    colors = target_colors(targets)
    streams = any((t, "streams", None) in agg for t in routers)
    fig, axes = plt.subplots(1, 3 if streams else 2, figsize=(16 if streams else 12, 4.5))
    width = 0.8 / max(1, len(routers))
    for ax, pct in zip(axes, ("p50", "p99")):
        for i, t in enumerate(routers):
            ys = [(_added(agg, t, "rate", r, f"e2e_{pct}") or 0) * 1000 for r in rates]
            ax.bar([x + i * width for x in range(len(rates))], ys, width, label=t, color=colors[t])
        ax.set_xticks([x + width * (len(routers) - 1) / 2 for x in range(len(rates))], [f"{r:g} req/s" for r in rates])
        ax.set_ylabel(f"added e2e latency {pct} (ms)")
        ax.set_title(f"router-added latency {pct} vs direct")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    if streams:
        ax = axes[2]
        for i, t in enumerate(routers):
            ys = [(_added(agg, t, "streams", None, f"itl_{pct}") or 0) * 1000 for pct in ("p50", "p99")]
            ax.bar([x + i * width for x in range(2)], ys, width, label=t, color=colors[t])
        ax.set_xticks([x + width * (len(routers) - 1) / 2 for x in range(2)], ["ITL p50", "ITL p99"])
        ax.set_ylabel("added inter-token latency (ms)")
        ax.set_title("added ITL, many concurrent streams")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    save_figure(plt, fig, path)
