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
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engines.vllm.registry import (  # re-exported: the launcher's public interface
    EnginesConfig,
    ModelSpec,
    ReplicaPlan,
    load_config,
    parse_config,
    plan,
)

__all__ = [
    "EnginesConfig", "ModelSpec", "ReplicaPlan", "load_config", "parse_config", "plan",
    "Launcher", "RunningFleet", "RunningReplica", "LaunchError", "stop_from_state",
    "read_state", "STATE_FILE",
]

STATE_FILE = "state.json"
STOP_GRACE_S = 15.0


class LaunchError(RuntimeError):
    """A replica failed to start or to become healthy (the message names it and its log)."""


# -- process identity ---------------------------------------------------------------------

def _proc_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_start_ticks(pid)
    if stat is None:
        return True
    try:  # a zombie is as good as gone
        state = Path(f"/proc/{pid}/stat").read_text()
        return state[state.rindex(")") + 2] != "Z"
    except OSError:
        return False


def is_ours(record: dict) -> bool:
    """Is the process in `record` (from the state file) still the one we started?"""
    pid = int(record["pid"])
    ticks = _proc_start_ticks(pid)
    if ticks is None or not _alive(pid):
        return False
    if record.get("start_ticks") is not None and ticks != record["start_ticks"]:
        return False
    cmdline = _proc_cmdline(pid)
    if cmdline is None:
        return False
    return cmdline_matches(cmdline, list(record.get("argv") or []))


def cmdline_matches(cmdline: Sequence[str], argv: Sequence[str]) -> bool:
    """Does a live /proc cmdline come from spawning `argv`?

    A script with a shebang (``.venv-vllm/bin/vllm``) shows as ``python SCRIPT args...`` and
    interpreter paths may be resolved differently, so: the arguments after argv[0] must be
    the tail of the cmdline, and argv[0]'s file name must appear before that tail.
    """
    if not argv or not cmdline:
        return False
    tail = list(argv[1:])
    if len(cmdline) < len(tail) + 1 or (tail and list(cmdline[-len(tail):]) != tail):
        return False
    head = cmdline[: len(cmdline) - len(tail)]
    exe = os.path.basename(argv[0])
    return any(os.path.basename(part) == exe or os.path.basename(part).startswith(exe)
               for part in head)


# -- running replicas -------------------------------------------------------------------------

