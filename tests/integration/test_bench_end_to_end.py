"""A tiny scenario end to end against simulated replicas: fleet, our router, report; and an
interrupted run leaves no process behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from benchmarks.procs import Processes
from benchmarks.report import load_runs
from benchmarks.runner import run_routing
from benchmarks.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]

TINY = """
name: tiny
output: {out}
seed: 1
workload: {{kind: multi_turn, users: 3, rounds: 3, system_prompt_tokens: 300, history_tokens: 0,
           question_tokens: 20, answer_tokens: 8, think_time_s: 0.05}}
arrival: {{kind: {arrival}}}
limits: {{max_requests: {max_requests}, max_duration_s: {max_duration}, request_timeout_s: 20}}
fleet:
  replicas: [{{tp: 1, count: 1, kv_blocks: 256}}, {{tp: 2, count: 1, kv_blocks: 512}}]
  time_scale: 10
  startup_timeout_s: 30
targets: {targets}
variants: {{lean: {{lean: true}}}}
"""


def write(tmp_path, arrival="poisson, qps: 30", max_requests=9, max_duration=20,
          targets="[ours:round_robin, ours:cache_aware, direct]"):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(out=tmp_path / "out", arrival=arrival, max_requests=max_requests,
                                max_duration=max_duration, targets=targets))
    return path


async def test_tiny_scenario_end_to_end(tmp_path):
    """Our router, as its own proxy and as Envoy's endpoint picker (both bootstraps)."""
    scenario = load_scenario(write(tmp_path, targets="[ours:round_robin, ours:cache_aware, envoy-picker:cache_aware, "
                                                     "envoy-picker:cache_aware@lean, direct]"))
    with Processes() as procs:
        out = await run_routing(scenario, procs, progress=False)
        assert procs.running == []  # fleet, routers and Envoy stopped when the run ended
    runs = {r["target"]: r for r in load_runs(out)}
    assert set(runs) == {"ours:round_robin", "ours:cache_aware", "envoy-picker:cache_aware",
                         "envoy-picker:cache_aware@lean", "direct"}
    assert runs["envoy-picker:cache_aware"]["router_resources"]["cpu_s"] > 0  # the picker's and Envoy's
    for name, run in runs.items():
        s = run["summary"]
        assert (s["requests"], s["errors"]) == (9, 0), (name, s["error_kinds"])
        assert s["ttft_s"]["p50"] > 0 and s["output_tokens"] == 9 * 8
        replicas = run["replicas"]
        assert replicas["queries"] > 0 and 0 <= replicas["hit_rate"] <= 1
        assert run["oracle"]["requests"] == 9 and run["oracle"]["capacity_blocks"] == 768
        assert replicas["hit_rate"] <= run["oracle"]["hit_rate_unbounded"] * 1.15 + 0.02
        # the oracle tokenizes exactly as the replicas do: the same prompt tokens three ways
        assert replicas["queries"] == run["oracle"]["queries"] == s["prompt_tokens"]
        assert replicas["hit_rate"] == pytest.approx(s["usage_hit_rate"])
    assert runs["direct"]["replicas"]["busiest_request_share"] == 1.0  # one replica took everything
    assert runs["ours:round_robin"]["replicas"]["busiest_request_share"] < 0.8
    assert runs["ours:cache_aware"]["router_resources"]["peak_rss_mb"] > 10
    text = (out / "results.md").read_text()
    assert "`ours:cache_aware`" in text and "Oracle hit rate" in text and "Command:" in text


async def test_an_exact_mode_router_does_not_start_with_the_last_targets_blocks(tmp_path):
    """Two targets on one fleet with KV events, the exact-mode one second.  Its router once
    started before the fleet's reset and replayed the first target's events: it began the
    run believing every prompt (the same prompts) cached, and its predictions missed."""
    path = write(tmp_path, arrival="closed, concurrency: 1",
                 targets="[ours:cache_aware, ours:cache_aware@exact]")
    text = path.read_text().replace("  startup_timeout_s: 30", "  startup_timeout_s: 30\n  kv_events: true")
    path.write_text(text.replace("variants: {lean: {lean: true}}", "variants: {exact: {tokenizer: replica}}"))
    scenario = load_scenario(path)
    with Processes() as procs:
        out = await run_routing(scenario, procs, progress=False)
    runs = {r["target"]: r for r in load_runs(out)}
    prediction = runs["ours:cache_aware@exact"]["prediction"]
    assert prediction["requests"] == 9 and prediction["exact_share"] == 1.0, prediction
    assert prediction["within_block_share"] == 1.0, prediction  # each turn's cached tokens foreseen


