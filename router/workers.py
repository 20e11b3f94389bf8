"""`router --workers N`: N router processes behind one listening socket, one supervisor.

One router process is one core (its event loop).  With ``--workers N`` the command becomes
a supervisor that owns no router at all:

* it binds the listening socket once (``server.host``/``port``, ``server.backlog``) and
  hands the same socket to every worker (a pre-forked socket, not SO_REUSEPORT): the
  kernel queues new connections on it and whichever worker is free accepts them, so
  connections waiting in the backlog when a worker dies are accepted by the others, and
  the port stays bound while a worker restarts;
* it starts the `launch:` engines itself, once, and tells the workers which backends they
  are (``ROUTER_LAUNCHED_BACKENDS``), so N workers do not start N fleets;
* each worker is a full router (``python -m router ... --worker-fd FD --worker-index I``):
  its own fleet view, polling, KV-event subscriptions and prefix index.  Routing state that
  must agree between workers comes from the replicas (KV events, scraped load): there is no
  protocol between workers;
* a worker that dies is restarted (exponential backoff from 0.5 s to 10 s while it keeps
  dying within 10 s of its start); SIGHUP is forwarded to every worker (each reloads);
  SIGTERM/SIGINT close the supervisor's copy of the socket, are forwarded, and the
  supervisor waits for every worker to drain (``server.drain_timeout`` plus a margin, then
  SIGKILL), then stops the launched engines;
* metrics: prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a private
  temporary directory unless set), so whichever worker answers ``/metrics`` shows the sums
  over all workers (telemetry.py); a dead worker's live gauges are dropped.

Exit status: 0 after a drain, 1 when the socket cannot be bound or the engines do not start,
or when the workers cannot run: every worker died within ``STABLE_AFTER_S`` of its start
``GIVE_UP_AFTER`` times in a row, or a watcher failed (the supervisor then logs why, stops
its workers and engines and releases the port rather than hold it with no worker); 2 when a
worker refused the configuration at its start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from router.config import BackendConfig, Config
from router.observability.logs import announce

log = logging.getLogger("router.workers")

LAUNCHED_ENV = "ROUTER_LAUNCHED_BACKENDS"  # JSON [[model, {backend fields}], ...] from the supervisor
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_INDEX_ENV = "ROUTER_WORKER_INDEX"
MAX_WORKERS = 256
EXIT_CONFIG = 2  # a worker's exit status for a configuration error (router/cli.py)
GIVE_UP_AFTER = 5  # quick deaths in a row of every worker before the supervisor gives up
RESTART_BACKOFF_S = (0.5, 10.0)  # first and longest wait before restarting a worker that keeps dying
STABLE_AFTER_S = 10.0  # a worker that lived this long restarts at once (backoff reset)
DRAIN_MARGIN_S = 10.0  # beyond server.drain_timeout before a worker that does not exit is killed


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """The one socket every worker accepts on (inheritable, so the workers get it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False)
    sock.set_inheritable(True)
    return sock


def encode_launched(launched: Sequence[tuple[str, BackendConfig]]) -> str:
    """The launched backends as JSON for the workers' environment.

    Field by field, not ``dataclasses.asdict``: that deep-copies each value, and a
    backend's ``labels`` is a read-only ``MappingProxyType``, which cannot be copied (the
    error that once left ``--workers N`` with a ``launch:`` block holding the port with no
    worker)."""
    out = []
    for model, backend in launched:
        fields = {f.name: getattr(backend, f.name) for f in dataclasses.fields(backend)}
        fields["labels"] = dict(backend.labels)
        out.append([model, fields])
    return json.dumps(out)


def decode_launched(text: str | None) -> list[tuple[str, BackendConfig]]:
    """What the supervisor launched, for a worker (empty without it)."""
    if not text:
        return []
    decoded = []
    for model, fields in json.loads(text):
        fields["labels"] = MappingProxyType(dict(fields.get("labels") or {}))
        decoded.append((model, BackendConfig(**fields)))
    return decoded


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The command line minus ``--workers`` (a worker never supervises)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return out


@dataclasses.dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    backoff: float = RESTART_BACKOFF_S[0]
    quick_deaths: int = 0  # exits within STABLE_AFTER_S of the start, in a row


