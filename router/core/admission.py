"""Admission: per-client rate limits, and a bounded queue in front of a saturated fleet.

Runs after a request is parsed and before it is scheduled:

1. **Rate limits** (``admission.rate_limit``, or a key's own ``rate_limit``): token buckets
   per client (its key's name, or its address when no keys are configured): requests per
   second with a burst, and tokens per minute, where a request costs its estimated prompt
   tokens plus the ``max_tokens`` it asks for (known at admission; the answer's real usage
   is not waited for).  An empty bucket is a 429 with ``Retry-After`` = when it refills.
2. **Saturation.**  A replica is saturated when its own last report says it has
   ``max_waiting_per_replica`` requests waiting or ``max_kv_usage`` of its KV cache in
   use, except that a waiting queue the engine is draining is not saturation: when, at
   the rate it took requests into its batch since the previous scrape (the growth of
   ``num_requests_running`` plus ``request_success_total``'s), its queue would be empty
   within ``max_queue_time`` seconds, the queue is only the next steps' batch (a burst of
   streams into an engine with room: holding them here, one per first byte, added
   seconds of TTFT the engine would not have).  A replica that took none, or whose first
   report this is, is judged by the count alone.
   While every candidate replica of a model is saturated, new requests for it wait
   here instead of piling into the engines' own FIFO queues, where priority and fairness
   would be lost.  A request waits at most ``max_wait`` seconds, and at most
   ``queue_size`` requests wait at once; beyond either, 429 with ``Retry-After``.
3. **Release.**  When a request of a model ends, its slot goes to the next waiting
   request of that model (one completion, one admission: the engines' queues stay where
   they were); when a fresh scrape shows room, as many are admitted as the reports leave
   room for.  Once requests wait, later arrivals queue behind them instead of
   overtaking.
4. **Order.**  Highest priority first (a key's ``priority``; the ``X-Priority`` header may
   lower a request's priority, never raise it above its key's).  Within a priority,
   clients take turns (round robin over clients, FIFO within one), so one client's burst
   cannot starve the others: llm-d's flow control (priority bands, fairness across
   flows) at the scale of one process.

Everything is bounded: queued requests by ``queue_size``, rate-limit buckets by
``max_clients`` (least recently seen evicted), per-model queues by the configured models.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any

from router.config import AdmissionConfig, RateLimitConfig
from router.core.clients import Client
from router.errors import RouterError
from router.fleet.replicas import Replica


class TokenBucket:
    """`rate` tokens a second up to `capacity`; starts full."""

    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` tokens are there (0: they are now)."""
        self._refill(now)
        amount = min(amount, self.capacity)  # a request bigger than the bucket waits for a full one
        return 0.0 if self.tokens >= amount else (amount - self.tokens) / self.rate

    def take(self, amount: float) -> None:
        self.tokens -= min(amount, self.capacity)


class _ClientBuckets:
    __slots__ = ("requests", "tokens")

    def __init__(self, limit: RateLimitConfig, now: float) -> None:
        self.requests = None if limit.requests_per_s is None else TokenBucket(
            limit.requests_per_s, limit.burst or max(1.0, limit.requests_per_s), now)
        self.tokens = None if limit.tokens_per_min is None else TokenBucket(
            limit.tokens_per_min / 60.0, limit.tokens_per_min, now)


def rate_limited(message: str, wait_s: float) -> RouterError:
    return RouterError(429, message, type="RateLimitError",
                       headers={"Retry-After": str(max(1, math.ceil(wait_s)))})