def _descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_leaves_nothing_behind(tmp_path, sig):
    scenario = write(tmp_path, arrival="closed, concurrency: 2", max_requests=100000, max_duration=120)
    run = subprocess.Popen([sys.executable, "-m", "benchmarks", "run", "--scenario", str(scenario), "--no-progress",
                            "--targets", "ours:round_robin"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        seen: dict[int, psutil.Process] = {}
        deadline = time.time() + 60
        while time.time() < deadline:  # 2 replicas + the router, all started by the run
            for p in _descendants(run.pid):
                seen[p.pid] = p
            if len(seen) >= 3 and (tmp_path / "out" / "logs" / "ours__round_robin.log").exists():
                break
            time.sleep(0.2)
        assert len(seen) >= 3, run.stdout.read1().decode() if run.poll() is not None else seen
        time.sleep(1.0)  # mid-run
        run.send_signal(sig)
        assert run.wait(30) == 130
        for p in seen.values():
            assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, p
    finally:
        if run.poll() is None:
            os.kill(run.pid, signal.SIGKILL)
            run.wait()


OVERHEAD = """
name: ov
mode: overhead
output: {out}
repeats: 2
fleet:
  replicas: [{{tp: 1, count: 1, kv_blocks: 4096}}]
  time_scale: 1000
overhead: {{rates: [40], duration_s: 1, saturation_concurrency: 8, saturation_duration_s: 1,
           streams: 20, stream_tokens: 5, stream_step_s: 0.05, stream_ramp_s: 0.2}}
limits: {{max_duration_s: 20, request_timeout_s: 20}}
targets: [ours:round_robin]
"""


async def test_overhead_scenario_end_to_end(tmp_path):
    from benchmarks.overhead import run_overhead

    path = tmp_path / "ov.yaml"
    path.write_text(OVERHEAD.format(out=tmp_path / "out"))
    scenario = load_scenario(path)
    with Processes() as procs:
        out = await run_overhead(scenario, procs, progress=False)
        assert procs.running == []
    runs = load_runs(out)
    phases = {(r["target"], r["phase"], r["repeat"]) for r in runs}
    for target in ("direct", "ours:round_robin"):  # direct is always added as the baseline
        for phase in ("rate", "saturation", "streams"):
            assert {(target, phase, 0), (target, phase, 1)} <= phases
    streams = next(r for r in runs if r["phase"] == "streams" and r["target"] == "ours:round_robin")
    assert streams["summary"]["ok"] == 20 and streams["summary"]["itl_s"]["count"] == 20 * 4
    sat = next(r for r in runs if r["phase"] == "saturation" and r["target"] == "ours:round_robin")
    assert sat["router_resources"]["cpu_ms_per_request"] > 0
    text = (out / "results.md").read_text()
    assert "Added latency at fixed request rates" in text and "`ours:round_robin` | 40 |" in text


async def test_fleet_retries_a_port_taken_before_the_replica_bound_it(tmp_path, monkeypatch):
    import socket

    from benchmarks import fleet as fleet_module
    from benchmarks.fleet import Fleet
    from benchmarks.loadgen import make_client
    from benchmarks.scenario import FleetSpec, ReplicaSpec
    from engines.sim.process import free_port

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    monkeypatch.setattr(fleet_module, "free_port", lambda: next(ports, None) or free_port())
    http = make_client()
    try:
        with Processes() as procs:
            fleet = Fleet(FleetSpec(replicas=(ReplicaSpec(1, 1, 256),)), "sim-model", procs, tmp_path)
            await fleet.start(http)
            assert fleet.replicas[0].port != taken.getsockname()[1]
            assert len(procs.running) == 1  # the failed first try is gone
    finally:
        taken.close()
        await http.close()
