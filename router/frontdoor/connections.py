"""Client connections: a cap, a deadline for every request head, and JSON parse errors.

aiohttp's server protects a connection only with its keep-alive timer, so a client that
sends a request line and then one header byte a minute (slowloris) holds a socket, and
a few thousand idle sockets exhaust the process's file descriptors: a silent outage for
everyone.  The protocol here (a subclass of aiohttp's ``RequestHandler``) adds:

* **A connection cap** (``server.max_connections``; by default half the file-descriptor
  limit, since each client connection may hold one upstream connection).  A connection
  beyond it gets ``503`` with ``Retry-After`` and ``Connection: close`` in the OpenAI JSON
  shape and is closed: a clear answer, never a reset or a hang.
* **A header deadline** (``server.header_timeout``): from a connection's start, and from
  the first byte of each later request on a kept-alive connection, the request line and
  headers must be complete within it; otherwise ``408`` and close.  The body has its own
  deadline (``server.body_timeout``, router.limits), idle keep-alive connections theirs
  (``server.keepalive_timeout``, aiohttp's).
* **Parse errors in the OpenAI shape**: aiohttp answers a malformed request with
  text/plain and logs an ERROR with a traceback for each; here it is JSON and one
  warning line.

`raise_fd_limit()` lifts the soft RLIMIT_NOFILE to the hard one at start (logged), so the
cap is set from what the process can really hold.

The protocol reads private attributes of aiohttp's ``RequestHandler`` (``_waiter``,
``_messages``, ``_request_in_progress``, ``_force_close``) and ``Server._kwargs``; the
tests in tests/reliability/test_front_door.py fail if a newer aiohttp changes them.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from router.errors import error_body
from router.http_errors import error_response

log = logging.getLogger("router.connections")

_FD_RESERVE = 256  # descriptors kept for upstream pools, probes, logs, the listening socket
_MAX_FD_SOFT = 1 << 20


def raise_fd_limit() -> int:
    """Raise the soft file-descriptor limit to the hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _MAX_FD_SOFT
    target = min(target, _MAX_FD_SOFT)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("file-descriptor limit raised from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the file-descriptor limit from %d: %s", soft, exc)
    return soft


def default_connection_cap(fd_limit: int) -> int:
    """Client connections that fit in `fd_limit` descriptors (one upstream each)."""
    return max(64, (fd_limit - _FD_RESERVE) // 2)


def _raw_error(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = error_body(status, message)
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


class ConnectionLimits:
    """The limits every client connection of one server shares, and its counts."""

    def __init__(self, max_connections: int, header_timeout: float,
                 on_refused: Callable[[], None] | None = None,
                 on_head_timeout: Callable[[], None] | None = None) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.open = 0
        self.refused = 0  # connections answered 503 for being over the cap
        self.head_timeouts = 0  # connections closed with 408 for a slow request head
        self.on_refused = on_refused  # e.g. a metric's inc
        self.on_head_timeout = on_head_timeout


class FrontDoorProtocol(RequestHandler):
    """aiohttp's request handler with a connection cap, a header deadline, JSON errors."""

    __slots__ = ("_limits", "_head_timer", "_counted")

    def __init__(self, manager: web.Server, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        limits = self._limits
        if limits.open >= limits.max_connections:
            limits.refused += 1
            if limits.on_refused is not None:
                limits.on_refused()
            # (uvloop's transport is no asyncio.Transport subclass, but it writes the same;
            # force_close below closes it once the answer is flushed, freeing the fd at once.)
            cast(asyncio.WriteTransport, transport).write(_raw_error(
                503, "Service Unavailable",
                f"The router is at its connection limit ({limits.max_connections}); retry shortly",
                "Retry-After: 1\r\n"))
            self.force_close()
            return
        limits.open += 1
        self._counted = True
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        if self._counted:
            self._counted = False
            self._limits.open -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        waiting_before = self._waiting_for_head()
        super().data_received(data)
        if self._waiting_for_head():
            if waiting_before and self._head_timer is None and data:
                self._arm_head_timer()  # the first byte of a kept-alive connection's next head
        else:
            self._cancel_head_timer()

    # -- the head deadline ----------------------------------------------------------
    def _waiting_for_head(self) -> bool:
        """Idle between requests, or with a head partly received."""
        waiter = self._waiter
        return waiter is None and not self._messages and not self._request_in_progress \
            or waiter is not None and not waiter.done()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self._loop.call_later(self._limits.header_timeout, self._head_late)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self._force_close or self.transport is None or not self._waiting_for_head():
            return
        self._limits.head_timeouts += 1
        if self._limits.on_head_timeout is not None:
            self._limits.on_head_timeout()
        self.transport.write(_raw_error(
            408, "Request Timeout",
            f"The request line and headers did not arrive within {self._limits.header_timeout:g}s"))
        self.force_close()

    # -- malformed requests -----------------------------------------------------------
    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            text = "Internal router error"
        else:
            # aiohttp's message spans lines (the bad bytes and a caret): one line, bounded,
            # so a client cannot forge or flood log lines.
            detail = " ".join((message or (exc.__class__.__name__ if exc else "bad request"))
                              .split())[:300]
            log.warning("malformed HTTP request from %s: %s", request.remote, detail)
            text = f"Malformed HTTP request: {detail}"
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        response = error_response(status, text)
        response.force_close()
        return response


class FrontDoorRunner(web.AppRunner):
    """An AppRunner whose connections are FrontDoorProtocols sharing `limits`."""

    def __init__(self, app: web.Application, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _FrontDoorServer
        server.limits = self.limits  # type: ignore[attr-defined]
        return server


class _FrontDoorServer(web.Server):
    """aiohttp's low-level server, making FrontDoorProtocols instead of RequestHandlers."""

    limits: ConnectionLimits

    def __call__(self) -> RequestHandler:
        return FrontDoorProtocol(self, loop=self._loop, limits=self.limits, **self._kwargs)
