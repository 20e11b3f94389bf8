"""OpenAI/vLLM-shaped errors.

Every error the router itself produces has the body vLLM uses::

    {"error": {"message": "...", "type": "NotFoundError", "param": "model", "code": 404}}

so a client cannot tell a router-made 404 from a replica-made one.  This module is plain
Python, so the core can raise these errors without an HTTP library; router/http_errors.py
turns them (and aiohttp's own HTTP errors) into aiohttp responses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

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

CLIENT_CLOSED = 499  # nginx's status for "client closed the request" (logs and metrics)
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


def bad_request(message: str, param: str | None = None) -> RouterError:
    return RouterError(400, message, param=param)
