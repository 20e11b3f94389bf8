"""OpenAI/vLLM-shaped errors as aiohttp responses.

`error_answer` (called by the front door's middleware, router/frontdoor/api.py) turns a
`RouterError`, aiohttp's own HTTP errors (unknown path 404, wrong method 405, body too large
413) and anything unexpected (500, logged, never a traceback on the wire) into the body
router/errors.py defines.  Apart from that module so the core, which raises errors, imports
no aiohttp; here, below the front door and the transport, both of which answer errors.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

import orjson
from aiohttp import web

from router.errors import JSON_CONTENT_TYPE, RouterError, error_body

log = logging.getLogger("router.errors")


def response_of(error: RouterError) -> web.Response:
    """The answer to a `RouterError`: its status, headers and OpenAI-shaped body."""
    return web.Response(
        status=error.status,
        body=error_body(error.status, error.message, param=error.param, type=error.type),
        content_type=JSON_CONTENT_TYPE,
        headers=error.headers,
    )


def error_response(status: int, message: str, *, param: str | None = None,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    return response_of(RouterError(status, message, param=param, headers=headers))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The OpenAI-shaped answer to an exception out of a handler (a redirect, an HTTP
    exception below 400, is raised again: it is not an error)."""
    if isinstance(exc, RouterError):
        return response_of(exc)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:  # redirects and friends pass through untouched
            raise exc
        status = exc.status
        if status == 404:
            message = f"Not found: {request.method} {request.path}"
        elif status == 405:
            allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
            message = f"Method {request.method} is not allowed on {request.path}" + (
                f"; allowed: {allowed}" if allowed else "")
        elif status == 413:
            message = (f"Request body too large: the limit is "
                       f"{request.client_max_size} bytes")
        else:
            message = exc.text or HTTPStatus(status).phrase
            if message.startswith(f"{status}:"):
                message = message.split(":", 1)[1].strip()
        headers = {k: v for k, v in exc.headers.items()
                   if k.lower() in ("allow", "retry-after", "www-authenticate")}
        return error_response(status, message, headers=headers)
    # The last line of defence: logged with its traceback, never one on the wire.
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "Internal router error")


def error_message(body: bytes) -> str | None:
    """The message of an OpenAI-shaped error body (None if it is not one)."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else None