class Supervisor:
    """Starts, watches and stops the workers (module docstring)."""

    def __init__(self, config: Config, argv: Sequence[str], workers: int, *,
                 host: str | None = None, port: int | None = None) -> None:
        self.config = config
        self.argv = worker_argv(argv)
        self.count = workers
        self.host = config.server.host if host is None else host
        self.port = config.server.port if port is None else port
        self.workers = [Worker(i) for i in range(workers)]
        self.sock: socket.socket | None = None
        self.stopping = False
        self.engines: Any = None
        self.launched: list[tuple[str, BackendConfig]] = []
        self._own_metrics_dir: str | None = None
        self.metrics_dir = os.environ.get(MULTIPROC_ENV) or ""
        self._env_base: dict[str, str] = {}
        # Why the supervisor gives up (a worker that cannot start, a watcher that broke):
        # it then exits non-zero instead of holding the port with no worker behind it.
        self.failure: str | None = None
        self.failure_status = 1
        self._failed = asyncio.Event()

    def _fail(self, why: str, status: int = 1) -> None:
        if self.failure is None:
            self.failure, self.failure_status = why, status
        self._failed.set()

    def _watcher_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.stopping:
            return
        exc = task.exception()
        if exc is not None:
            log.error("a worker's watcher failed", exc_info=exc)
            self._fail(f"cannot run the workers: {type(exc).__name__}: {exc}")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        try:
            self.sock = listening_socket(self.host, self.port, self.config.server.backlog)
        except OSError as exc:
            announce(f"error: cannot start the router: {exc}", logging.ERROR)
            return 1
        try:
            if self.config.launch is not None and "--no-launch" not in self.argv:
                from router.app import launch_engines

                self.engines, self.launched = await launch_engines(self.config.launch)
            self._prepare_metrics_dir()
            self._env_base = self._base_env()  # fails here, loudly, not inside a watcher
            watchers = [loop.create_task(self._keep(w)) for w in self.workers]
            for task in watchers:
                task.add_done_callback(self._watcher_done)
            bound = self.sock.getsockname()[1]
            announce(f"router listening on http://{self._display_host()}:{bound} ({self.count} workers)")
            log.info("supervising %d router workers on port %d", self.count, bound)
            stopped = loop.create_task(stop.wait())
            failed = loop.create_task(self._failed.wait())
            await asyncio.wait((stopped, failed), return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            failed.cancel()
            if self.failure is not None:
                log.error("%s: the supervisor stops", self.failure)
                announce(f"error: {self.failure}", logging.ERROR)
                await self._stop(watchers)
                return self.failure_status
            log.info("signal received: draining %d workers", self.count)
            await self._stop(watchers)
            return 0
        finally:
            with contextlib.suppress(OSError):
                if self.sock is not None:
                    self.sock.close()
            if self.engines is not None:
                with contextlib.suppress(Exception):
                    await self.engines.stop_async(grace=5.0)
            if self._own_metrics_dir is not None:
                shutil.rmtree(self._own_metrics_dir, ignore_errors=True)

    def _display_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host

    def _prepare_metrics_dir(self) -> None:
        if self.metrics_dir:
            path = Path(self.metrics_dir)
            path.mkdir(parents=True, exist_ok=True)
            for stale in path.glob("*.db"):  # a previous run's values would be summed in
                stale.unlink()
        else:
            self._own_metrics_dir = self.metrics_dir = tempfile.mkdtemp(prefix="router-metrics-")

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[MULTIPROC_ENV] = self.metrics_dir
        if self.launched:
            env[LAUNCHED_ENV] = encode_launched(self.launched)
        return env

    def _env(self, worker: Worker) -> dict[str, str]:
        return {**self._env_base, WORKER_INDEX_ENV: str(worker.index)}

    async def _start(self, worker: Worker) -> None:
        assert self.sock is not None
        fd = self.sock.fileno()
        args = [sys.executable, "-m", "router", *self.argv, "--no-launch",
                "--worker-fd", str(fd), "--worker-index", str(worker.index)]
        worker.process = await asyncio.create_subprocess_exec(
            *args, pass_fds=(fd,), env=self._env(worker), stdin=asyncio.subprocess.DEVNULL)
        worker.started = time.monotonic()
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    async def _keep(self, worker: Worker) -> None:
        """Run one worker for as long as the supervisor runs, restarting it when it dies."""
        while not self.stopping:
            await self._start(worker)
            assert worker.process is not None
            code = await worker.process.wait()
            self._forget_metrics(worker.process.pid)
            if self.stopping:
                return
            lived = time.monotonic() - worker.started
            if lived >= STABLE_AFTER_S:
                worker.backoff = RESTART_BACKOFF_S[0]
                worker.quick_deaths = 0
            else:
                worker.quick_deaths += 1
            if code == EXIT_CONFIG and lived < STABLE_AFTER_S:
                self._fail(f"worker {worker.index} refused the configuration (exit status "
                           f"{code}); see its error above", EXIT_CONFIG)
                return
            if all(w.quick_deaths >= GIVE_UP_AFTER for w in self.workers):
                self._fail(f"every worker died within {STABLE_AFTER_S:g}s of its start "
                           f"{GIVE_UP_AFTER} times in a row (the last with exit status {code}); "
                           "see their errors above")
                return
            log.warning("worker %d (pid %d) exited with status %s after %.1fs; restarting in %.1fs",
                        worker.index, worker.process.pid, code, lived, worker.backoff)
            await asyncio.sleep(worker.backoff)
            worker.backoff = min(worker.backoff * 2, RESTART_BACKOFF_S[1])

    def _forget_metrics(self, pid: int) -> None:
        """A dead worker's live gauges leave the sums (its counters stay: they happened)."""
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    def _forward(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    async def _stop(self, watchers: list[asyncio.Task[None]]) -> None:
        self.stopping = True
        if self.sock is not None:  # the workers' copies close as they drain
            self.sock.close()
        self._forward(signal.SIGTERM)
        deadline = self.config.server.drain_timeout + DRAIN_MARGIN_S
        processes = [w.process for w in self.workers if w.process is not None]
        waits = [asyncio.ensure_future(p.wait()) for p in processes]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=deadline)
            for proc in processes:
                if proc.returncode is None:
                    log.warning("worker pid %d did not drain within %gs: killed", proc.pid, deadline)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
