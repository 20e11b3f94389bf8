"""Forwarding: rank, dispatch, fail over before the first byte, relay verbatim, clean up.

One request's life here:

1. ``policy.rank`` orders the routable replicas (best first).  The ranking is computed
   once; failover walks down it without asking again.
2. Per attempt (at most ``proxy.max_attempts``, none started after ``proxy.deadline``;
   tenacity drives the loop and its full-jitter exponential backoff):
   * dispatch: ``replica.in_flight += 1`` and ``index.record(block_hashes, replica)``
     (so a burst of same-prefix requests sees each other at once);
   * POST the client's bytes with a per-attempt ``X-Request-Id: <id>-<attempt>``, the
     replica's API key (never the client's Authorization) and no hop-by-hop headers;
   * a connect error, a timeout, a disconnect, a 5xx or a 429 *before the first response
     body byte* is a failover: the index record is forgotten, a connect failure marks the
     replica SUSPECT at once (the monitor re-probes it), the next replica is tried;
   * otherwise the response is committed: ``policy.observe`` gets the time to first byte.
3. Relay.  A stream (``"stream": true`` answered with 200) is written to the client chunk
   by chunk as the bytes arrive, never re-encoded; if the replica fails mid-stream the
   stream ends with ``data: {"error": ...}`` and ``data: [DONE]``.  A non-stream response
   is one JSON document: it is read whole and sent with its status, and a replica that
   dies while sending it gives the client a 502.
4. ``finally``: in-flight falls, the upstream response is released - or, if unfinished,
   its connection is closed, which is how vLLM learns to abort the request when the
   client went away (the handler is cancelled on disconnect, see app.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Mapping, Sequence

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from tenacity import (AsyncRetrying, retry_if_exception_type, stop_after_attempt,
                      stop_after_delay, wait_random_exponential)

from router.config import ProxyConfig
from router.errors import RouterError, error_body, sse_error_event
from router.fleet import Health, Replica
from router.policies.base import Decision, Policy
from router.telemetry import RequestRecord, Telemetry

if TYPE_CHECKING:
    from router.monitor import Monitor
    from router.prefix.index import PrefixIndex, Recording
    from router.requests import RouteRequest

log = logging.getLogger("router.proxy")

# RFC 9110 7.6.1 hop-by-hop headers (+ the de-facto Proxy-Connection): never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# Request headers the router sets itself or must not pass on.
_DROP_REQUEST = frozenset({"host", "content-length", "authorization", "expect", "x-request-id"})
# Response headers aiohttp (re)computes for the client.
_DROP_RESPONSE = frozenset({"content-length", "date", "server", "x-request-id"})
_ERROR_BODY_CAP = 64 * 1024  # bytes kept of a failed upstream response
CLIENT_CLOSED = 499  # nginx's status for "client closed the request"

_UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def _connection_tokens(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> set[str]:
    values = headers.getall("Connection", []) if hasattr(headers, "getall") else (
        [headers["Connection"]] if "Connection" in headers else [])
    return {token.strip().lower() for value in values for token in value.split(",") if token.strip()}


def forwardable_request_headers(headers: CIMultiDictProxy[str],
                                request_id_header: str = "X-Request-Id") -> tuple[tuple[str, str], ...]:
    """Client headers that may go upstream: no hop-by-hop, Host, Authorization, lengths."""
    drop = HOP_BY_HOP | _DROP_REQUEST | _connection_tokens(headers) | {request_id_header.lower()}
    return tuple((k, v) for k, v in headers.items() if k.lower() not in drop)


def client_response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Upstream response headers that may go to the client."""
    drop = HOP_BY_HOP | _DROP_RESPONSE | _connection_tokens(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


class UpstreamFailure(Exception):
    """An attempt failed before the first response byte: fail over."""

    def __init__(self, replica: Replica, kind: str, message: str, *, status: int | None = None,
                 body: bytes | None = None, headers: CIMultiDict[str] | None = None) -> None:
        super().__init__(message)
        self.replica = replica
        self.kind = kind
        self.message = message
        self.status = status
        self.body = body
        self.headers = headers


class NoReplicaLeft(Exception):
    """Every replica of the ranking became unroutable during failover."""


class Proxy:
    """Forwards RouteRequests to replicas; one per app."""

    def __init__(self, *, session: aiohttp.ClientSession, policy: Policy, index: "PrefixIndex",
                 config: ProxyConfig, telemetry: Telemetry, monitor: "Monitor | None" = None,
                 request_id_header: str = "X-Request-Id") -> None:
        self.session = session
        self.policy = policy
        self.index = index
        self.config = config
        self.telemetry = telemetry
        self.monitor = monitor
        self.request_id_header = request_id_header
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout,
                                              sock_read=config.read_timeout)
        # Per-request bookkeeping (drain, introspection): entries removed in `finally`.
        self.active: dict[int, RequestRecord] = {}
        self._ids = itertools.count()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- bookkeeping ------------------------------------------------------------------
    def begin(self, record: RequestRecord) -> int:
        key = next(self._ids)
        self.active[key] = record
        self._idle.clear()
        return key

    def end(self, key: int) -> None:
        self.active.pop(key, None)
        if not self.active:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is active (drain); False if `timeout` ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout)
            return True
        except asyncio.TimeoutError:
            return not self.active

    # -- ranking ----------------------------------------------------------------------
    def rank(self, route: "RouteRequest", candidates: Sequence[Replica],
             record: RequestRecord) -> Decision:
        started = time.perf_counter()
        try:
            decision = self.policy.rank(route, candidates, self.index)
        except Exception:  # noqa: BLE001 - a policy bug must not fail the request
            log.exception("policy %s failed; falling back to configuration order", self.policy.name)
            decision = Decision(ranked=list(candidates), why={"fallback": "policy error"})
        self.telemetry.decision_seconds.labels(self.policy.name).observe(time.perf_counter() - started)
        ranked = [r for r in decision.ranked if r.routable] or [r for r in candidates if r.routable]
        # Healthy before suspect, whatever the policy said (stable: keeps its order).
        decision.ranked = sorted(ranked, key=lambda r: r.health is not Health.HEALTHY)
        record.policy = self.policy.name
        record.why = decision.why
        return decision

    # -- forwarding -------------------------------------------------------------------
    async def forward(self, request: web.Request, route: "RouteRequest",
                      candidates: Sequence[Replica], record: RequestRecord) -> web.StreamResponse:
        decision = self.rank(route, candidates, record)
        if not decision.ranked:
            raise self.unavailable(route.model)
        cfg = self.config
        tried: list[Replica] = []
        last: UpstreamFailure | None = None
        remaining = max(0.0, cfg.deadline - record.elapsed())
        retrying = AsyncRetrying(
            stop=stop_after_attempt(cfg.max_attempts) | stop_after_delay(remaining),
            wait=wait_random_exponential(multiplier=cfg.backoff_initial, max=cfg.backoff_max),
            retry=retry_if_exception_type(UpstreamFailure),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    number = attempt.retry_state.attempt_number
                    replica = self._pick(decision.ranked, tried)
                    if number > 1:
                        self.telemetry.retries.labels(route.model).inc()
                        if tried and tried[-1] is not replica:
                            self.telemetry.failovers.labels(route.model, tried[-1].id).inc()
                    tried.append(replica)
                    record.attempts = number
                    record.replica = replica.id
                    return await self._attempt(request, route, replica, number, decision, record)
        except UpstreamFailure as failure:
            last = failure
        except NoReplicaLeft:
            pass
        return self._give_up(route, record, last, tried)

    def _pick(self, ranked: Sequence[Replica], tried: Sequence[Replica]) -> Replica:
        """The best routable replica not tried yet; else cycle through the routable ones."""
        routable = [r for r in ranked if r.routable]
        if not routable:
            raise NoReplicaLeft()
        for replica in routable:
            if replica not in tried:
                return replica
        return routable[len(tried) % len(routable)]

    def unavailable(self, model: str, detail: str = "") -> RouterError:
        retry_after = str(self.config.retry_after)
        message = f"No healthy replica is available for model `{model}`"
        return RouterError(503, message + (f": {detail}" if detail else ""),
                           headers={"Retry-After": retry_after})

    def _give_up(self, route: "RouteRequest", record: RequestRecord,
                 last: UpstreamFailure | None, tried: Sequence[Replica]) -> web.StreamResponse:
        if last is not None and last.status is not None:
            # The replicas answered, with errors: pass the last answer on (vLLM's shape).
            record.error = f"upstream {last.status} after {len(tried)} attempt(s)"
            headers = last.headers or CIMultiDict()
            if last.status in (429, 503) and "Retry-After" not in headers:
                headers["Retry-After"] = str(self.config.retry_after)
            return web.Response(status=last.status, body=last.body or error_body(
                last.status, last.message), headers=headers)
        names = ", ".join(dict.fromkeys(r.id for r in tried)) or "none"
        record.error = last.message if last is not None else "no routable replica"
        detail = f"{len(tried)} attempt(s) failed (tried: {names})" if tried else ""
        raise self.unavailable(route.model, detail)

    def _upstream_headers(self, route: "RouteRequest", replica: Replica, number: int) -> CIMultiDict[str]:
        headers = CIMultiDict(route.headers)
        headers[self.request_id_header] = f"{route.request_id}-{number}"
        if self.request_id_header.lower() != "x-request-id":
            headers["X-Request-Id"] = f"{route.request_id}-{number}"
        if replica.api_key:
            headers["Authorization"] = f"Bearer {replica.api_key}"
        if "Accept-Encoding" not in headers:
            headers["Accept-Encoding"] = "identity"  # relay bytes as sent; no surprise gzip
        headers["Content-Type"] = headers.get("Content-Type", "application/json")
        return headers

    def _fail(self, route: "RouteRequest", replica: Replica, kind: str, message: str,
              **extra: object) -> UpstreamFailure:
        self.telemetry.upstream_errors.labels(route.model, replica.id, kind).inc()
        if kind in ("connect", "disconnect") and self.monitor is not None:
            self.monitor.mark_suspect(replica)
        log.info("request %s: replica %s failed before the first byte (%s): %s",
                 route.request_id, replica.id, kind, message)
        return UpstreamFailure(replica, kind, message, **extra)  # type: ignore[arg-type]

    async def _attempt(self, request: web.Request, route: "RouteRequest", replica: Replica,
                       number: int, decision: Decision, record: RequestRecord) -> web.StreamResponse:
        replica.in_flight += 1
        self.telemetry.set_in_flight(replica)
        recording: "Recording | None" = None
        if route.block_hashes:
            recording = self.index.record(route.block_hashes, replica.id)
        resp: aiohttp.ClientResponse | None = None
        finished = False
        try:
            try:
                resp = await self.session.post(
                    replica.url + route.path, data=route.body,
                    headers=self._upstream_headers(route, replica, number),
                    timeout=self._timeout, allow_redirects=False)
            except aiohttp.ClientConnectorError as exc:
                raise self._fail(route, replica, "connect", str(exc) or type(exc).__name__)
            except asyncio.TimeoutError:
                raise self._fail(route, replica, "timeout", "no response headers in time")
            except _UPSTREAM_ERRORS as exc:
                raise self._fail(route, replica, "disconnect", str(exc) or type(exc).__name__)

            if resp.status >= 500 or resp.status == 429:
                try:
                    body = await resp.content.read(_ERROR_BODY_CAP)
                except _UPSTREAM_ERRORS:
                    body = b""
                kind = "status_429" if resp.status == 429 else "status_5xx"
                raise self._fail(route, replica, kind, f"replica answered {resp.status}",
                                 status=resp.status, body=body,
                                 headers=client_response_headers(resp.headers))

            is_sse = resp.content_type == "text/event-stream"
            if route.stream and resp.status == 200 and is_sse:
                out = await self._relay_stream(request, route, replica, resp, decision, record)
            else:
                out = await self._relay_whole(route, replica, resp, decision, record)
            finished = True
            return out
        except UpstreamFailure:
            if recording is not None:
                self.index.forget(recording)
            raise
        finally:
            replica.in_flight -= 1
            self.telemetry.set_in_flight(replica)
            if resp is not None:
                if finished and resp.content.is_eof():
                    resp.release()
                else:
                    resp.close()  # unfinished: drop the connection so vLLM aborts the request

    def _first_byte(self, route: "RouteRequest", replica: Replica, decision: Decision,
                    record: RequestRecord) -> None:
        ttfb = record.elapsed()
        record.ttfb = ttfb
        self.telemetry.ttfb.labels(route.model, replica.id).observe(ttfb)
        matched = decision.matched_blocks.get(replica.id, 0)
        self.telemetry.decisions.labels(self.policy.name, route.model, replica.id).inc()
        self.telemetry.matched_blocks.labels(self.policy.name).observe(matched)
        try:
            self.policy.observe(replica, route, time_to_first_byte_s=ttfb, matched_blocks=matched)
        except Exception:  # noqa: BLE001 - feedback is best effort
            log.exception("policy %s observe() failed", self.policy.name)

    async def _relay_whole(self, route: "RouteRequest", replica: Replica,
                           resp: aiohttp.ClientResponse, decision: Decision,
                           record: RequestRecord) -> web.StreamResponse:
        try:
            body = await resp.read()
        except _UPSTREAM_ERRORS as exc:
            self.telemetry.upstream_errors.labels(route.model, replica.id, "stream_cut").inc()
            record.error = f"replica failed while sending the response: {exc or type(exc).__name__}"
            raise RouterError(502, f"The replica serving model `{route.model}` failed while "
                                   "sending the response") from None
        self._first_byte(route, replica, decision, record)
        return web.Response(status=resp.status, body=body,
                            headers=client_response_headers(resp.headers))

    async def _relay_stream(self, request: web.Request, route: "RouteRequest", replica: Replica,
                            resp: aiohttp.ClientResponse, decision: Decision,
                            record: RequestRecord) -> web.StreamResponse:
        content = resp.content
        try:
            first = await content.readany()
        except asyncio.TimeoutError:
            raise self._fail(route, replica, "timeout", "no first byte in time")
        except _UPSTREAM_ERRORS as exc:
            raise self._fail(route, replica, "disconnect", str(exc) or type(exc).__name__)
        self._first_byte(route, replica, decision, record)

        out = web.StreamResponse(status=resp.status, headers=client_response_headers(resp.headers))
        out.headers[self.request_id_header] = route.request_id
        try:
            await out.prepare(request)
            tail = b""
            chunk = first
            cut: str | None = None
            while chunk:
                await out.write(chunk)
                tail = chunk[-2:] if len(chunk) >= 2 else tail[-1:] + chunk
                try:
                    chunk = await content.readany()
                except asyncio.TimeoutError:
                    cut = f"no data for {self.config.read_timeout:g}s"
                    break
                except _UPSTREAM_ERRORS as exc:
                    cut = str(exc) or type(exc).__name__
                    break
            if cut is not None or not content.is_eof():
                cut = cut or "stream ended early"
                self.telemetry.upstream_errors.labels(route.model, replica.id, "stream_cut").inc()
                record.error = f"replica stream cut: {cut}"
                log.warning("request %s: replica %s failed mid-stream: %s",
                            route.request_id, replica.id, cut)
                prefix = b"" if tail.endswith(b"\n\n") or not tail else (
                    b"\n" if tail.endswith(b"\n") else b"\n\n")
                await out.write(prefix + sse_error_event(
                    502, f"The replica serving model `{route.model}` failed mid-stream: {cut}"))
            await out.write_eof()
        except ConnectionResetError:  # incl. aiohttp.ClientConnectionResetError
            record.client_gone = True  # the caller's `finally` closes the upstream connection
        return out
