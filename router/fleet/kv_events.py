"""KV-event subscriptions across the fleet: one ZMQ SUB per replica that publishes events
(``kv_events:`` in routes.yaml, given by the launcher for the engines it starts, or asked of
the replica: ``GET /kv_event_sources``), feeding the exact index; `KVEvents` follows the live
fleet.  What one subscription does with gaps, restarts and reconnects:
router/fleet/kv_subscription.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import aiohttp
import zmq
import zmq.asyncio

from router.fleet.event_sources import discover
from router.fleet.kv_subscription import DEFAULT_REPLAY_TIMEOUT, Subscription

if TYPE_CHECKING:
    from router.fleet.replicas import Replica
    from router.prefix.exact import ExactIndex

log = logging.getLogger("router.kv_events")



class KVEvents:
    """Every replica's subscription; follows the fleet (``add`` / ``remove``).

    A replica without ``kv_events:`` is asked where it publishes (``GET /kv_event_sources``,
    event_sources.py) when `start` was given an HTTP session: up to ``DISCOVERY_ATTEMPTS``
    times, ``DISCOVERY_INTERVAL_S`` apart (it may still be starting), then never again."""

    DISCOVERY_ATTEMPTS = 10
    DISCOVERY_INTERVAL_S = 3.0

    def __init__(self, exact: ExactIndex, *, replay_timeout: float = DEFAULT_REPLAY_TIMEOUT,
                 on_subscribed: Callable[[str], None] | None = None) -> None:
        self.exact = exact
        self.replay_timeout = replay_timeout
        self.on_subscribed = on_subscribed  # told each new subscription's replica (its metrics)
        self.context: zmq.asyncio.Context | None = None
        self.subscriptions: dict[str, Subscription] = {}
        self._session: aiohttp.ClientSession | None = None
        self._discovering: dict[str, asyncio.Task[None]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._started = False

    def start(self, replicas: Iterable[Replica], session: aiohttp.ClientSession | None = None) -> None:
        self._started = True
        self._session = session
        for replica in replicas:
            self.add(replica)

    def add(self, replica: Replica) -> None:
        if not self._started or replica.id in self.subscriptions or replica.id in self._discovering:
            return
        if not replica.kv_events_endpoint:
            if self._session is not None:
                task = asyncio.get_running_loop().create_task(self._discover(replica))
                self._discovering[replica.id] = task
                task.add_done_callback(self._discovered)
            return
        self._subscribe(replica)

    def _discovered(self, task: asyncio.Task[None]) -> None:
        for rid, running in list(self._discovering.items()):
            if running is task:
                del self._discovering[rid]

    async def _discover(self, replica: Replica) -> None:
        assert self._session is not None
        for _ in range(self.DISCOVERY_ATTEMPTS):
            source = await discover(self._session, replica.url, replica.api_key)
            if source is not None:
                log.info("KV events of %s: advertised at %s", replica.id, source.endpoint)
                replica.kv_events_endpoint = source.endpoint
                replica.kv_replay_endpoint = source.replay_endpoint
                replica.kv_events_topic = source.topic
                self._subscribe(replica)
                return
            await asyncio.sleep(self.DISCOVERY_INTERVAL_S)

    def _subscribe(self, replica: Replica) -> None:
        assert replica.kv_events_endpoint is not None
        if self.context is None:
            self.context = zmq.asyncio.Context()
        self.exact.attach(replica.id, replica.model)
        self.exact.set_capacity(replica.id, replica.load.num_gpu_blocks, replica.load.block_size)
        sub = Subscription(replica.id, replica.kv_events_endpoint, replay_endpoint=replica.kv_replay_endpoint,
                           topic=replica.kv_events_topic or "", exact=self.exact, context=self.context,
                           replay_timeout=self.replay_timeout)
        self.subscriptions[replica.id] = sub
        sub.start()
        if self.on_subscribed is not None:
            self.on_subscribed(replica.id)

    def remove(self, replica_id: str) -> None:
        """Stop following `replica_id` now (its socket closes in the background), so that
        the same replica added again at once gets a fresh subscription."""
        discovering = self._discovering.pop(replica_id, None)
        if discovering is not None:
            discovering.cancel()
        sub = self.subscriptions.pop(replica_id, None)
        self.exact.detach(replica_id)
        if sub is not None:
            task = asyncio.get_running_loop().create_task(sub.stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    def stats(self, replica_id: str) -> dict[str, Any] | None:
        sub = self.subscriptions.get(replica_id)
        if sub is None:
            return None
        out = sub.stats.as_dict(time.time())
        out["endpoint"] = sub.endpoint
        out.update(self.exact.replica_stats(replica_id) or {})
        return out

    async def close(self) -> None:
        for task in list(self._discovering.values()):
            task.cancel()
        for rid in list(self.subscriptions):
            self.remove(rid)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        if self.context is not None:
            self.context.term()
            self.context = None