class RateLimiter:
    """Token buckets per client identity, for at most `max_clients` identities (LRU)."""

    def __init__(self, default: RateLimitConfig | None, max_clients: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.default = default
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _ClientBuckets] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, client: Client, tokens: int) -> None:
        """Take one request and `tokens` from the client's buckets.

        Raises RateLimitExceeded (its `kind` names the bucket, its `error` is the 429) when
        either is short; takes nothing then.
        """
        limit = client.key.rate_limit if client.key and client.key.rate_limit else self.default
        if limit is None:
            return None
        now = self._clock()
        buckets = self._buckets.get(client.identity)
        if buckets is None:
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
            buckets = self._buckets[client.identity] = _ClientBuckets(limit, now)
        else:
            self._buckets.move_to_end(client.identity)
        wait_requests = buckets.requests.wait_for(1, now) if buckets.requests else 0.0
        wait_tokens = buckets.tokens.wait_for(tokens, now) if buckets.tokens else 0.0
        if wait_requests > 0:
            raise RateLimitExceeded("requests", rate_limited(
                f"Rate limit reached for {client.name}: {limit.requests_per_s:g} requests/s",
                wait_requests))
        if wait_tokens > 0:
            raise RateLimitExceeded("tokens", rate_limited(
                f"Rate limit reached for {client.name}: {limit.tokens_per_min:g} tokens/min",
                wait_tokens))
        if buckets.requests:
            buckets.requests.take(1)
        if buckets.tokens:
            buckets.tokens.take(tokens)


class RateLimitExceeded(Exception):
    def __init__(self, kind: str, error: RouterError) -> None:
        super().__init__(error.message)
        self.kind = kind
        self.error = error


class _Waiter:
    __slots__ = ("future", "identity", "priority", "only")

    def __init__(self, future: asyncio.Future[None], identity: str, priority: int,
                 only: Sequence[Replica] | None = None) -> None:
        self.future = future
        self.identity = identity
        self.priority = priority
        self.only = only  # the replicas it may use, when fewer than the model's (a subset hint)


class _ModelQueue:
    """Waiters of one model: priority bands, each a round robin of per-client FIFOs."""

    def __init__(self) -> None:
        self.bands: dict[int, OrderedDict[str, deque[_Waiter]]] = {}
        self.size = 0

    def push(self, waiter: _Waiter) -> None:
        band = self.bands.setdefault(waiter.priority, OrderedDict())
        band.setdefault(waiter.identity, deque()).append(waiter)
        self.size += 1

    def pop(self, eligible: Callable[[_Waiter], bool] | None = None) -> _Waiter | None:
        """The next waiter in turn (highest priority, then round robin over clients) that
        `eligible` lets go; a client whose first waiter may not go keeps its place."""
        for priority in sorted(self.bands, reverse=True):
            band = self.bands[priority]
            for identity, fifo in band.items():
                waiter = fifo[0]
                if eligible is not None and not eligible(waiter):
                    continue
                fifo.popleft()
                if fifo:
                    band.move_to_end(identity)  # this client's turn is over
                else:
                    del band[identity]
                if not band:
                    del self.bands[priority]
                self.size -= 1
                return waiter
        return None

    def remove(self, waiter: _Waiter) -> None:
        band = self.bands.get(waiter.priority)
        fifo = band.get(waiter.identity) if band is not None else None
        if fifo is None or waiter not in fifo:
            return
        fifo.remove(waiter)
        self.size -= 1
        if not fifo:
            del band[waiter.identity]  # type: ignore[union-attr]
            if not band:
                del self.bands[waiter.priority]


