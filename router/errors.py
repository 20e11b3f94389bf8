"""OpenAI/vLLM-shaped errors.

Every error the router itself produces has the body vLLM uses::

    {"error": {"message": "...", "type": "NotFoundError", "param": "model", "code": 404}}

so a client cannot tell a router-made 404 from a replica-made one.  `error_answer` (called
by the router's front-door middleware, router/frontdoor/api.py) turns aiohttp's own HTTP errors
(unknown path 404, wrong method 405, body too large 413) and anything unexpected (500,
logged, never a traceback on the wire) into that shape.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

log = logging.getLogger("router.errors")

# HTTP status -> the error `type` vLLM / the OpenAI client libraries use for it.
ERROR_TYPES: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    409: "ConflictError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}

JSON_CONTENT_TYPE = "application/json"


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "InternalServerError" if status >= 500 else "BadRequestError"


def error_payload(status: int, message: str, *, param: str | None = None,
                  type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or error_type(status),
                      "param": param, "code": status}}


def error_body(status: int, message: str, *, param: str | None = None,
               type: str | None = None) -> bytes:
    return orjson.dumps(error_payload(status, message, param=param, type=type))


def sse_error_event(status: int, message: str) -> bytes:
    """The event that ends a stream the router could not finish: an error, then [DONE]."""
    return b"data: " + error_body(status, message) + b"\n\ndata: [DONE]\n\n"


class RouterError(Exception):
    """An error the router answers itself, with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 headers: Mapping[str, str] | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = dict(headers or {})
        self.type = type or error_type(status)

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=error_body(self.status, self.message, param=self.param, type=self.type),
            content_type=JSON_CONTENT_TYPE,
            headers=self.headers,
        )


def bad_request(message: str, param: str | None = None) -> RouterError:
    return RouterError(400, message, param=param)


def error_response(status: int, message: str, *, param: str | None = None,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    return RouterError(status, message, param=param, headers=headers).response()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The OpenAI-shaped answer to an exception out of a handler (a redirect, an HTTP
    exception below 400, is raised again: it is not an error)."""
    if isinstance(exc, RouterError):
        return exc.response()
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
