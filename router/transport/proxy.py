"""Forwarding: rank, dispatch, fail over before the answer is committed, relay verbatim.

One request's life here:

1. A flow (router/transport/flows.py) had the scheduling profile (router/core/scheduling/) order the
   candidate replicas (best first, healthy before suspect), after the breakers
   (router/fleet/breaker.py) took out ejected ones.  The ranking is computed once; failover
   walks down it without asking again.
2. Per attempt (at most ``proxy.max_attempts``, none started after ``proxy.deadline``,
   none beyond the retry budget; tenacity drives the loop and its full-jitter backoff):
   * a slot of the upstream pool (``proxy.max_connections``): taken at once when one is
     free, else waited for up to ``proxy.pool_timeout``, never past what is left of
     ``proxy.deadline``.  A wait that runs out is a 503 with ``Retry-After``: the pool is
     the router's, shared by every replica, so no replica is blamed (no breaker failure,
     no suspect marking, no failover), and nothing was dispatched;
   * dispatch: ``replica.in_flight += 1`` and ``index.record(block_hashes, replica)``
     (so a burst of same-prefix requests sees each other at once);
   * POST the client's bytes with a per-attempt ``X-Request-Id: <id>-<attempt>``, the
     replica's API key (never the client's credentials), no hop-by-hop headers and none
     that say how the request travelled (``FORWARDING_HEADERS``: X-Forwarded-*, X-Real-IP...;
     the router adds none of its own);
   * wait for the answer (router/transport/waits.py): a stream up to ``first_byte_timeout`` for its
     first byte, a whole answer up to ``read_timeout``; cut to ``unhealthy_grace`` when the
     replica turns UNHEALTHY meanwhile;
   * before the answer is committed to the client, a connect error or timeout, a
     first-byte timeout, a disconnect, a 5xx, a 429 or a 200 ``text/event-stream`` whose
     first line is not SSE (``sse_verdict``: a JSON or HTML body mislabelled) is a
     failover: the index record is
     forgotten, the breaker counts a failure (a ``Retry-After`` ejects the replica for
     that long), connect-level failures mark the replica SUSPECT at once (the monitor
     re-probes it), and the next replica is tried;
   * otherwise the answer is committed: the profile's ``observe`` gets the time to first byte, the
     breaker a success, and a 4xx answer un-records the prefix (the replica cached
     nothing).
3. Relay.  The replica's headers go to the client but for hop-by-hop ones and a denylist
   (``_DROP_RESPONSE``: what names the replica's software or host, Set-Cookie,
   WWW-Authenticate).  A stream (``"stream": true`` answered with SSE) is written to the client chunk
   by chunk as it arrives, never re-encoded; if the replica fails, stalls past
   ``read_timeout`` (or the grace once it is unhealthy) or the drain runs out, the stream
   ends with ``data: {"error": ...}`` and ``data: [DONE]``.  A non-stream answer is
   buffered up to ``proxy.buffer_bytes`` (so a replica that dies mid-answer is still a
   failover), and a larger one is relayed as it arrives (a cut then closes the client's
   connection, which sees a truncated body rather than a wrong one).
4. ``finally``: in-flight falls, the upstream response is released - or, if unfinished,
   its connection is closed, which is how vLLM learns to abort the request when the
   client went away (the handler is cancelled on disconnect, see app.py).

Hedging (``proxy.hedge``, off by default).  A replica that is alive but slow fails nothing,
so failover never leaves it; the latency outlier detection (router/transport/outliers.py) ejects it
only after some requests suffered.  With hedging on, a request whose first attempt has no
first byte (a stream's first chunk, a whole answer otherwise) after a delay derived from
that replica's expected time to first byte (``multiplier`` x the lesser of its own typical
time and its peers' for the request's shape, within [``min_delay``, ``max_delay``]; before
those are known, a stream's prefill time at the profile's learned rate, else ``max_delay``)
gets a second attempt on the best admissible replica not tried yet.  Whichever answers
first is relayed; the other is cancelled: its connection closed (vLLM aborts it), its hooks
see ABANDONED with ``attempt.superseded`` (its prefix record is forgotten; a first attempt's
elapsed time feeds the latency detector).  At most one hedge per
request, only for its first attempt, never once it has its first byte, never without another
admissible replica, each one a retry token of the budget and one of ``max_attempts``; and
only for ``hedge.paths`` (requests without side effects) and never for a hop of a
disaggregated request (a KV transfer has one reader).  Without hedging the request path runs
no task or timer of its own for it.

Messages sent to clients never name a replica (its URL is topology); the access log does.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import itertools
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from router.config import CircuitBreakerConfig, ProxyConfig
from router.core.scheduling import Decision, Profile
from router.errors import RouterError, error_body, sse_error_event
from router.fleet.breaker import BreakerState, CircuitBreakers
from router.fleet.replicas import Health, Replica
from router.observability.loop_lag import LoopLag
from router.observability.telemetry import RequestRecord, Telemetry
from router.transport.hooks import (
    ABANDONED,
    FAILURE,
    SUCCESS,
    AdapterFeedback,
    Attempt,
    BreakerFeedback,
    Hooks,
    IndexFeedback,
    InFlight,
    PolicyFeedback,
    PredictionAccuracy,
    SuspectMarking,
    uncached_tokens,
)
from router.transport.outliers import LatencyFeedback, LatencyOutliers
from router.transport.retry_budget import RetryBudget
from router.transport.upstream import (
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamPool,
    UpstreamPoolTimeout,
    UpstreamResponse,
)
from router.transport.usage import cached_tokens_of
from router.transport.waits import DRAIN, UNHEALTHY, Wait, Waits

if TYPE_CHECKING:
    from router.core.requests import RouteRequest
    from router.fleet.monitor import Monitor
    from router.fleet.replicas import Fleet
    from router.prefix.exact import ExactIndex
    from router.prefix.index import PrefixIndex

log = logging.getLogger("router.proxy")

# RFC 9110 7.6.1 hop-by-hop headers (+ the de-facto Proxy-Connection): never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# Request headers the router sets itself or must not pass on: the client's credentials
# (OpenAI, Anthropic and Azure styles), lengths, and the body encoding (bodies are
# forwarded decoded, router/frontdoor/limits.py).
_DROP_REQUEST = frozenset({"host", "content-length", "authorization", "x-api-key", "api-key",
                           "expect", "x-request-id", "content-encoding", "cookie"})
# What a client says about the path its request took: never passed on, and the router adds
# none of its own.  A replica has no use for the client's address (the router's access log
# holds it, read through `server.trusted_proxies`, router/frontdoor/auth.py), and a value a client
# wrote must not reach a replica (or the logs behind it) looking like a proxy's.
FORWARDING_HEADERS = frozenset({
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port",
    "x-forwarded-prefix", "x-forwarded-server", "x-real-ip", "x-client-ip", "true-client-ip",
    "x-cluster-client-ip", "cf-connecting-ip", "x-original-forwarded-for", "via",
})
_NEVER_FORWARDED = HOP_BY_HOP | _DROP_REQUEST | FORWARDING_HEADERS
# Response headers aiohttp (re)computes for the client, and the replica's own that are not
# the client's business (a denylist: what an engine or an API adds stays, e.g. Retry-After,
# OpenAI-style rate-limit headers): what names the replica's software or host (Server,
# X-Powered-By, Via, X-Served-By, X-Backend-Server, Alt-Svc), state of one replica
# (Set-Cookie: replicas are interchangeable, and a cookie - a load balancer's sticky one -
# would be set on the router's host), and a replica's WWW-Authenticate (a challenge about
# the router's own key to it: the client's key was accepted; the client gets the status).
_DROP_RESPONSE = frozenset({"content-length", "date", "x-request-id", "server", "x-powered-by",
                            "via", "x-served-by", "x-backend-server", "alt-svc", "set-cookie",
                            "set-cookie2", "www-authenticate"})
_ERROR_BODY_CAP = 64 * 1024  # bytes kept of a failed upstream response
_RESCHEDULE_SLACK_S = 1.0  # a relay's read deadline is moved only when it gains more than this
_HEAD_ALLOWANCE = 8 * 1024  # bytes a response head may take in the client's write buffer
# Streams whose opening events come before the prompt's prefill: committed at the first
# token's event instead (Proxy._until_first_token).
FIRST_TOKEN_PATHS = frozenset({"/v1/responses", "/v1/messages"})
_FIRST_TOKEN_EVENT = re.compile(rb"(?m)^event: *(?:[\w.]*delta|error|response\.(?:failed|incomplete|completed))\r?$")
_TOKEN_HEAD_MAX = 1 << 20
CLIENT_CLOSED = 499  # nginx's status for "client closed the request"

_UPSTREAM_ERRORS = (UpstreamError, OSError)
# Failure kinds answered 504 (a wait ran out) rather than 502 when the attempts end.
_TIMEOUT_KINDS = frozenset({"connect_timeout", "first_byte_timeout", "read_timeout"})
KIND_TEXT = {
    "connect": "could not be reached",
    "connect_timeout": "did not accept the connection in time",
    "first_byte_timeout": "sent no first byte in time",
    "read_timeout": "sent no answer in time",
    "unhealthy": "turned unhealthy before answering",
    "disconnect": "lost the connection before answering",
    "status_5xx": "answered with a server error",
    "status_429": "answered 429 (overloaded)",
    "oversized": "sent an answer too large for a prefill hop",
    "bad_stream": "answered 200 with an event stream that is not server-sent events",
}
# The fields an SSE line may start with (WHATWG HTML 9.2.6) that an OpenAI-style stream
# uses; a line starting with ":" is a comment.  A stream's first line must be one of them.
_SSE_FIELDS = (b"data", b"event", b"id", b"retry")
_SSE_HEAD_MAX = 1024  # bytes read at most to tell whether a stream is SSE (blank lines first)
_BOM = b"\xef\xbb\xbf"


def sse_verdict(head: bytes) -> bool | None:
    """Do a stream's first bytes look like server-sent events?  True, False, or None when
    they are too few to say (e.g. b"da", or only blank lines so far).

    The first line must be a comment (``:``) or one of the fields a completion stream uses,
    followed by ``:`` or the end of the line (an optional BOM and blank lines may come
    first).  A JSON error body or an HTML page labelled text/event-stream is not."""
    text = head.removeprefix(_BOM).lstrip(b"\r\n")
    if not text:
        return None
    if text.startswith(b":"):
        return True
    for name in _SSE_FIELDS:
        if text.startswith(name):
            after = text[len(name):len(name) + 1]
            if not after:
                return None
            if after in (b":", b"\r", b"\n"):
                return True
        elif name.startswith(text):
            return None
    return False


def _connection_tokens(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> set[str]:
    values = headers.getall("Connection", []) if hasattr(headers, "getall") else (
        [headers["Connection"]] if "Connection" in headers else [])
    return _tokens(values)


def _tokens(values: Iterable[str]) -> set[str]:
    """The lower-cased tokens of comma-separated header values (a Connection header's)."""
    return {token.strip().lower() for value in values for token in value.split(",") if token.strip()}


@functools.lru_cache(maxsize=8)
def _never_forwarded(request_id_header: str) -> frozenset[str]:
    """The request headers never forwarded, the configured request-id header among them."""
    return _NEVER_FORWARDED | {request_id_header.lower()}


def forwardable_request_headers(headers: CIMultiDictProxy[str],
                                request_id_header: str = "X-Request-Id") -> tuple[tuple[str, str], ...]:
    """Client headers that may go upstream: no hop-by-hop, Host, credentials, lengths."""
    drop = _never_forwarded(request_id_header)
    if "Connection" in headers:
        drop |= _connection_tokens(headers)
    return tuple((k, v) for k, v in headers.items() if k.lower() not in drop)


_DROP_TO_CLIENT = HOP_BY_HOP | _DROP_RESPONSE


def client_response_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Upstream response headers (as received, in order) that may go to the client."""
    kept: list[tuple[str, str]] = []
    named: list[str] = []  # the Connection header's values
    for k, v in headers:
        lower = k.lower()
        if lower not in _DROP_TO_CLIENT:
            kept.append((k, v))
        elif lower == "connection":
            named.append(v)
    if named:  # the headers its Connection header names are hop-by-hop too
        extra = _tokens(named)
        kept = [(k, v) for k, v in kept if k.lower() not in extra]
    return kept


class RelayedResponse(web.StreamResponse):
    """A relayed answer whose head goes out in the same write as its first body bytes.

    The relay prepares the response only once it holds the answer's first bytes and
    writes them at once, so holding the head back until then delays nothing; it saves
    one socket write per answer (``strace -c``: 4.1 writes per request before, 3.0 after;
    aiohttp's own ``web.Response`` holds its head back the same way, through this class
    attribute).
    """

    _send_headers_immediately = False


def _fits_write_buffer(request: web.Request, size: int) -> bool:
    """Would `size` more bytes (and a response head) stay within the client transport's
    write buffer, so that writing them cannot pause on a client that does not read?"""
    transport = request.transport
    if transport is None or transport.is_closing():
        return False
    try:
        high = transport.get_write_buffer_limits()[1]
    except (AttributeError, NotImplementedError):
        return False
    return transport.get_write_buffer_size() + size + _HEAD_ALLOWANCE <= high


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (delta-seconds or an HTTP date) in seconds; None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class UpstreamFailure(Exception):
    """An attempt failed before its answer was committed to the client: fail over."""

    def __init__(self, replica: Replica, kind: str, message: str, *, status: int | None = None,
                 body: bytes | None = None, headers: CIMultiDict[str] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.replica = replica
        self.kind = kind
        self.message = message
        self.status = status
        self.body = body
        self.headers = headers
        self.retry_after = retry_after


class NoReplicaLeft(Exception):
    """Every replica of the ranking became unroutable during failover."""


class _Slot:
    """An attempt's slot of the upstream pool, until the request takes it to the pool.

    Taken before the attempt is dispatched; `Proxy._head` marks it handed over as it sends.
    An attempt that ends before that (its dispatch failed, or a hedge leg cancelled before
    its task ever ran: no code of it runs then) gives it back through `release`, once."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = True

    def release(self, pool: UpstreamPool) -> None:
        if self.held:
            self.held = False
            pool.release_slot()


class _Leg:
    """One attempt of a hedged request: its wait for the answer runs as a task, so that two
    can race (router/transport/proxy.py, `Proxy._race`)."""

    __slots__ = ("attempt", "wait", "slot", "task", "outcome", "answer", "finished", "ended")

    def __init__(self, attempt: Attempt, wait: Wait, slot: _Slot) -> None:
        self.attempt = attempt
        self.wait = wait
        self.slot = slot
        self.task: asyncio.Task[tuple[UpstreamResponse, bytes, bool, bool]]
        self.outcome = ABANDONED
        self.answer: tuple[UpstreamResponse, bytes, bool, bool] | None = None  # the winner's
        self.finished = False  # its answer was relayed to the end
        self.ended = False  # its hooks heard on_complete: nothing more is said of it


def _retrieved(task: asyncio.Task[tuple[UpstreamResponse, bytes, bool, bool]]) -> None:
    """A leg's failure is read by the race, or was superseded: never "never retrieved"."""
    if not task.cancelled():
        task.exception()


class _StopWhen(stop_base):
    """A tenacity stop condition from a plain predicate (the retry budget's)."""

    def __init__(self, predicate: Callable[[RetryCallState], bool]) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return bool(self.predicate(retry_state))


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


class Proxy:
    """Forwards RouteRequests to replicas; one per app."""

    def __init__(self, *, upstream: UpstreamPool, feedback_to: Callable[[], Profile], index: PrefixIndex,
                 config: ProxyConfig, telemetry: Telemetry, monitor: Monitor | None = None,
                 request_id_header: str = "X-Request-Id",
                 breaker_config: CircuitBreakerConfig | None = None,
                 loop_lag: LoopLag | None = None, exact: ExactIndex | None = None,
                 fleet: Fleet | None = None) -> None:
        self.upstream = upstream  # the client's requests (router/transport/upstream.py)
        self.profile = feedback_to  # the routing profile's getter (a reload may swap it)
        self.loop_lag = loop_lag
        self.index = index
        self.config = config
        self.telemetry = telemetry
        self.request_id_header = request_id_header
        # Waits are the router's own (router/transport/waits.py); the connect's is a ConnectWatch.
        self.waits = Waits(config.unhealthy_grace)
        self.breakers = CircuitBreakers(breaker_config or CircuitBreakerConfig(),
                                        on_change=telemetry.set_breaker)
        self.breakers.on_trial_end = self._trial_ended
        self._verdict: asyncio.Event | None = None  # set at the next trial's end, while awaited
        # Replicas far slower than their peers are ejected through their breakers.
        self.outliers = LatencyOutliers(
            self.breakers, fleet.for_model if fleet is not None else None,
            on_eject=lambda rid, reason: telemetry.outlier_ejections.labels(rid, reason).inc())
        self.retry_budget = RetryBudget(config.retry_budget_ratio, config.retry_budget_min_per_s)
        # What an attempt means beyond transport (router/transport/hooks.py), in this order.
        self.hooks = Hooks([InFlight(), BreakerFeedback(self.breakers), IndexFeedback(index, exact),
                            AdapterFeedback(), SuspectMarking(monitor), PolicyFeedback(feedback_to, telemetry),
                            LatencyFeedback(self.outliers), PredictionAccuracy(telemetry, exact)])
        self._hedge_paths = self._hedge_paths_of(config)
        # Per-request bookkeeping (drain, introspection): entries removed in `finally`.
        self.active: dict[int, RequestRecord] = {}
        self._ids = itertools.count()
        self._idle = asyncio.Event()
        self._idle.set()

    def apply_config(self, config: ProxyConfig, breakers: CircuitBreakerConfig) -> None:
        """A reload's new timeouts, attempts and breaker settings, for the next attempts."""
        if (config.retry_budget_ratio, config.retry_budget_min_per_s) != (
                self.config.retry_budget_ratio, self.config.retry_budget_min_per_s):
            self.retry_budget = RetryBudget(config.retry_budget_ratio, config.retry_budget_min_per_s)
        self.waits.unhealthy_grace = config.unhealthy_grace
        self.config = config
        self._hedge_paths = self._hedge_paths_of(config)
        self.breakers.config = breakers

    @staticmethod
    def _hedge_paths_of(config: ProxyConfig) -> frozenset[str]:
        """The paths whose requests may be hedged (none when hedging is off, or when a request
        has no second attempt to spend)."""
        hedge = config.hedge
        return frozenset(hedge.paths) if hedge.enabled and config.max_attempts >= 2 else frozenset()

    def forget_replica(self, replica_id: str) -> None:
        """The replica left the fleet: what the latency detector learned of it goes too."""
        self.outliers.forget_replica(replica_id)

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
        except TimeoutError:
            return not self.active

    async def cut_and_wait(self, timeout: float = 5.0) -> bool:
        """The drain ran out: end every wait now (streams get their error event), then wait."""
        self.waits.cut_all()
        return await self.wait_idle(timeout)

    def on_health(self, replica: Replica, old: Health, new: Health) -> None:
        """Monitor listener: waits on a replica that turned UNHEALTHY are cut short."""
        if new is Health.UNHEALTHY:
            self.waits.cut_replica(replica)

    # -- candidates and ranking ---------------------------------------------------------
    def admissible(self, replica: Replica) -> bool:
        return replica.routable and self.breakers.allows(replica.id, replica.breaker)

    async def admissible_or_wait(self, candidates: Sequence[Replica],
                                 record: RequestRecord) -> list[Replica]:
        """The candidates a request may be sent to now; when there is none only because
        half-open replicas have their one trial in flight, wait for a trial's verdict (or an
        ejection's end) rather than refuse the request, up to ``proxy.deadline`` after it
        arrived.  An empty list: every candidate is ejected (the caller's 503)."""
        while True:
            usable = [r for r in candidates if self.admissible(r)]
            if usable:
                return usable
            on_trial = self.breakers.on_trial
            if not any(r.routable and on_trial(r.breaker) for r in candidates):
                return usable
            left = self.config.deadline - record.elapsed()
            reopen = [self.breakers.retry_in(r.breaker) for r in candidates
                      if r.routable and r.breaker.state is BreakerState.OPEN]
            wait = min([left, *reopen])
            if left <= 0:
                return usable
            if self._verdict is None:
                self._verdict = asyncio.Event()
            try:
                await asyncio.wait_for(self._verdict.wait(), timeout=max(wait, 0.001))
            except TimeoutError:
                pass

    def _trial_ended(self) -> None:
        verdict, self._verdict = self._verdict, None
        if verdict is not None:
            verdict.set()

    def ejected_error(self, model: str, replicas: Sequence[Replica]) -> RouterError:
        """503 for a model whose routable replicas are all ejected by their breakers."""
        wait = min((self.breakers.retry_in(r.breaker) for r in replicas), default=0.0)
        seconds = max(1, int(wait + 0.999))
        return RouterError(503, f"Every replica of model `{model}` is out of rotation after "
                                f"failing requests; retry in {seconds}s",
                           headers={"Retry-After": str(seconds)})

    # -- forwarding -------------------------------------------------------------------
    async def forward(self, request: web.Request, route: RouteRequest, decision: Decision,
                      record: RequestRecord, *, relay: bool = True,
                      hedge: bool = True) -> web.StreamResponse:
        """Attempts down `decision.ranked` (not empty; a flow ranked it, router/transport/flows.py).

        ``relay=False`` (a flow's inner hop, e.g. a prefill): the answer must be whole and
        is returned as a ``web.Response`` for the flow to read; nothing reaches the client.
        ``hedge=False``: never a hedge (a hop of a disaggregated request); otherwise the
        first attempt is hedged when ``proxy.hedge`` says so (see the module docstring)."""
        cfg = self.config
        self.retry_budget.on_request()
        tried: list[Replica] = []
        last: UpstreamFailure | None = None
        stopped: list[str] = []

        def budget_stop(state: RetryCallState) -> bool:
            if self.retry_budget.try_spend():
                return False
            stopped.append("budget")
            self.telemetry.retry_budget_exhausted.labels(route.model).inc()
            return True

        # The first attempt runs without tenacity (most requests need no other, and building
        # the retry machinery costs more CPU than the rest of the attempt's bookkeeping); when
        # it fails, tenacity's first iteration re-raises that failure, so its attempt numbers,
        # waits and stops are what they would have been.
        try:
            replica = self._pick(decision.ranked, tried)
            tried.append(replica)
            record.attempts = 1
            record.replica = replica.id
            if (route.path not in self._hedge_paths or not relay or not hedge
                    or self._hedge_target(decision.ranked, tried) is None):
                return await self._attempt(request, route, replica, 1, decision, record, relay)
            return await self._race(request, route, decision, record, tried)
        except UpstreamFailure as failure:
            last = failure
        except NoReplicaLeft:
            return self._give_up(route, record, last, tried, ["none_left"])
        first_failure: UpstreamFailure | None = last
        hedged = len(tried) - 1  # a hedge was one of the attempts (and numbered 2)
        remaining = max(0.0, cfg.deadline - record.elapsed())  # tenacity's clock starts now
        retrying = AsyncRetrying(
            stop=stop_any(stop_after_attempt(max(1, cfg.max_attempts - hedged)),
                          stop_after_delay(remaining), _StopWhen(budget_stop)),
            wait=wait_random_exponential(multiplier=cfg.backoff_initial, max=cfg.backoff_max),
            retry=retry_if_exception_type(UpstreamFailure),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    number = attempt.retry_state.attempt_number
                    if number == 1 and first_failure is not None:
                        replayed, first_failure = first_failure, None
                        raise replayed  # the fast path's attempt, replayed for tenacity
                    number += hedged
                    replica = self._pick(decision.ranked, tried)
                    if number > 1:
                        self.telemetry.retries.labels(route.model).inc()
                        if tried and tried[-1] is not replica:
                            self.telemetry.failovers.labels(route.model, tried[-1].id).inc()
                    tried.append(replica)
                    record.attempts = number
                    record.replica = replica.id
                    try:
                        return await self._attempt(request, route, replica, number, decision,
                                                   record, relay)
                    except UpstreamFailure as failure:
                        last = failure
                        raise
        except UpstreamFailure:
            pass  # `last` holds it
        except NoReplicaLeft:
            stopped.append("none_left")
        return self._give_up(route, record, last, tried, stopped)

    def _hedge_target(self, ranked: Sequence[Replica], tried: Sequence[Replica]) -> Replica | None:
        """The best admissible replica not tried yet (a hedge goes nowhere else)."""
        for replica in ranked:
            if replica not in tried and self.admissible(replica):
                return replica
        return None

    def _pick(self, ranked: Sequence[Replica], tried: Sequence[Replica]) -> Replica:
        """The best admissible replica not tried yet; else cycle through the admissible ones."""
        usable = [r for r in ranked if self.admissible(r)]
        if not usable:
            raise NoReplicaLeft()
        for replica in usable:
            if replica not in tried:
                return replica
        return usable[len(tried) % len(usable)]

    def unavailable(self, model: str, detail: str = "") -> RouterError:
        retry_after = str(self.config.retry_after)
        message = f"No healthy replica is available for model `{model}`"
        return RouterError(503, message + (f": {detail}" if detail else ""),
                           headers={"Retry-After": retry_after})

    def _give_up(self, route: RouteRequest, record: RequestRecord,
                 last: UpstreamFailure | None, tried: Sequence[Replica],
                 stopped: Sequence[str]) -> web.StreamResponse:
        attempts = len(tried)
        if "budget" in stopped:
            why = "; no retry: the retry budget is spent (most requests are failing)"
        elif "none_left" in stopped:
            why = "; no other replica was left to try"
        elif attempts < self.config.max_attempts and last is not None:
            why = f"; the {self.config.deadline:g}s deadline for new attempts passed"
        else:
            why = ""
        if last is not None and last.status is not None:
            # The replicas answered, with errors: pass the last answer on (vLLM's shape).
            record.error = f"upstream {last.status} after {attempts} attempt(s){why}"
            headers = last.headers or CIMultiDict()
            if last.status in (429, 503) and "Retry-After" not in headers:
                headers["Retry-After"] = str(self.config.retry_after)
            return web.Response(status=last.status, body=last.body or error_body(
                last.status, last.message), headers=headers)
        if last is None:
            record.error = "no routable replica" + why
            raise self.unavailable(route.model)
        record.error = f"{last.kind}: {last.message} after {attempts} attempt(s){why}"
        status = 504 if last.kind in _TIMEOUT_KINDS else 502
        raise RouterError(status, f"No replica of model `{route.model}` answered: "
                                  f"{attempts} attempt(s), the last replica "
                                  f"{KIND_TEXT.get(last.kind, last.kind)}{why}",
                          headers={"Retry-After": str(self.config.retry_after)})

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

    def _fail(self, route: RouteRequest, replica: Replica, kind: str, message: str,
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
            return self._fail(route, replica, "unhealthy",
                              "the replica turned unhealthy before answering")
        kind = "first_byte_timeout" if route.stream else "read_timeout"
        return self._fail(route, replica, kind, f"no answer within {seconds:g}s")

    async def _slot(self, route: RouteRequest, record: RequestRecord) -> None:
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

    async def _attempt(self, request: web.Request, route: RouteRequest, replica: Replica,
                       number: int, decision: Decision, record: RequestRecord,
                       relay: bool = True) -> web.StreamResponse:
        if not self.upstream.take_slot_now():  # (every connection in use: wait, bounded)
            await self._slot(route, record)
        # The slot is this attempt's until `_head` hands it to the pool; it is given back
        # if the attempt ends before that (nothing between here and there waits).
        slot = _Slot()
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
                resp, first, complete, streaming = await self._head(route, replica, number, wait, relay,
                                                                     slot)
            except UpstreamFailure as failure:
                outcome = FAILURE
                self.hooks.failure(attempt, failure)
                raise
            outcome = SUCCESS
            out = await self._deliver(request, attempt, resp, first, complete, streaming, wait)
            finished = True
            return out
        finally:
            slot.release(self.upstream)
            self._finish(attempt, wait, outcome, resp, finished)

    def _finish(self, attempt: Attempt, wait: Wait, outcome: str, resp: UpstreamResponse | None,
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

    async def _head(self, route: RouteRequest, replica: Replica, number: int, wait: Wait,
                    relay: bool, slot: _Slot) -> tuple[UpstreamResponse, bytes, bool, bool]:
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
                        except _UPSTREAM_ERRORS:
                            body = b""
                        kind = "status_429" if resp.status == 429 else "status_5xx"
                        raise self._fail(route, replica, kind, f"replica answered {resp.status}",
                                         status=resp.status, body=body,
                                         headers=CIMultiDict(client_response_headers(resp.raw_headers)),
                                         retry_after=retry_after_seconds(
                                             resp.headers.get("Retry-After")))
                    streaming = route.stream and resp.status == 200 and \
                        resp.content_type == "text/event-stream"
                    if streaming:
                        first = await self._stream_head(resp)
                        if sse_verdict(first) is not True:
                            # Not yet committed: a broken replica's 200 must not become the
                            # client's 200 (its SDK would fail on the first line).
                            raise self._fail(route, replica, "bad_stream",
                                             "a 200 text/event-stream answer that is not SSE: "
                                             f"{first[:64]!r}")
                        if route.path in FIRST_TOKEN_PATHS and route.method == "POST":
                            first = await self._until_first_token(resp, first)
                    else:
                        first, complete = await self._buffer(resp, timeout, wait)
            except UpstreamConnectError as exc:
                raise self._fail(route, replica, "connect", str(exc) or type(exc).__name__) from None
            except TimeoutError:
                if watch.expired:
                    raise self._fail(route, replica, "connect_timeout",
                                     f"no connection within {cfg.connect_timeout:g}s") from None
                raise self._timed_out(route, replica, wait, first_limit) from None
            except _UPSTREAM_ERRORS as exc:
                raise self._fail(route, replica, "disconnect", str(exc) or type(exc).__name__) from None
            finally:
                wait.timeout = None

            if not relay and (streaming or not complete):
                raise self._fail(route, replica, "oversized", "an inner hop's answer must be whole "
                                 f"and at most proxy.buffer_bytes ({cfg.buffer_bytes})")
            return resp, first, complete, streaming
        except BaseException:
            if resp is not None:
                resp.close()  # unfinished: drop the connection so vLLM aborts the request
            raise

    async def _deliver(self, request: web.Request, attempt: Attempt, resp: UpstreamResponse,
                       first: bytes, complete: bool, streaming: bool,
                       wait: Wait) -> web.StreamResponse:
        """The answer is committed: its first byte's hooks, then the relay."""
        record, route, replica = attempt.record, attempt.route, attempt.replica
        record.ttfb = record.elapsed()
        self.hooks.first_byte(attempt, resp.status)
        if streaming:
            return await self._relay_stream(request, route, replica, resp, first, wait, record)
        return await self._relay_whole(request, route, replica, resp, first, complete, wait, record)

    # -- hedging ------------------------------------------------------------------------
    def hedge_delay(self, replica: Replica, route: RouteRequest, decision: Decision) -> float:
        """How long the first attempt on `replica` waits for its first byte before a hedge:
        ``multiplier`` x the time to first byte expected of it, within [``min_delay``,
        ``max_delay``].  Expected: what the latency detector learned of this request shape
        on it and its peers (router/transport/outliers.py); before that, for a stream, its prefill
        time, the prompts pending ahead of it included, at the profile's learned prefill
        rate (router/core/scheduling/producers.py); otherwise ``max_delay``.  (Called with the
        attempt sent: the replica's pending tokens include its own.)"""
        hedge = self.config.hedge
        own = uncached_tokens(replica, route, decision)
        ahead = max(0, replica.pending_prefill_tokens - own)
        expected = self.outliers.expected(replica, route, decision, tokens_ahead=ahead)
        if expected is None and route.stream:
            rate = self.profile().prefill_rate(replica)
            if rate:
                expected = max(1, own + ahead) / rate
        if expected is None:
            return hedge.max_delay
        return min(hedge.max_delay, max(hedge.min_delay, hedge.multiplier * expected))

    async def _race(self, request: web.Request, route: RouteRequest, decision: Decision,
                    record: RequestRecord, tried: list[Replica]) -> web.StreamResponse:
        """The first attempt (on ``tried[0]``), hedged: after `hedge_delay` without its first
        byte, a second attempt on the best admissible replica not tried yet; the first to
        answer is relayed, the other cancelled.  Raises the last UpstreamFailure when neither
        answered (the caller fails over as after any first attempt)."""
        model = route.model
        if not self.upstream.take_slot_now():  # (every connection in use: wait, bounded)
            await self._slot(route, record)
        legs = [self._launch(route, tried[0], 1, decision, record)]
        winner: _Leg | None = None
        try:
            delay = self.hedge_delay(tried[0], route, decision)
            done, _ = await asyncio.wait((legs[0].task,), timeout=delay)
            if not done:
                target = self._hedge_target(decision.ranked, tried)
                if target is None:
                    self.telemetry.hedges.labels(model, "skipped_no_replica").inc()
                elif not self.upstream.take_slot_now():  # a hedge never waits for a connection
                    self.telemetry.hedges.labels(model, "skipped_pool").inc()
                elif not self.retry_budget.try_spend():
                    self.upstream.release_slot()
                    self.telemetry.hedges.labels(model, "skipped_budget").inc()
                else:
                    log.info("request %s: no first byte from replica %s after %.3fs: hedged on %s",
                             route.request_id, tried[0].id, delay, target.id)
                    tried.append(target)
                    record.attempts = 2
                    legs.append(self._launch(route, target, 2, decision, record))
            try:
                winner = await self._first_answer(legs)
            except UpstreamFailure:
                if len(legs) > 1:
                    self.telemetry.hedges.labels(model, "failed").inc()
                raise
            if len(legs) > 1:
                self.telemetry.hedges.labels(model, "won" if winner is legs[1] else "lost").inc()
            record.replica = winner.attempt.replica.id
            assert winner.answer is not None
            resp, first, complete, streaming = winner.answer
            winner.outcome = SUCCESS
            out = await self._deliver(request, winner.attempt, resp, first, complete, streaming,
                                      winner.wait)
            winner.finished = True
            return out
        finally:
            for leg in legs:
                self._end_leg(leg, winner)

    def _launch(self, route: RouteRequest, replica: Replica, number: int, decision: Decision,
                record: RequestRecord) -> _Leg:
        """Dispatch one attempt of a hedged request (its pool slot taken), its wait for the
        answer a task."""
        attempt = Attempt(route, replica, decision, record, number)
        slot = _Slot()
        try:
            self.hooks.dispatch(attempt)
        except BaseException:
            slot.release(self.upstream)
            raise
        leg = _Leg(attempt, self.waits.open(replica), slot)
        leg.task = asyncio.get_running_loop().create_task(self._leg_head(leg))
        leg.task.add_done_callback(_retrieved)
        return leg

    async def _leg_head(self, leg: _Leg) -> tuple[UpstreamResponse, bytes, bool, bool]:
        attempt = leg.attempt
        try:
            return await self._head(attempt.route, attempt.replica, attempt.number, leg.wait, True,
                                    leg.slot)
        except UpstreamFailure as failure:
            if not leg.ended:
                leg.outcome = FAILURE
                self.hooks.failure(attempt, failure)
            raise

    @staticmethod
    async def _first_answer(legs: list[_Leg]) -> _Leg:
        """The first leg to have its answer; the last failure if none does."""
        pending = {leg.task for leg in legs}
        failure: BaseException | None = None
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for leg in legs:
                if leg.task not in done:
                    continue
                error = leg.task.exception()
                if error is None:
                    leg.answer = leg.task.result()
                    return leg
                if not isinstance(error, UpstreamFailure):
                    raise error  # the drain's 503, or a bug
                failure = error
        assert failure is not None
        raise failure

    def _end_leg(self, leg: _Leg, winner: _Leg | None) -> None:
        """A leg's end: the winner's like any attempt's; a loser's task cancelled (its
        connection dropped: vLLM aborts it) and its hooks told it was superseded."""
        task = leg.task
        if leg is not winner:
            if task.done():
                if not task.cancelled() and task.exception() is None:
                    task.result()[0].close()  # it answered too, but second
            else:
                task.cancel()
            leg.attempt.superseded = winner is not None
        leg.ended = True
        leg.slot.release(self.upstream)  # (a leg cancelled before it sent anything)
        self._finish(leg.attempt, leg.wait, leg.outcome,
                     leg.answer[0] if leg.answer is not None else None, leg.finished)

    async def _until_first_token(self, resp: UpstreamResponse, head: bytes) -> bytes:
        """A Responses or Messages stream's head up to its first token's event.

        vLLM sends these APIs' opening events (``response.created``, ``message_start``...)
        before the prompt's prefill, so their first bytes say nothing of the time to first
        token, which is what the answer's commit stands for: the scheduler learns prefill
        rates from it, the latency detector and hedging compare it, and failover is still
        possible while it has not come.  So the answer is committed at the first ``*delta``
        event (or an error, or its end), at most ``_TOKEN_HEAD_MAX`` bytes in, its opening
        events sent with it; the first-byte timeout bounds the wait."""
        content = resp.content
        while not _FIRST_TOKEN_EVENT.search(head) and len(head) < _TOKEN_HEAD_MAX:
            more = await content.readany()
            if not more:
                break
            head += more
        return head

    async def _stream_head(self, resp: UpstreamResponse) -> bytes:
        """A stream's first bytes: its first read, and more only while `sse_verdict` cannot
        tell yet (at most ``_SSE_HEAD_MAX`` bytes; b"" when it ended with none)."""
        content = resp.content
        head = await content.readany()
        while head and sse_verdict(head) is None and len(head) < _SSE_HEAD_MAX:
            more = await content.readany()
            if not more:
                break
            head += more
        return head

    async def _buffer(self, resp: UpstreamResponse, timeout: asyncio.Timeout,
                      wait: Wait) -> tuple[bytes, bool]:
        """Read a whole answer up to ``buffer_bytes``: (bytes, complete?)."""
        limit = self.config.buffer_bytes
        loop = asyncio.get_running_loop()
        parts: list[bytes] = []
        size = 0
        content = resp.content
        while True:
            chunk = await content.readany()
            if not chunk:
                if not content.is_eof():
                    raise UpstreamDisconnected("the answer ended early")
                return b"".join(parts), True
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                return b"".join(parts), False
            timeout.reschedule(loop.time() + wait.limit(self.config.read_timeout))

    def _cut_reason(self, wait: Wait, exc: BaseException | None) -> tuple[str, str]:
        """(log detail, client message) for a relay that stopped early."""
        reason = wait.why() if isinstance(exc, TimeoutError) else None
        if reason == DRAIN:
            return ("router drain timeout",
                    "The router shut down mid-stream, before the answer was complete")
        if reason == UNHEALTHY:
            return ("replica unhealthy and silent",
                    "The replica serving this request became unhealthy and went silent mid-stream")
        if isinstance(exc, TimeoutError):
            return (f"no data for {self.config.read_timeout:g}s",
                    f"The replica went silent mid-stream for {self.config.read_timeout:g}s")
        detail = (str(exc) or type(exc).__name__) if exc is not None else "stream ended early"
        return detail, "The replica serving this request failed mid-stream (its connection broke)"

    async def _relay_whole(self, request: web.Request, route: RouteRequest, replica: Replica,
                           resp: UpstreamResponse, head: bytes, complete: bool,
                           wait: Wait, record: RequestRecord) -> web.StreamResponse:
        headers = client_response_headers(resp.raw_headers)
        if complete:
            if resp.status == 200:
                record.cached_tokens = cached_tokens_of(head)
            return web.Response(status=resp.status, body=head, headers=headers)
        # Too large to buffer: relay it as it comes (the status is committed now).
        out = RelayedResponse(status=resp.status, headers=headers)
        if resp.content_length is not None:
            out.content_length = resp.content_length
        out.headers[self.request_id_header] = route.request_id
        problem, _ = await self._pump(request, out, resp, head, wait, record)
        if problem is not None:
            detail, _ = problem
            self.telemetry.upstream_errors.labels(route.model, replica.id, "stream_cut").inc()
            record.error = f"replica answer cut: {detail}"
            log.warning("request %s: replica %s failed mid-answer: %s", route.request_id,
                        replica.id, detail)
            if request.transport is not None:
                request.transport.close()  # the client sees a truncated body, not a short one
            return out
        if not record.client_gone:
            await out.write_eof()
        return out

    async def _relay_stream(self, request: web.Request, route: RouteRequest, replica: Replica,
                            resp: UpstreamResponse, first: bytes, wait: Wait,
                            record: RequestRecord) -> web.StreamResponse:
        out = RelayedResponse(status=resp.status, headers=client_response_headers(resp.raw_headers))
        out.headers[self.request_id_header] = route.request_id
        problem, tail = await self._pump(request, out, resp, first, wait, record)
        if record.client_gone:
            return out
        try:
            if problem is not None:
                detail, message = problem
                self.telemetry.upstream_errors.labels(route.model, replica.id, "stream_cut").inc()
                record.error = f"replica stream cut: {detail}"
                log.warning("request %s: replica %s failed mid-stream: %s",
                            route.request_id, replica.id, detail)
                prefix = b"" if tail.endswith(b"\n\n") or not tail else (
                    b"\n" if tail.endswith(b"\n") else b"\n\n")
                await out.write(prefix + sse_error_event(502, message))
            await out.write_eof()
        except ConnectionResetError:  # incl. aiohttp.ClientConnectionResetError
            record.client_gone = True  # the caller's `finally` closes the upstream connection
        return out

    async def _pump(self, request: web.Request, out: web.StreamResponse,
                    resp: UpstreamResponse, first: bytes, wait: Wait,
                    record: RequestRecord) -> tuple[tuple[str, str] | None, bytes]:
        """Copy the answer to the client.

        Returns (None when the replica finished it, else why not; the last two chunks
        written, so that a cut stream's error event starts on an event boundary).  A whole
        answer's ``cached_tokens`` (its usage, the last event) goes to the record.  A
        client that went away sets ``record.client_gone``.
        """
        content = resp.content
        read_timeout = self.config.read_timeout
        chunk = first
        previous = last = b""  # the last two chunks written: the tail of the answer
        loop = asyncio.get_running_loop()
        try:
            await out.prepare(request)
            if content.is_eof() and _fits_write_buffer(request, len(first)):
                # The whole answer came in its first read and fits the client's write buffer:
                # written with the end of the body, it cannot wait on the client, so it
                # needs no timer (a short answer from a fast replica: the common case).
                await out.write_eof(first)
                record.cached_tokens = cached_tokens_of(first)
                return None, first
            # One timeout for the whole relay, its deadline moved before each chunk (a new
            # timeout per chunk cost more than the chunk); moved only when that gains more than
            # `slack`, so a stream may be cut that much before its full silence allowance.
            async with asyncio.timeout(wait.limit(read_timeout)) as timeout:
                wait.timeout = timeout
                while chunk:
                    limit = wait.limit(read_timeout)
                    deadline = loop.time() + limit
                    when = timeout.when()
                    if when is None or deadline - when > min(_RESCHEDULE_SLACK_S, limit * 0.05):
                        timeout.reschedule(deadline)
                    previous, last = last, chunk
                    if content.is_eof():  # the answer's last bytes: one write with the end
                        await out.write_eof(chunk)
                        break
                    await out.write(chunk)
                    chunk = await content.readany()
            wait.timeout = None
        except ConnectionResetError:  # incl. aiohttp.ClientConnectionResetError
            record.client_gone = True
            return None, previous + last
        except (TimeoutError, *_UPSTREAM_ERRORS) as exc:
            wait.timeout = None
            return self._cut_reason(wait, exc), previous + last
        if not content.is_eof():
            return self._cut_reason(wait, None), previous + last
        record.cached_tokens = cached_tokens_of(previous + last)  # the usage chunk comes last
        return None, previous + last
