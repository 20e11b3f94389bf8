"""Run a simulated replica as a real child process, for tests and benchmarks.

    async with SimProcess(model="sim-a", args=["--num-gpu-blocks", "64"]) as sim:   # or plain `with`
        sim.url                # http://127.0.0.1:PORT
        sim.kv_events_endpoint # tcp://127.0.0.1:PORT (when kv_events=True), else None
        await sim.metrics()    # {"vllm:num_requests_running": 0.0, ...} summed over labels

The child is `python -m engines.sim`; the context manager picks free ports, waits until
/health answers 200 (or the child dies, or `startup_timeout` passes: both raise with the tail
of its log), and on exit sends SIGTERM, then SIGKILL after `stop_timeout`.  Only the process
it started is ever signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from engines.children import die_with_parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class SimProcessError(RuntimeError):
    pass


class SimProcess:
    def __init__(self, model: str = "sim-model", *, port: int | None = None, host: str = "127.0.0.1",
                 args: Sequence[str] = (), time_scale: float | None = None, kv_events: bool = False,
                 kv_topic: str = "", replay: bool = True, wait_healthy: bool = True,
                 startup_timeout: float = 30.0, stop_timeout: float = 5.0,
                 log_path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.model = model
        self.host = host
        self.port = port or free_port(host)
        self.args = list(args)
        self.time_scale = time_scale
        self.kv_events = kv_events
        self.kv_topic = kv_topic
        self.kv_port = free_port(host) if kv_events else None
        self.replay_port = free_port(host) if kv_events and replay else None
        self.wait_healthy = wait_healthy
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._log_path = Path(log_path) if log_path else None
        self._tmp_log: tempfile._TemporaryFileWrapper | None = None
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    # -- addresses --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def kv_events_endpoint(self) -> str | None:
        return f"tcp://{self.host}:{self.kv_port}" if self.kv_port else None

    @property
    def kv_replay_endpoint(self) -> str | None:
        return f"tcp://{self.host}:{self.replay_port}" if self.replay_port else None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "engines.sim", "--host", self.host, "--port", str(self.port),
                "--model", self.model]
        if self.time_scale is not None:
            argv += ["--time-scale", repr(self.time_scale)]
        if self.kv_events:
            cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{self.kv_port}",
                   "topic": self.kv_topic}
            if self.replay_port:
                cfg["replay_endpoint"] = f"tcp://*:{self.replay_port}"
            argv += ["--kv-events-config", json.dumps(cfg)]
        return argv + self.args

    # -- lifecycle --------------------------------------------------------------------------
    def _spawn(self) -> None:
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self._log_path, "wb")
        else:
            self._tmp_log = tempfile.NamedTemporaryFile(prefix="sim-", suffix=".log", delete=False)
            log = self._tmp_log
        env = {**os.environ, **(self.env or {})}
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env,
                                     preexec_fn=die_with_parent())
        log.close()

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise SimProcessError(f"simulator exited with {self.proc.returncode}:\n{self.log_tail()}")

    async def start(self) -> SimProcess:
        self._spawn()
        if self.wait_healthy:
            await self.wait_until_healthy(self.startup_timeout)
        return self

    async def wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                self._check_alive()
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    async with http.get(self.url + "/health", timeout=aiohttp.ClientTimeout(total=1)) as r:
                        if r.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise SimProcessError(f"simulator not healthy after {timeout}s:\n{self.log_tail()}")
                await asyncio.sleep(0.05)

    def start_sync(self) -> SimProcess:
        """Start and wait for health without an event loop (for module-scoped sync fixtures)."""
        self._spawn()
        if self.wait_healthy:
            deadline = time.monotonic() + self.startup_timeout
            while True:
                self._check_alive()
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                        if r.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise SimProcessError(f"simulator not healthy after {self.startup_timeout}s:\n"
                                          f"{self.log_tail()}")
                time.sleep(0.05)
        return self

    def stop_sync(self) -> int | None:
        """SIGTERM, then SIGKILL after ``stop_timeout``; returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._sigterm()
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    async def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._sigterm()
            if await self.wait_exit(self.stop_timeout) is None:
                proc.kill()
                proc.wait()
        return proc.returncode

    def _sigterm(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
            self.proc.send_signal(signal.SIGCONT)  # a paused child must wake to exit

    async def kill(self) -> None:
        """SIGKILL: the replica vanishes mid-request, like a crashed server."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            while self.proc.poll() is None:
                await asyncio.sleep(0.01)

    def pause(self) -> None:
        """SIGSTOP: the replica hangs, connections open and silent, like a wedged engine."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    async def wait_exit(self, timeout: float) -> int | None:
        """Wait for the child to exit on its own (e.g. the exit_after fault)."""
        deadline = time.monotonic() + timeout
        while self.proc is not None and self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.returncode

    async def __aenter__(self) -> SimProcess:
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            self._cleanup_log()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        self._cleanup_log()

    def __enter__(self) -> SimProcess:
        try:
            return self.start_sync()
        except BaseException:
            self.stop_sync()
            self._cleanup_log()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop_sync()
        self._cleanup_log()

    def _cleanup_log(self) -> None:
        if self._tmp_log is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp_log.name)

    def log_tail(self, n: int = 40) -> str:
        path = self._log_path or (Path(self._tmp_log.name) if self._tmp_log else None)
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])

    # -- helpers for tests ------------------------------------------------------------------
    async def metrics(self, http: aiohttp.ClientSession | None = None) -> dict[str, float]:
        """The replica's vllm:* samples, summed over labels (histograms: _sum and _count)."""
        async with contextlib.AsyncExitStack() as stack:
            if http is None:
                http = await stack.enter_async_context(aiohttp.ClientSession())
            async with http.get(self.url + "/metrics") as r:
                text = await r.text()
        return parse_metrics(text)

    async def set_faults(self, http: aiohttp.ClientSession | None = None, **faults: object) -> dict:
        async with contextlib.AsyncExitStack() as stack:
            if http is None:
                http = await stack.enter_async_context(aiohttp.ClientSession())
            async with http.post(self.url + "/admin/faults", json=faults) as r:
                body = await r.json()
                if r.status != 200:
                    raise SimProcessError(f"/admin/faults: {r.status} {body}")
                return body


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value summed over label sets}; buckets are skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name.endswith("_bucket") or name.endswith("_created"):
            continue
        out[name] = out.get(name, 0.0) + float(value)
    return out
