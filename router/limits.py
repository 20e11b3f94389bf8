"""Admission limits: the request body cap.

The body is the one thing every request brings that the router must hold in memory, so
it is capped (``server.max_body_bytes``, 413 above it): a declared Content-Length over
the cap is refused before a byte is read, and a chunked body is cut off as soon as it
passes the cap (aiohttp's ``client_max_size``, set to the same value by app.py).
"""

from __future__ import annotations

from aiohttp import web

from router.errors import RouterError


def too_large(limit: int) -> RouterError:
    return RouterError(413, f"Request body too large: the limit is {limit} bytes")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, or a 413 RouterError if it is larger than `limit` bytes."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large(limit)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    if len(body) > limit:
        raise too_large(limit)
    return body
