"""The relay: a committed answer goes to the client as the replica sent it.

The replica's headers go to the client but for hop-by-hop ones and a denylist
(``_DROP_RESPONSE``: what names the replica's software or host, Set-Cookie,
WWW-Authenticate).  A stream (``"stream": true`` answered with SSE) is written to the client chunk
by chunk as it arrives, never re-encoded; if the replica fails, stalls past
``read_timeout`` (or the grace once it is unhealthy) or the drain runs out, the stream
ends with ``data: {"error": ...}`` and ``data: [DONE]``.  A non-stream answer is
buffered up to ``proxy.buffer_bytes`` (so a replica that dies mid-answer is still a
failover), and a larger one is relayed as it arrives (a cut then closes the client's
connection, which sees a truncated body rather than a wrong one).

Before the commit, `stream_head` and `sse_verdict` tell a real event stream from a
mislabelled body, and `until_first_token` holds a Responses or Messages stream until its
first token (router/transport/attempts.py reads them; they fail over).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

from aiohttp import web

from router.config import ProxyConfig
from router.errors import sse_error_event
from router.fleet.replicas import Replica
from router.observability.access_log import RequestRecord
from router.observability.telemetry import Telemetry
from router.transport.failures import UPSTREAM_ERRORS
from router.transport.headers import client_response_headers
from router.transport.upstream_connection import UpstreamDisconnected, UpstreamResponse
from router.transport.usage import cached_tokens_of
from router.transport.waits import DRAIN, UNHEALTHY, Wait

if TYPE_CHECKING:
    from router.core.requests import RouteRequest

log = logging.getLogger("router.proxy")  # one logger for the whole forwarding path


_RESCHEDULE_SLACK_S = 1.0  # a relay's read deadline is moved only when it gains more than this


_HEAD_ALLOWANCE = 8 * 1024  # bytes a response head may take in the client's write buffer


# Streams whose opening events come before the prompt's prefill: committed at the first
# token's event instead (Relay.until_first_token).
FIRST_TOKEN_PATHS = frozenset({"/v1/responses", "/v1/messages"})


_FIRST_TOKEN_EVENT = re.compile(rb"(?m)^event: *(?:[\w.]*delta|error|response\.(?:failed|incomplete|completed))\r?$")


_TOKEN_HEAD_MAX = 1 << 20


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


class Relay:
    """Relays committed answers to the client; one per proxy."""

    def __init__(self, config: ProxyConfig, telemetry: Telemetry, request_id_header: str) -> None:
        self.config = config
        self.telemetry = telemetry
        self.request_id_header = request_id_header

    async def until_first_token(self, resp: UpstreamResponse, head: bytes) -> bytes:
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

    async def stream_head(self, resp: UpstreamResponse) -> bytes:
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

    async def buffer(self, resp: UpstreamResponse, timeout: asyncio.Timeout,
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

    async def whole(self, request: web.Request | None, route: RouteRequest, replica: Replica,
                           resp: UpstreamResponse, head: bytes, complete: bool,
                           wait: Wait, record: RequestRecord) -> web.StreamResponse:
        headers = client_response_headers(resp.raw_headers)
        if complete:
            if resp.status == 200:
                record.cached_tokens = cached_tokens_of(head)
            return web.Response(status=resp.status, body=head, headers=headers)
        # Too large to buffer: relay it as it comes (the status is committed now).
        assert request is not None  # (an inner hop's answer is whole: see Attempts.head)
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

    async def stream(self, request: web.Request, route: RouteRequest, replica: Replica,
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
        except (TimeoutError, *UPSTREAM_ERRORS) as exc:
            wait.timeout = None
            return self._cut_reason(wait, exc), previous + last
        if not content.is_eof():
            return self._cut_reason(wait, None), previous + last
        record.cached_tokens = cached_tokens_of(previous + last)  # the usage chunk comes last
        return None, previous + last
