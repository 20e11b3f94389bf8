"""One attempt on one replica: a pool slot, the POST, the wait for an answer that can be
committed, and its end (waits closed, hooks told, the upstream response released or closed).

Everything before the commit is a failover (`UpstreamFailure`, router/transport/failures.py)
that the proxy's loop (router/transport/proxy.py) answers by trying the next replica;
`deliver` commits the answer and hands it to the relay (router/transport/relay.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict

from router.config import ProxyConfig
from router.core.scheduling import Decision
from router.errors import RouterError
from router.fleet.replicas import Replica
from router.observability.access_log import RequestRecord
from router.observability.loop_lag import LoopLag
from router.observability.telemetry import Telemetry
from router.transport.failures import UPSTREAM_ERRORS, UpstreamFailure, retry_after_seconds
from router.transport.headers import client_response_headers
from router.transport.hooks import (
    ABANDONED,
    FAILURE,
    SUCCESS,
    Attempt,
    Hooks,
)
from router.transport.relay import FIRST_TOKEN_PATHS, Relay, sse_verdict
from router.transport.upstream import UpstreamPool
from router.transport.upstream_connection import UpstreamConnectError, UpstreamPoolTimeout, UpstreamResponse
from router.transport.waits import DRAIN, UNHEALTHY, Wait, Waits

if TYPE_CHECKING:
    from router.core.requests import RouteRequest

log = logging.getLogger("router.proxy")  # one logger for the whole forwarding path


_ERROR_BODY_CAP = 64 * 1024  # bytes kept of a failed upstream response


class PoolSlot:
    """An attempt's slot of the upstream pool, until the request takes it to the pool.

    Taken before the attempt is dispatched; `Attempts.head` marks it handed over as it sends.
    An attempt that ends before that (its dispatch failed, or a hedge leg cancelled before
    its task ever ran: no code of it runs then) gives it back through `release`, once."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = True

    def release(self, pool: UpstreamPool) -> None:
        if self.held:
            self.held = False
            pool.release_slot()


class ConnectWatch:
    """The connect timeout of one attempt, blind to the router's own event-loop stalls.

    A plain connect timer, when the loop is busy, fires before the loop has looked at a
    connection the kernel completed long ago: the replica is then blamed (breaker,
    failover) for the router's overload, and with thousands of requests arriving at once
    every replica was ejected.  This watch starts when the pool (router/transport/upstream.py) starts
    a new connection (not while it waits for a pool slot, nor for a reused one), and when
    `limit` has passed without the connection made it fires only if the loop did not stall
    meanwhile (router/observability/loop_lag.py); otherwise it looks again one `limit` later.  Firing
    ends the attempt's own timeout (``timeout``) at once and sets ``expired``, which is how
    the attempt tells a connect timeout from its other deadlines (first byte, drain,
    unhealthy), which still bound it.
    """

    def __init__(self, limit: float, loop_lag: LoopLag | None) -> None:
        self.limit = limit
        self.loop_lag = loop_lag
        self.timeout: asyncio.Timeout | None = None
        self.expired = False
        self._started = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connecting(self) -> None:
        self._started = time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(self.limit, self._check)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        lag = self.loop_lag
        if lag is not None and lag.stalled_since(self._started, self.limit / 2):
            self._started = time.monotonic()
            self._timer = asyncio.get_running_loop().call_later(self.limit, self._check)
            return
        self._timer = None
        self.expired = True
        if self.timeout is not None:
            self.timeout.reschedule(asyncio.get_running_loop().time())


