"""Fleet monitoring: per-replica background tasks that poll /health, /metrics, /v1/models.

Never on the request path.  Each replica gets one task that loops:

* **health** every ``health.interval``: GET /health; 200 is a pass, anything else (or a
  connect error / timeout) a failure.  The state machine (router.fleet.Health):

      UNKNOWN   --pass-->                      HEALTHY   (a late replica joins at once)
      HEALTHY   --fail-->                      SUSPECT   (ranked last, still usable)
      SUSPECT   --pass-->                      HEALTHY
      any       --failure_threshold fails-->   UNHEALTHY (no traffic)
      UNHEALTHY --success_threshold passes-->  HEALTHY

  `mark_suspect()` is the request path's shortcut: a connect failure makes the replica
  SUSPECT at once and wakes its task for an immediate probe.
* **metrics** every ``metrics.scrape_interval`` while the replica answers probes: vLLM's
  /metrics, parsed by router/fleet/vllm_metrics.py.
* **models** when the replica answers a probe after not answering (before it is marked
  healthy, so its first request already knows what it serves) and every
  ``metrics.models_interval``: /v1/models gives the served model names and max_model_len.
  A replica whose list holds neither its configured model nor an adapter of it serves
  something else (a wrong URL in routes.yaml, a redeployed engine): it is kept out
  (`Replica.model_mismatch`, no traffic, none of its names listed), with one warning when
  that starts and one line when it ends.

Replicas join and leave while the monitor runs (`watch` / `unwatch`, from the fleet's
listener): each task belongs to one Replica object, so a replica re-added under the same URL
gets a task of its own even if the old one's has not been stopped yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp

from router.config import HealthConfig, MetricsConfig
from router.fleet.engine_load import EngineLoad
from router.fleet.replicas import Fleet, Health, Replica
from router.fleet.vllm_metrics import parse_engine_load, parse_model_cards
from router.observability.loop_lag import LoopLag
from router.observability.telemetry import Telemetry

MAX_MODELS_BYTES = 4 * 1024 * 1024  # of one /v1/models answer (thousands of adapters fit)
MAX_MISMATCH_NAMES = 16  # names kept (and shown) of a replica serving another model
log = logging.getLogger("router.monitor")

_MIN_WAKE_GAP_S = 0.1


class Monitor:
    """Owns the polling tasks of every replica in a fleet."""

    def __init__(self, fleet: Fleet, session: aiohttp.ClientSession, health: HealthConfig,
                 metrics: MetricsConfig, telemetry: Telemetry | None = None,
                 on_load: Callable[[Replica, EngineLoad, EngineLoad], None] | None = None,
                 on_health: Callable[[Replica, Health, Health], None] | None = None,
                 loop_lag: LoopLag | None = None) -> None:
        self.fleet = fleet
        self.loop_lag = loop_lag
        self.session = session  # the monitor's own pool: probes never queue behind requests
        self.health_cfg = health
        self.metrics_cfg = metrics
        self.telemetry = telemetry
        self.on_load = on_load
        self.on_health = on_health
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._owners: dict[str, Replica] = {}  # whose task `_tasks[id]` is
        self._wake: dict[str, asyncio.Event] = {}
        self._closing = False
        self.started = False  # replicas added later are watched at once (router/fleet/membership.py)

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        self.started = True
        for replica in self.fleet:
            self.watch(replica)

    def watch(self, replica: Replica) -> None:
        """Start polling `replica` (idempotent); a task still polling another Replica object
        with the same URL (one that left) is cancelled."""
        if self._closing or self._owners.get(replica.id) is replica:
            return
        stale = self._tasks.pop(replica.id, None)
        if stale is not None:
            stale.cancel()
        self._owners[replica.id] = replica
        self._wake[replica.id] = asyncio.Event()
        if self.telemetry:
            self.telemetry.init_replica(replica)
        self._tasks[replica.id] = asyncio.create_task(self._run(replica),
                                                      name=f"monitor:{replica.id}")

    async def unwatch(self, replica: Replica) -> None:
        """Stop polling `replica` (not another object that took its URL since)."""
        if self._owners.get(replica.id) is not replica:
            return
        del self._owners[replica.id]
        task = self._tasks.pop(replica.id, None)
        self._wake.pop(replica.id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def stop(self) -> None:
        self._closing = True
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._owners.clear()
        self._wake.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- request-path feedback ----------------------------------------------------
    def mark_suspect(self, replica: Replica) -> None:
        """A connect failure on the request path: SUSPECT now, probe again at once."""
        replica.consecutive_successes = 0
        replica.consecutive_failures = max(replica.consecutive_failures, 1)
        if replica.health is Health.HEALTHY:
            self._set(replica, Health.SUSPECT)
        wake = self._wake.get(replica.id)
        if wake is not None:
            wake.set()

    # -- state machine ------------------------------------------------------------
    def _set(self, replica: Replica, new: Health) -> None:
        old = replica.health
        if old is new:
            return
        replica.health = new
        log.info("replica %s (%s): %s -> %s", replica.id, replica.model, old.value, new.value)
        if self.telemetry:
            self.telemetry.set_health(replica)
        if self.on_health is not None:
            try:
                self.on_health(replica, old, new)
            except Exception:  # noqa: BLE001
                log.exception("health listener failed")

    def record_probe(self, replica: Replica, ok: bool) -> None:
        """Apply one probe result to the replica's health state machine."""
        cfg = self.health_cfg
        if self.telemetry:
            self.telemetry.probes.labels(replica.id, "pass" if ok else "fail").inc()
        if ok:
            replica.consecutive_failures = 0
            replica.consecutive_successes += 1
            if replica.health in (Health.UNKNOWN, Health.SUSPECT):
                self._set(replica, Health.HEALTHY)
            elif (replica.health is Health.UNHEALTHY
                  and replica.consecutive_successes >= cfg.success_threshold):
                self._set(replica, Health.HEALTHY)
        else:
            replica.consecutive_successes = 0
            replica.consecutive_failures += 1
            if replica.consecutive_failures >= cfg.failure_threshold:
                self._set(replica, Health.UNHEALTHY)
            elif replica.health is Health.HEALTHY:
                self._set(replica, Health.SUSPECT)

    # -- polling ------------------------------------------------------------------
    def _headers(self, replica: Replica) -> dict[str, str]:
        # identity: the upstream session does not decompress (the proxy relays bytes as
        # sent), and vLLM's /metrics is gzipped when the client accepts gzip.
        headers = {"Accept-Encoding": "identity"}
        if replica.api_key:
            headers["Authorization"] = f"Bearer {replica.api_key}"
        return headers

    async def probe_health(self, replica: Replica) -> bool | None:
        """True: passed; False: failed; None: timed out while the router's own loop stalled
        (router/observability/loop_lag.py), which says nothing about the replica."""
        timeout = aiohttp.ClientTimeout(total=self.health_cfg.timeout)
        started = time.monotonic()
        try:
            async with self.session.get(f"{replica.url}/health", headers=self._headers(replica),
                                        timeout=timeout) as resp:
                await resp.read()
                return resp.status == 200
        except TimeoutError:
            if self.loop_lag is not None and self.loop_lag.stalled_since(
                    started, self.health_cfg.timeout / 2):
                return None
            return False
        except (aiohttp.ClientError, OSError):
            return False
        except Exception as exc:  # noqa: BLE001 - e.g. a ValueError from a bad request setup
            log.warning("replica %s: health probe could not be sent: %s", replica.id,
                        type(exc).__name__)
            return False

    async def scrape_metrics(self, replica: Replica) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.metrics_cfg.timeout)
        sent = time.monotonic()  # what the page counts was in flight by then (InFlight hook)
        try:
            async with self.session.get(f"{replica.url}/metrics", headers=self._headers(replica),
                                        timeout=timeout) as resp:
                if resp.status != 200:
                    return False
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
            return False
        try:
            names = replica.served_models | {replica.model}
            old, replica.load = replica.load, parse_engine_load(text, names, scraped_at=sent,
                                                                  previous=replica.load)
            replica.lora_slots.observe(replica.load)
        except Exception as exc:  # noqa: BLE001 - a malformed page must not kill the task
            log.debug("replica %s: unreadable /metrics: %s", replica.id, exc)
            return False
        if self.on_load is not None:
            try:
                self.on_load(replica, old, replica.load)
            except Exception:  # noqa: BLE001
                log.exception("load listener failed")
        if self.telemetry:
            self.telemetry.set_engine_load(replica)
        return True

    async def discover_models(self, replica: Replica) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.metrics_cfg.timeout)
        try:
            async with self.session.get(f"{replica.url}/v1/models", headers=self._headers(replica),
                                        timeout=timeout) as resp:
                if resp.status != 200:
                    return False
                payload = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    payload += chunk
                    if len(payload) > MAX_MODELS_BYTES:
                        return False  # a /v1/models page over the budget is not trusted
            names, parents, max_len = parse_model_cards(bytes(payload))
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, AttributeError):
            return False
        if names:
            self._check_model(replica, names, parents)
        if max_len is not None:
            replica.max_model_len = max_len
        return True

    def _check_model(self, replica: Replica, names: frozenset[str], parents: dict[str, str]) -> None:
        """Take the names a replica listed, unless its configured model is not among them
        (nor the parent of an adapter it lists): then it serves something else and is kept
        out of routing and out of /v1/models (`Replica.model_mismatch`)."""
        if replica.model in names or replica.model in parents.values():
            if replica.model_mismatch:
                log.info("replica %s lists its model %s again: it gets traffic again",
                         replica.id, replica.model)
                replica.model_mismatch = frozenset()
            replica.served_models = names
            replica.adapters = frozenset(parents)
            return
        shown = frozenset(sorted(names)[:MAX_MISMATCH_NAMES])
        if not replica.model_mismatch:  # once per episode, not per poll
            log.warning("replica %s is configured under model %s but its /v1/models lists only "
                        "%s: it gets no traffic and none of its names is listed until it serves "
                        "%s (check its URL in the config)", replica.id, replica.model,
                        ", ".join(name[:100] for name in sorted(shown))
                        + (f" (+{len(names) - len(shown)} more)" if len(names) > len(shown) else ""),
                        replica.model)
        replica.model_mismatch = shown
        replica.served_models = frozenset()
        replica.adapters = frozenset()

    async def _run(self, replica: Replica) -> None:
        loop = asyncio.get_running_loop()
        next_health = next_metrics = next_models = loop.time()
        wake = self._wake[replica.id]
        # An early probe (mark_suspect) waits at least this long after the last one, so a
        # replica failing many requests at once is not probed in a tight loop.
        min_gap = min(self.health_cfg.interval, _MIN_WAKE_GAP_S)
        last_probe = -min_gap
        while True:
            now = loop.time()
            try:
                if now >= next_health or (wake.is_set() and now - last_probe >= min_gap):
                    wake.clear()
                    was_reachable = replica.reachable
                    last_probe = now
                    passed = await self.probe_health(replica)
                    if passed and not was_reachable:
                        # Joining: what it serves is read before it may be marked healthy,
                        # so no request reaches a replica serving another model.
                        await self.discover_models(replica)
                        next_models = loop.time() + self.metrics_cfg.models_interval
                    if passed is not None:
                        self.record_probe(replica, passed)
                    next_health = loop.time() + self.health_cfg.interval
                    if replica.reachable and not was_reachable:
                        next_metrics = loop.time()  # just joined: learn its load now
                if replica.reachable:
                    if loop.time() >= next_models:
                        await self.discover_models(replica)
                        next_models = loop.time() + self.metrics_cfg.models_interval
                    if loop.time() >= next_metrics:
                        await self.scrape_metrics(replica)
                        next_metrics = loop.time() + self.metrics_cfg.scrape_interval
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep watching whatever happens
                log.exception("monitor of %s failed; continuing", replica.id)
                # Whatever failed, the next round waits its interval: never a hot loop.
                now = loop.time()
                next_health = max(next_health, now + self.health_cfg.interval)
                next_metrics = max(next_metrics, now + self.metrics_cfg.scrape_interval)
                next_models = max(next_models, now + self.metrics_cfg.models_interval)
            deadline = min(next_health, next_metrics if replica.reachable else next_health,
                           next_models if replica.reachable else next_health)
            if wake.is_set():  # woken too soon after a probe: probe when the gap is over
                deadline = min(deadline, last_probe + min_gap)
                wake.clear()
                next_health = min(next_health, last_probe + min_gap)
            delay = max(0.0, deadline - loop.time())
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=delay)
