"""Every process the harness starts, and stopping each one by its own PID.

`Processes` is the one registry: fleet replicas, routers and peers are all started through
it.  Stopping sends SIGTERM to the process's own PID, waits, then SIGKILL; descendants it
spawned (vLLM's engine core, a peer's workers) are listed with psutil before the parent is
signalled and each is then stopped by its own PID too.  Children also get
PR_SET_PDEATHSIG on Linux, so even a harness killed with SIGKILL takes them along.

`python -m benchmarks` turns SIGTERM into KeyboardInterrupt and calls `stop_all()` in a
`finally`, so Ctrl-C or a kill at any point leaves nothing running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

from engines.children import die_with_parent


@dataclass(eq=False)
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen
    log_path: Path | None
    _log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()[-chars:]
        return data.decode("utf-8", "replace")


class Processes:
    """The registry of started processes (use as a context manager, or call stop_all)."""

    def __init__(self) -> None:
        self._procs: list[Proc] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    @property
    def running(self) -> list[Proc]:
        return [p for p in self._procs if p.alive()]

    def start(self, name: str, argv: Sequence[str], *, log_path: Path | None = None,
              env: dict[str, str] | None = None, cwd: str | Path | None = None) -> Proc:
        log = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "ab")
        full_env = dict(os.environ)
        full_env.update(env or {})
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log if log is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
            start_new_session=True,  # a terminal's Ctrl-C reaches the harness only; it stops these
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        proc = Proc(name, list(argv), popen, log_path, log)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout_s: float = 10.0) -> None:
        """SIGTERM the process by its PID, then SIGKILL; the same for its leftover descendants."""
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        if proc.alive():
            _signal(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal(proc.pid, signal.SIGKILL)
                proc.popen.wait(5)
        else:
            proc.popen.poll()
        for child in descendants:
            _stop_psutil(child, timeout_s)
        if proc._log is not None:
            proc._log.close()
            proc._log = None
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        """Stop every process still registered, newest first (routers before their fleet)."""
        for proc in reversed(list(self._procs)):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                print(f"benchmarks: could not stop {proc.name} (pid {proc.pid}): {exc}", file=sys.stderr)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop_psutil(child: psutil.Process, timeout_s: float) -> None:
    try:
        if not child.is_running():
            return
        child.terminate()
        try:
            child.wait(timeout_s)
        except psutil.TimeoutExpired:
            child.kill()
            child.wait(5)
    except psutil.Error:
        pass


class ResourceSampler:
    """CPU seconds and peak RSS of one process and its descendants, sampled by psutil.

    `start()` records the CPU counters at the start of a run; `sample()` is called
    periodically (peak RSS); `stop()` returns {cpu_s, peak_rss_mb} over the interval.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._cpu0 = 0.0
        self._peak = 0
        self._last_cpu = 0.0

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def _cpu(self) -> float:
        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def start(self) -> None:
        self._cpu0 = self._cpu()
        self._last_cpu = self._cpu0
        self._peak = 0
        self.sample()

    def sample(self) -> None:
        rss = 0
        for p in self._tree():
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        self._peak = max(self._peak, rss)
        cpu = self._cpu()
        if cpu:
            self._last_cpu = cpu

    def stop(self) -> dict[str, float]:
        self.sample()
        return {"cpu_s": round(self._last_cpu - self._cpu0, 3), "peak_rss_mb": round(self._peak / 2**20, 1)}


class ResourceSamplers:
    """Several processes measured as one (the routers of a split target): CPU seconds and
    peak RSS summed over them."""

    def __init__(self, samplers: list[ResourceSampler]) -> None:
        self.samplers = samplers

    def start(self) -> None:
        for sampler in self.samplers:
            sampler.start()

    def sample(self) -> None:
        for sampler in self.samplers:
            sampler.sample()

    def stop(self) -> dict[str, float]:
        parts = [sampler.stop() for sampler in self.samplers]
        return {"cpu_s": round(sum(p["cpu_s"] for p in parts), 3),
                "peak_rss_mb": round(sum(p["peak_rss_mb"] for p in parts), 1)}