class Attempts:
    """Runs one attempt on one replica; one per proxy."""

    def __init__(self, *, config: ProxyConfig, upstream: UpstreamPool, waits: Waits, hooks: Hooks,
                 relay: Relay, telemetry: Telemetry, loop_lag: LoopLag | None,
                 request_id_header: str) -> None:
        self.config = config
        self.upstream = upstream
        self.waits = waits
        self.hooks = hooks
        self.relay = relay
        self.telemetry = telemetry
        self.loop_lag = loop_lag
        self.request_id_header = request_id_header

    def _upstream_headers(self, route: RouteRequest, replica: Replica, number: int) -> list[tuple[str, str]]:
        """The client's forwardable headers plus the attempt's own: its request id, the
        replica's key, identity encoding and a JSON content type unless the client said."""
        headers = list(route.headers)  # (never an id, a credential, Host or a length: api.py)
        named = {name.lower() for name, _ in headers}
        request_id = f"{route.request_id}-{number}"
        headers.append((self.request_id_header, request_id))
        if self.request_id_header.lower() != "x-request-id":
            headers.append(("X-Request-Id", request_id))
        if replica.api_key:
            headers.append(("Authorization", f"Bearer {replica.api_key}"))
        if "accept-encoding" not in named:
            headers.append(("Accept-Encoding", "identity"))  # relay bytes as sent; no surprise gzip
        if "content-type" not in named:
            headers.append(("Content-Type", "application/json"))
        return headers

    def fail(self, route: RouteRequest, replica: Replica, kind: str, message: str,
              **extra: object) -> UpstreamFailure:
        self.telemetry.upstream_errors.labels(route.model, replica.id, kind).inc()
        log.info("request %s: replica %s failed before the answer (%s): %s",
                 route.request_id, replica.id, kind, message)
        return UpstreamFailure(replica, kind, message, **extra)  # type: ignore[arg-type]

    def _timed_out(self, route: RouteRequest, replica: Replica, wait: Wait,
                   seconds: float) -> UpstreamFailure:
        reason = wait.why()
        if reason == DRAIN:
            raise RouterError(503, "The router shut down before the replica answered",
                              headers={"Retry-After": str(self.config.retry_after),
                                       "Connection": "close"})
        if reason == UNHEALTHY:
            return self.fail(route, replica, "unhealthy",
                              "the replica turned unhealthy before answering")
        kind = "first_byte_timeout" if route.stream else "read_timeout"
        return self.fail(route, replica, kind, f"no answer within {seconds:g}s")

    async def wait_for_slot(self, route: RouteRequest, record: RequestRecord) -> None:
        """A slot of the upstream pool for the next attempt, waited for within
        ``pool_timeout`` and what is left of ``deadline``; else RouterError 503."""
        cfg = self.config
        bound = max(0.0, min(cfg.pool_timeout, cfg.deadline - record.elapsed()))
        t = self.telemetry
        try:
            waited = await self.upstream.wait_for_slot(bound)
        except UpstreamPoolTimeout as exc:
            t.child(t.pool_wait, route.model).observe(exc.waited)
            t.child(t.pool_timeouts, route.model).inc()
            record.error = (f"pool_timeout: {exc} (proxy.max_connections), wanted for "
                            f"replica {record.replica}")
            record.replica = None  # the router answers: no replica was asked
            log.info("request %s: no upstream connection free within %gs", route.request_id, bound)
            raise RouterError(503, f"The router has no free upstream connection: all are in use "
                                   f"and none came free within {bound:g}s; retry later",
                              headers={"Retry-After": str(cfg.retry_after)}) from None
        t.child(t.pool_wait, route.model).observe(waited)

    async def _connect(self, route: RouteRequest, replica: Replica, number: int,
                       watch: ConnectWatch) -> UpstreamResponse:
        """POST upstream with the slot the attempt holds; a new connection is bounded by
        `watch` (it ends the attempt's timeout early, and the attempt tells that
        TimeoutError by ``watch.expired``)."""
        try:
            headers = self._upstream_headers(route, replica, number)
            body = route.body_for(replica)
        except BaseException:
            self.upstream.release_slot()
            raise
        try:
            return await self.upstream.post(
                replica.endpoint, route.path, body, headers,
                on_connecting=watch.connecting, on_connected=watch.cancel, slot_held=True,
                method=route.method)
        finally:
            watch.cancel()

    async def run(self, request: web.Request | None, route: RouteRequest, replica: Replica,
                       number: int, decision: Decision, record: RequestRecord,
                       relay: bool = True) -> web.StreamResponse:
        if not self.upstream.take_slot_now():  # (every connection in use: wait, bounded)
            await self.wait_for_slot(route, record)
        # The slot is this attempt's until `head` hands it to the pool; it is given back
        # if the attempt ends before that (nothing between here and there waits).
        slot = PoolSlot()
        attempt = Attempt(route, replica, decision, record, number)
        try:
            self.hooks.dispatch(attempt)
        except BaseException:
            slot.release(self.upstream)
            raise
        outcome = ABANDONED
        wait = self.waits.open(replica)
        resp: UpstreamResponse | None = None
        finished = False
        try:
            try:
                resp, first, complete, streaming = await self.head(route, replica, number, wait, relay,
                                                                     slot)
            except UpstreamFailure as failure:
                outcome = FAILURE
                self.hooks.failure(attempt, failure)
                raise
            outcome = SUCCESS
            out = await self.deliver(request, attempt, resp, first, complete, streaming, wait)
            finished = True
            return out
        finally:
            slot.release(self.upstream)
            self.finish(attempt, wait, outcome, resp, finished)

    def finish(self, attempt: Attempt, wait: Wait, outcome: str, resp: UpstreamResponse | None,
                finished: bool) -> None:
        """An attempt's end: its waits and hooks, and its upstream response released - or,
        unfinished, its connection dropped, so that vLLM aborts the request."""
        self.waits.close(wait)
        self.hooks.complete(attempt, outcome)
        if resp is not None:
            if finished and resp.content.is_eof():
                resp.release()
            else:
                resp.close()

    async def head(self, route: RouteRequest, replica: Replica, number: int, wait: Wait,
                    relay: bool, slot: PoolSlot) -> tuple[UpstreamResponse, bytes, bool, bool]:
        """Send the request and wait until its answer can be committed: (the response, its
        first bytes, whether they are the whole answer, whether it is a relayed stream).
        Everything before that is a failover (UpstreamFailure); the response is closed on
        any exception (a cancelled hedge's too).  `slot`: the pool slot the attempt holds,
        handed to the pool with the request (the caller gives it back if never handed)."""
        cfg = self.config
        first_limit = cfg.first_byte_timeout if route.stream else cfg.read_timeout
        watch = ConnectWatch(cfg.connect_timeout, self.loop_lag)
        resp: UpstreamResponse | None = None
        try:
            first = b""
            complete = False
            try:
                async with asyncio.timeout(wait.limit(first_limit)) as timeout:
                    wait.timeout = watch.timeout = timeout
                    slot.held = False  # `_connect` hands it to the pool, or gives it back
                    resp = await self._connect(route, replica, number, watch)
                    if resp.status >= 500 or resp.status == 429:
                        try:
                            body = await resp.content.read(_ERROR_BODY_CAP)
                        except UPSTREAM_ERRORS:
                            body = b""
                        kind = "status_429" if resp.status == 429 else "status_5xx"
                        raise self.fail(route, replica, kind, f"replica answered {resp.status}",
                                         status=resp.status, body=body,
                                         headers=CIMultiDict(client_response_headers(resp.raw_headers)),
                                         retry_after=retry_after_seconds(
                                             resp.headers.get("Retry-After")))
                    streaming = route.stream and resp.status == 200 and \
                        resp.content_type == "text/event-stream"
                    if streaming:
                        first = await self.relay.stream_head(resp)
                        if sse_verdict(first) is not True:
                            # Not yet committed: a broken replica's 200 must not become the
                            # client's 200 (its SDK would fail on the first line).
                            raise self.fail(route, replica, "bad_stream",
                                             "a 200 text/event-stream answer that is not SSE: "
                                             f"{first[:64]!r}")
                        if route.path in FIRST_TOKEN_PATHS and route.method == "POST":
                            first = await self.relay.until_first_token(resp, first)
                    else:
                        first, complete = await self.relay.buffer(resp, timeout, wait)
            except UpstreamConnectError as exc:
                raise self.fail(route, replica, "connect", str(exc) or type(exc).__name__) from None
            except TimeoutError:
                if watch.expired:
                    raise self.fail(route, replica, "connect_timeout",
                                     f"no connection within {cfg.connect_timeout:g}s") from None
                raise self._timed_out(route, replica, wait, first_limit) from None
            except UPSTREAM_ERRORS as exc:
                raise self.fail(route, replica, "disconnect", str(exc) or type(exc).__name__) from None
            finally:
                wait.timeout = None

            if not relay and (streaming or not complete):
                raise self.fail(route, replica, "oversized", "an inner hop's answer must be whole "
                                 f"and at most proxy.buffer_bytes ({cfg.buffer_bytes})")
            return resp, first, complete, streaming
        except BaseException:
            if resp is not None:
                resp.close()  # unfinished: drop the connection so vLLM aborts the request
            raise

    async def deliver(self, request: web.Request | None, attempt: Attempt, resp: UpstreamResponse,
                       first: bytes, complete: bool, streaming: bool,
                       wait: Wait) -> web.StreamResponse:
        """The answer is committed: its first byte's hooks, then the relay."""
        record, route, replica = attempt.record, attempt.route, attempt.replica
        record.ttfb = record.elapsed()
        self.hooks.first_byte(attempt, resp.status)
        if streaming:
            assert request is not None  # (an inner hop's answer is whole: see `head`)
            return await self.relay.stream(request, route, replica, resp, first, wait, record)
        return await self.relay.whole(request, route, replica, resp, first, complete, wait, record)
