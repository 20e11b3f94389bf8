"""The chaos harness end to end at a small size: it runs, measures, and writes its figures."""

from __future__ import annotations

import json

from benchmarks.chaos import Settings, run_chaos
from benchmarks.procs import Processes


async def test_chaos_harness_small(tmp_path) -> None:
    settings = Settings(output=tmp_path, replicas=2, rate=15.0, baseline_s=1.5, fault_s=3.0,
                        recovery_s=1.0, faults=("kill", "status_500"), streams=60,
                        prompts=400, prompt_concurrency=8,
                        experiments=("faults", "streams", "prompts"), command="test")
    with Processes() as procs:
        out = await run_chaos(settings, procs)
        assert not procs.running, "every process the harness started is stopped"
    results = json.loads((out / "results.json").read_text())
    faults = {r["fault"]: r for r in results["faults"]}
    assert set(faults) == {"kill", "status_500"}
    for run in faults.values():
        assert run["requests"] > 20
        assert run["sick_share_before"] and run["sick_share_before"] > 0.1  # it did get traffic
        assert run["sick_share_during"] is not None and run["sick_share_during"] < run["sick_share_before"]
    assert results["streams"]["ok"] == 60 and results["streams"]["router_peak_fds"] > 0
    assert results["prompts"]["failed"] == 0
    assert results["prompts"]["prefix_index"]["records"] > 0
    for figure in ("faults.png", "streams.png", "prompts.png"):
        assert (out / figure).stat().st_size > 1000
    assert "| kill |" in (out / "results.md").read_text()


async def test_chaos_fleet_experiments_small(tmp_path) -> None:
    """The reload, flood, pool and bodies experiments at a small size (the slow-replica one
    is the faults loop with other configs and runs in benchmarks/ only: 6 cases x 20 s)."""
    settings = Settings(output=tmp_path, rate=15.0, reload_rate=30.0, reload_s=4.0,
                        flood_connections=60, flood_cap=20, pool_size=4, body_mib=2, body_count=3,
                        experiments=("reload", "flood", "pool", "bodies"), command="test")
    with Processes() as procs:
        out = await run_chaos(settings, procs)
        assert not procs.running, "every process the harness started is stopped"
    results = json.loads((out / "results.json").read_text())
    reload = results["reload"]
    assert reload["requests"] > 60 and reload["reloads"] >= 3
    assert reload["failed"] == 0, reload["errors"]  # make-before-break
    flood = results["flood"]
    assert flood["answers"].get("HTTP/1.1 503", 0) == 40
    assert flood["router_fds_1s_after_close"] <= flood["router_fds_idle"] + 2
    pool = results["pool"]
    assert pool["short_statuses"] == {"503": 10} and pool["short_wait_max_s"] < 10
    assert pool["pool_timeouts_counted"] >= 10
    bodies = results["bodies"]
    assert bodies["statuses"] == [200] * 3 and bodies["peak_per_body_mib"] > 0
    text = (out / "results.md").read_text()
    assert "Reloads that swap the backends" in text and "Memory per in-flight request body" in text