@dataclass(eq=False)
class RunningReplica:
    plan: ReplicaPlan
    pid: int
    log_path: Path
    start_ticks: int | None
    process: subprocess.Popen | None = None  # None when reattached from a state file

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def url(self) -> str:
        return self.plan.url

    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _alive(self.pid)

    def exit_code(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def record(self) -> dict:
        return {**self.plan.as_dict(), "pid": self.pid, "pgid": self.pid,
                "start_ticks": self.start_ticks, "log": str(self.log_path)}


def _health_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass(eq=False)
class RunningFleet:
    replicas: list[RunningReplica]
    state_file: Path | None = None

    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def by_name(self, name: str) -> RunningReplica:
        for rep in self.replicas:
            if rep.name == name:
                return rep
        raise KeyError(name)

    def _health_deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (timeout or max(r.plan.health_timeout_s for r in self.replicas))

    def _check_pending(self, pending: list[RunningReplica], deadline: float, timeout: float | None) -> None:
        """Raise LaunchError if a replica still not healthy has exited, or time is up."""
        for rep in pending:
            if not rep.running():
                raise LaunchError(
                    f"replica {rep.name} exited (code {rep.exit_code()}) before it was healthy; "
                    f"log {rep.log_path}:\n{rep.log_tail()}")
        if time.monotonic() > deadline:
            names = ", ".join(f"{r.name} ({r.log_path})" for r in pending)
            raise LaunchError(f"not healthy after {timeout or 'the health timeout'} s: {names}")

    def wait_healthy(self, timeout: float | None = None, interval: float = 0.25) -> None:
        """Block until every replica answers GET /health with 200 (or raise LaunchError)."""
        deadline = self._health_deadline(timeout)
        pending = list(self.replicas)
        while pending:
            pending = [r for r in pending if not _health_ok(r.url)]
            if not pending:
                return
            self._check_pending(pending, deadline, timeout)
            time.sleep(interval)

    async def wait_healthy_async(self, timeout: float | None = None, interval: float = 0.25) -> None:
        """`wait_healthy` for an event loop (probes run in a worker thread, never blocking it)."""
        deadline = self._health_deadline(timeout)
        pending = list(self.replicas)
        while pending:
            oks = await asyncio.gather(*(asyncio.to_thread(_health_ok, r.url) for r in pending))
            pending = [r for r, ok in zip(pending, oks) if not ok]
            if not pending:
                return
            self._check_pending(pending, deadline, timeout)
            await asyncio.sleep(interval)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM every replica's process group, SIGKILL what is left after `grace` s."""
        _stop_records([(r.pid, r) for r in self.replicas], grace)
        if self.state_file is not None:
            # Forget only our own records: the file may list replicas of another `up`.
            _rewrite_state(self.state_file, drop_pids={r.pid for r in self.replicas})

    async def stop_async(self, grace: float = STOP_GRACE_S) -> None:
        await asyncio.to_thread(self.stop, grace)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # each replica leads its own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _group_alive(pgid: int) -> bool:
    """Does any live (non-zombie) process remain in process group `pgid`?"""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _stop_records(items: Sequence[tuple[int, RunningReplica | None]], grace: float) -> None:
    for pid, rep in items:
        if rep is None or rep.running():
            _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    remaining = list(items)
    while remaining and time.monotonic() < deadline:
        for _, rep in remaining:
            if rep is not None and rep.process is not None:
                rep.process.poll()  # reap, so the leader does not linger as a zombie
        remaining = [(pid, rep) for pid, rep in remaining
                     if (rep.running() if rep is not None else _alive(pid)) or _group_alive(pid)]
        if remaining:
            time.sleep(0.1)
    for pid, _ in remaining:
        _signal_group(pid, signal.SIGKILL)
    for _, rep in items:
        if rep is not None and rep.process is not None:
            try:
                rep.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


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
        existing = read_state(self.state_file)
        records = [r for r in existing.get("replicas", []) if is_ours(r)]
        records += [r.record() for r in fleet.replicas]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"written_at": time.time(), "cwd": str(Path.cwd()),
                                   "replicas": records}, indent=2) + "\n")
        tmp.replace(self.state_file)
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
        _rewrite_state(self.state_file, drop_pids=pids)

    def down(self, names: Iterable[str] | None = None, grace: float = STOP_GRACE_S) -> list[str]:
        """Stop the replicas in the state file (all, or those named); returns what was stopped."""
        return stop_from_state(self.state_file, names, grace)


def _rewrite_state(state_file: Path, drop_pids: set[int]) -> None:
    state = read_state(state_file)
    keep = [r for r in state.get("replicas", []) if r.get("pid") not in drop_pids and is_ours(r)]
    if keep:
        state["replicas"] = keep
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(state_file)
    else:
        state_file.unlink(missing_ok=True)


def read_state(state_file: str | Path) -> dict:
    try:
        return json.loads(Path(state_file).read_text())
    except (OSError, ValueError):
        return {}


def stop_from_state(state_file: str | Path, names: Iterable[str] | None = None,
                    grace: float = STOP_GRACE_S) -> list[str]:
    """Stop exactly the processes recorded in `state_file` that are still ours."""
    state_file = Path(state_file)
    state = read_state(state_file)
    records = state.get("replicas", [])
    wanted = set(names or ())
    targets = [r for r in records
               if not wanted or r.get("name") in wanted or r.get("entry") in wanted]
    ours = [r for r in targets if is_ours(r)]
    _stop_records([(int(r["pid"]), None) for r in ours], grace)
    stopped = [r["name"] for r in ours]
    _rewrite_state(state_file, drop_pids={int(r["pid"]) for r in targets})
    return stopped


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