class Admission:
    """Rate limits and the saturation queue of one router."""

    def __init__(self, config: AdmissionConfig, *, retry_after: int = 1,
                 on_queue: Callable[[str, int], None] | None = None) -> None:
        self.config = config
        self.retry_after = retry_after
        self.on_queue = on_queue  # (model, requests now waiting for it), e.g. a gauge
        self.limiter = RateLimiter(config.rate_limit, config.max_clients)
        self._queues: dict[str, _ModelQueue] = {}
        self.waiting = 0  # across models, <= config.queue_size

    # -- saturation -----------------------------------------------------------------
    def saturated(self, replica: Replica) -> bool:
        config, load = self.config, replica.load
        if load.kv_cache_usage >= config.max_kv_usage:
            return True
        return load.waiting >= config.max_waiting_per_replica and not self._draining(replica)

    def _draining(self, replica: Replica) -> bool:
        """Its queue is long but moving: at its recent intake it empties within max_queue_time."""
        rate, limit = replica.load.intake_rate, self.config.max_queue_time
        return limit > 0 and rate is not None and replica.load.waiting < rate * limit

    def room(self, replicas: Sequence[Replica]) -> int:
        """How many more requests the replicas' last reports leave room for (every waiting
        one when a replica is draining its queue quickly)."""
        total = 0
        for r in replicas:
            if r.load.kv_cache_usage >= self.config.max_kv_usage:
                continue
            if r.load.waiting >= self.config.max_waiting_per_replica:
                if self._draining(r):
                    return self.waiting
                continue
            total += max(0, math.ceil(self.config.max_waiting_per_replica - r.load.waiting))
        return total

    def queued(self, model: str) -> int:
        queue = self._queues.get(model)
        return queue.size if queue is not None else 0

    # -- the queue --------------------------------------------------------------------
    def passes(self, model: str, candidates: Sequence[Replica]) -> bool:
        """May a request go on at once, without `admit`'s queue?  (Nobody of its model is
        queued and a candidate has room: most requests.  Asked first, so that they do not
        pay for a coroutine.)"""
        if not self.config.enabled:
            return True
        queue = self._queues.get(model)
        return (queue is None or not queue.size) and not all(self.saturated(r) for r in candidates)

    async def admit(self, model: str, candidates: Sequence[Replica], client: Client,
                    priority: int, *, restricted: bool = False) -> float:
        """Return when the request may go on (seconds waited); 429 when it may not.
        `restricted`: `candidates` are fewer than the model's replicas (a data plane's subset
        hint); the queue then lets the request go only when one of them has room."""
        if self.passes(model, candidates):
            return 0.0
        queue = self._queues.get(model)
        if self.waiting >= self.config.queue_size:
            raise QueueRejection("queue_full", RouterError(
                429, "Every replica is saturated and the router's queue is full; retry shortly",
                type="RateLimitError", headers={"Retry-After": str(self.retry_after)}))
        if queue is None:
            queue = self._queues[model] = _ModelQueue()
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), client.identity, priority, candidates if restricted else None)
        queue.push(waiter)
        self.waiting += 1
        self._changed(model, queue)
        started = loop.time()
        try:
            async with asyncio.timeout(self.config.max_wait):
                await asyncio.shield(waiter.future)
        except TimeoutError:
            if not waiter.future.done():
                raise QueueRejection("wait_timeout", RouterError(
                    429, f"Every replica is saturated: the request waited {self.config.max_wait:g}s "
                         "in the router's queue; retry shortly", type="RateLimitError",
                    headers={"Retry-After": str(self.retry_after)})) from None
        finally:
            if not waiter.future.done():  # timed out, or the client went away
                waiter.future.cancel()
                queue.remove(waiter)
                self.waiting -= 1
                self._changed(model, queue)
        return loop.time() - started

    def _changed(self, model: str, queue: _ModelQueue) -> None:
        if self.on_queue is not None:
            self.on_queue(model, queue.size)

    def _release(self, model: str, n: int) -> int:
        queue = self._queues.get(model)
        released = 0
        while queue is not None and released < n:
            waiter = queue.pop(self._may_go)
            if waiter is None:
                break
            self.waiting -= 1
            if not waiter.future.done():
                waiter.future.set_result(None)
                released += 1
        if queue is not None:
            self._changed(model, queue)
        return released

    def _may_go(self, waiter: _Waiter) -> bool:
        """A waiter restricted to some replicas goes only when one of them has room."""
        only = waiter.only
        return only is None or not all(self.saturated(r) for r in only)

    def on_request_end(self, model: str) -> None:
        """A request of `model` ended (or got its first byte: the engine took it off its own
        queue, hooks.AdmissionRelease): its slot goes to the next waiting one."""
        if self.waiting:
            self._release(model, 1)

    def on_load(self, model: str, replicas: Sequence[Replica]) -> None:
        """Fresh reports: admit as many waiting requests as they leave room for."""
        if self.waiting and self.queued(model):
            self._release(model, self.room(replicas))


class QueueRejection(Exception):
    def __init__(self, reason: str, error: RouterError) -> None:
        super().__init__(error.message)
        self.reason = reason
        self.error = error


def token_cost(prompt_tokens: int, data: dict[str, Any]) -> int:
    """What a request costs a tokens-per-minute bucket: its prompt plus its max output."""
    out = data.get("max_completion_tokens", data.get("max_tokens", data.get("max_output_tokens")))
    return prompt_tokens + (out if isinstance(out, int) and not isinstance(out, bool) and out > 0 else 0)
