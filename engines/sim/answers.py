"""The HTTP answers every endpoint of the simulator sends: JSON bodies, vLLM's OpenAI-shaped
errors, server-sent event streams, and the ``cut`` fault that drops a connection mid-answer.

One module for them so that the OpenAI endpoints (server.py, completions.py, ...) and the
agentic APIs (responses.py, anthropic.py) frame their answers the same way; it depends on
nothing else of the simulator but protocol.py's `ApiError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import orjson
from aiohttp import web

from engines.sim.protocol import ApiError


class Cut(Exception):
    """Fault injection dropped the connection; the server's middleware turns it into a
    cancellation."""


def cut(request: web.Request) -> NoReturn:
    """Fault injection: drop the connection without finishing the response."""
    if request.transport is not None:
        request.transport.abort()
    raise Cut()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body if isinstance(body, bytes) else orjson.dumps(body), status=status,
                        content_type="application/json", headers=headers)


def openai_error(exc: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    """vLLM's ``{"error": {message, type, param, code}}``."""
    return web.Response(body=exc.body(), status=exc.status, content_type="application/json", headers=headers)


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """A named server-sent event, as both agentic APIs frame them: ``event: NAME`` then ``data: JSON``."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class SSEWriter:
    """An event-stream answer with the simulator's cut fault (the connection drops after N events)."""

    def __init__(self, request: web.Request, cut_after: int | None) -> None:
        self.request = request
        self.cut_after = cut_after
        self.sent = 0
        self.resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})

    async def start(self) -> web.StreamResponse:
        await self.resp.prepare(self.request)
        return self.resp

    async def send(self, chunk: bytes) -> None:
        if self.cut_after is not None and self.sent >= self.cut_after:
            cut(self.request)
        await self.resp.write(chunk)
        self.sent += 1

    async def end(self) -> web.StreamResponse:
        await self.resp.write_eof()
        return self.resp


@web.middleware
async def not_found_json(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """FastAPI's JSON 404 and 405, and the end of a request whose connection is gone."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return json_response({"detail": "Not Found"}, status=404)
    except web.HTTPMethodNotAllowed:
        return json_response({"detail": "Method Not Allowed"}, status=405)
    except (Cut, ConnectionResetError):
        # The connection is gone (cut on purpose, or by the client); nothing left to answer.
        with contextlib.suppress(Exception):
            if request.transport is not None:
                request.transport.abort()
        raise asyncio.CancelledError() from None
