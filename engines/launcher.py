"""Start and stop the replicas described by an engines.yaml model registry.

    config = load_config("config/engines.yaml")      # validated, path-precise errors
    plans = plan(config)                              # argv + env + port per replica
    fleet = Launcher(state_dir=".engines").start(plans)   # spawn, log to .engines/logs/NAME.log
    fleet.wait_healthy()                              # or: await fleet.wait_healthy_async()
    ...
    fleet.stop()                                      # or: await fleet.stop_async()

Each replica runs in its own session (process group), so stopping it ends its children too
(vLLM's engine core and workers).  `up` records every PID with its start time and command
line in a state file; `down` stops exactly those processes, and only after checking that
the PID still belongs to the process we started (same start time, same command line), so a
recycled PID is never signalled.

The router's `launch:` block uses the same `plan` + `Launcher` for its embedded fleet.

This module spawns (`Launcher`); the running replicas are fleet.py's, the PID checks
processes.py's, the state file state_file.py's, the registry engines/vllm/'s.  Their public
names are importable from here, the launcher's interface.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from engines.fleet import (
    STOP_GRACE_S,
    LaunchError,
    RunningFleet,
    RunningReplica,
    stop_from_state,
)
from engines.processes import cmdline_matches, is_ours
from engines.processes import proc_start_ticks as _proc_start_ticks
from engines.state_file import STATE_FILE, read_state, record_replicas, rewrite_state
from engines.vllm.parse import load_config, parse_config
from engines.vllm.registry import plan
from engines.vllm.specs import EnginesConfig, ModelSpec, ReplicaPlan

__all__ = [
    "EnginesConfig", "ModelSpec", "ReplicaPlan", "load_config", "parse_config", "plan",
    "Launcher", "RunningFleet", "RunningReplica", "LaunchError", "stop_from_state",
    "read_state", "STATE_FILE", "STOP_GRACE_S", "is_ours", "cmdline_matches", "describe_plans",
]


class Launcher:
    """Spawns replicas from plans; logs go to STATE_DIR/logs/NAME.log."""

    def __init__(self, state_dir: str | Path = ".engines", *, cwd: str | Path | None = None,
                 base_env: dict[str, str] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.cwd = Path(cwd) if cwd is not None else None
        self.base_env = dict(os.environ if base_env is None else base_env)

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def start(self, plans: Sequence[ReplicaPlan], *, write_state: bool = True) -> RunningFleet:
        """Spawn every plan (does not wait for health).  On a spawn failure, stops the rest."""
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        started: list[RunningReplica] = []
        try:
            for p in plans:
                log_path = logs / f"{p.name}.log"
                env = {**self.base_env, **p.env}
                if p.kind == "sim":
                    # The simulator runs from this checkout: make `engines` importable.
                    root = str(self.cwd or Path.cwd())
                    env["PYTHONPATH"] = os.pathsep.join(
                        x for x in (root, env.get("PYTHONPATH")) if x)
                with open(log_path, "ab") as log:
                    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {p.shell()}\n".encode())
                    log.flush()
                    proc = subprocess.Popen(
                        list(p.argv), stdout=log, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, env=env, cwd=self.cwd,
                        start_new_session=True,
                    )
                started.append(RunningReplica(plan=p, pid=proc.pid, log_path=log_path,
                                              start_ticks=_proc_start_ticks(proc.pid),
                                              process=proc))
        except Exception:
            RunningFleet(started).stop()
            raise
        fleet = RunningFleet(started)
        if write_state:
            self.write_state(fleet)
        return fleet

    def write_state(self, fleet: RunningFleet) -> None:
        record_replicas(self.state_file, [r.record() for r in fleet.replicas])
        fleet.state_file = self.state_file

    def up(self, plans: Sequence[ReplicaPlan], *, timeout: float | None = None) -> RunningFleet:
        """Start and wait until healthy; if any replica fails, stop them all and raise."""
        live = [r["name"] for r in read_state(self.state_file).get("replicas", []) if is_ours(r)]
        clash = sorted(set(live) & {p.name for p in plans})
        if clash:
            raise LaunchError(f"already running (see {self.state_file}): {', '.join(clash)}; "
                              "run `python -m engines down` first")
        fleet = self.start(plans)
        try:
            fleet.wait_healthy(timeout)
        except BaseException:
            fleet.stop()
            self._forget({r.pid for r in fleet.replicas})
            raise
        return fleet

    def _forget(self, pids: set[int]) -> None:
        rewrite_state(self.state_file, drop_pids=pids)

    def down(self, names: Iterable[str] | None = None, grace: float = STOP_GRACE_S) -> list[str]:
        """Stop the replicas in the state file (all, or those named); returns what was stopped."""
        return stop_from_state(self.state_file, names, grace)


def describe_plans(plans: Sequence[ReplicaPlan]) -> str:
    lines = []
    for p in plans:
        gpu = f" gpus={','.join(map(str, p.gpus))}" if p.gpus else ""
        kv = f" kv_events={p.kv_events_endpoint}" if p.kv_events_endpoint else ""
        lines.append(f"# {p.name}: {p.kind} {p.served_model_name} tp={p.tensor_parallel_size} "
                     f"pp={p.pipeline_parallel_size}{gpu} {p.url}{kv}")
        lines.append(p.shell())
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m engines up|down|status|check-config")
