"""Request bodies: a size cap, a deadline, a budget for all bodies held at once, encodings.

The body is the one thing every request brings that the router must hold in memory (it
is forwarded, and kept until the upstream request ends), so:

* **Size** (``server.max_body_bytes``, 413 above it): a declared Content-Length over the
  cap is refused before a byte is read; a chunked body is cut off as soon as it passes
  the cap; a compressed body is cut off as soon as its *decompressed* size does (a
  zip bomb costs the router at most the cap).
* **Time** (``server.body_timeout``): the whole body must arrive within it, else 408 and
  the connection is closed (a client trickling a body holds no socket for ever).
* **Budget** (``server.max_inflight_body_bytes``): the bytes of every body held at once,
  declared lengths reserved before reading.  Beyond it the request gets 503 with
  ``Retry-After`` before its body is read, instead of the process growing until the
  kernel kills it.
* **Content-Encoding**: ``gzip``, ``x-gzip`` and ``deflate`` bodies are decompressed here
  (incrementally, as the bytes arrive) and forwarded decompressed, without the header;
  ``identity`` is a no-op; anything else is a 415; a corrupt stream is a 400.  (aiohttp's
  own decompression is turned off, so the bytes counted are the bytes held.)
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import StreamReader, web

from router.core.body_budget import BodyLease, too_large
from router.errors import RouterError
from router.http_errors import response_of

_READ_CHUNK = 256 * 1024


def _decoder(encoding: str) -> zlib._Decompress | None:
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib-wrapped (RFC 9110) or raw-ish
    raise RouterError(415, f"Unsupported Content-Encoding '{encoding}'; send identity, gzip or deflate")


async def read_body(request: web.Request, limit: int, *, timeout: float,
                    lease: BodyLease) -> bytes | bytearray:
    """The whole (decoded) request body, held under `lease`.

    413 over `limit` bytes (raw or decoded), 408 after `timeout` seconds, 503 when the
    budget is spent, 415/400 for an unsupported or corrupt Content-Encoding.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large(limit)
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    decoder = _decoder(encoding)
    reserved = declared or 0
    lease.take(reserved)
    content = request.content
    if decoder is None and content.is_eof():
        # The whole body came with the head (most requests): no wait, so no timeout.
        try:
            data = content.read_nowait()
        except web.HTTPRequestEntityTooLarge:
            raise too_large(limit) from None
        if len(data) > limit:
            raise too_large(limit)
        if len(data) > reserved:
            lease.take(len(data) - reserved)
        return data
    if decoder is None and declared:
        return await _read_declared(content, declared, timeout)
    raw_size = 0
    chunks: list[bytes] = []
    decoded_size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await content.read(_READ_CHUNK)
                if not chunk:
                    break
                raw_size += len(chunk)
                if raw_size > limit:
                    raise too_large(limit)
                if raw_size > reserved:  # chunked: reserve as the bytes come
                    lease.take(raw_size - reserved)
                    reserved = raw_size
                if decoder is not None:
                    chunk = _inflate(decoder, chunk, limit - decoded_size, limit)
                    lease.take(len(chunk))
                decoded_size += len(chunk)
                chunks.append(chunk)
            if decoder is not None:
                tail = decoder.flush()
                if tail:
                    if decoded_size + len(tail) > limit:
                        raise too_large(limit)
                    lease.take(len(tail))
                    chunks.append(tail)
                if not decoder.eof:
                    raise RouterError(400, f"The {encoding} request body is truncated")
    except TimeoutError:
        raise RouterError(408, f"The request body did not arrive within {timeout:g}s",
                          headers={"Connection": "close"}) from None
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _read_declared(content: StreamReader, length: int, timeout: float) -> bytearray:
    """A body of a declared length, read straight into one buffer of that size.

    Collecting chunks and joining them held every body twice at its peak (the chunks and
    the joined copy); the buffer is filled in place instead.  A bytearray is returned
    (orjson parses it and the upstream pool writes it as they would bytes; nothing
    mutates it).  aiohttp's reader refuses bytes past the declared length, so fewer is
    the only mismatch: a body that ends early is a 400."""
    buffer = bytearray(length)
    view = memoryview(buffer)
    filled = 0
    try:
        async with asyncio.timeout(timeout):
            while filled < length:
                chunk = await content.readany()
                if not chunk:
                    break
                end = filled + len(chunk)
                if end > length:
                    raise RouterError(400, "The request body is longer than its Content-Length")
                view[filled:end] = chunk
                filled = end
    except TimeoutError:
        raise RouterError(408, f"The request body did not arrive within {timeout:g}s",
                          headers={"Connection": "close"}) from None
    finally:
        view.release()
    if filled < length:
        raise RouterError(400, f"The request body ended after {filled} of its {length} bytes",
                          headers={"Connection": "close"})
    return buffer  # (bytes-like; see above)


def _inflate(decoder: zlib._Decompress, data: bytes, room: int, limit: int) -> bytes:
    try:
        out = decoder.decompress(data, room + 1)
    except zlib.error as exc:
        raise RouterError(400, f"The request body is not valid compressed data: {exc}") from None
    if len(out) > room or decoder.unconsumed_tail:
        raise too_large(limit)
    return out


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` is answered at once; any other expectation is a JSON 417.

    aiohttp's own handler answers the second in text/plain, outside the middlewares.
    """
    expect = request.headers.get("Expect", "")
    if expect.lower() == "100-continue":
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None
    return response_of(RouterError(417, "Only 'Expect: 100-continue' is supported", param="Expect"))
