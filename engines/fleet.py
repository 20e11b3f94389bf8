"""Running replicas: a `RunningFleet` of `RunningReplica`s, what `Launcher.start` returns (or
what a state file recorded): waiting until each is healthy, and stopping them (SIGTERM to each
process group, SIGKILL after a grace period).

Stopping only what the state file recorded and what is still ours (`stop_from_state`) is
here too: it stops processes the same way as a fleet does.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engines.processes import alive, group_alive, is_ours, signal_group
from engines.state_file import read_state, rewrite_state
from engines.vllm.specs import ReplicaPlan

STOP_GRACE_S = 15.0


class LaunchError(RuntimeError):
    """A replica failed to start or to become healthy (the message names it and its log)."""


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
        return alive(self.pid)

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


def health_ok(url: str, timeout: float = 2.0) -> bool:
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
            pending = [r for r in pending if not health_ok(r.url)]
            if not pending:
                return
            self._check_pending(pending, deadline, timeout)
            time.sleep(interval)

    async def wait_healthy_async(self, timeout: float | None = None, interval: float = 0.25) -> None:
        """`wait_healthy` for an event loop (probes run in a worker thread, never blocking it)."""
        deadline = self._health_deadline(timeout)
        pending = list(self.replicas)
        while pending:
            oks = await asyncio.gather(*(asyncio.to_thread(health_ok, r.url) for r in pending))
            pending = [r for r, ok in zip(pending, oks) if not ok]
            if not pending:
                return
            self._check_pending(pending, deadline, timeout)
            await asyncio.sleep(interval)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM every replica's process group, SIGKILL what is left after `grace` s."""
        stop_records([(r.pid, r) for r in self.replicas], grace)
        if self.state_file is not None:
            # Forget only our own records: the file may list replicas of another `up`.
            rewrite_state(self.state_file, drop_pids={r.pid for r in self.replicas})

    async def stop_async(self, grace: float = STOP_GRACE_S) -> None:
        await asyncio.to_thread(self.stop, grace)


def stop_records(items: Sequence[tuple[int, RunningReplica | None]], grace: float) -> None:
    for pid, rep in items:
        if rep is None or rep.running():
            signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    remaining = list(items)
    while remaining and time.monotonic() < deadline:
        for _, rep in remaining:
            if rep is not None and rep.process is not None:
                rep.process.poll()  # reap, so the leader does not linger as a zombie
        remaining = [(pid, rep) for pid, rep in remaining
                     if (rep.running() if rep is not None else alive(pid)) or group_alive(pid)]
        if remaining:
            time.sleep(0.1)
    for pid, _ in remaining:
        signal_group(pid, signal.SIGKILL)
    for _, rep in items:
        if rep is not None and rep.process is not None:
            try:
                rep.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


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
    stop_records([(int(r["pid"]), None) for r in ours], grace)
    stopped = [r["name"] for r in ours]
    rewrite_state(state_file, drop_pids={int(r["pid"]) for r in targets})
    return stopped
