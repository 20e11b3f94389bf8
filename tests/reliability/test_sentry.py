"""Sentry for real: an exception in a handler reaches a DSN on loopback, without secrets.

The receiver is a plain HTTP server speaking the part of Sentry's protocol the SDK uses
(`POST /api/<project>/envelope/`, gzip or not); the test parses the envelope it gets.
"""

from __future__ import annotations

import gzip
import zlib

import orjson
import pytest
import sentry_sdk
from aiohttp import web
from sentry_sdk.envelope import Envelope

from router.app import Router, serve
from router.config import parse_config

CLIENT_KEY = "sk-client-0123456789abcdef"
BACKEND_KEY = "backend-secret-0123456789"
ADMIN_KEY = "admin-secret-0123456789ab"
PROMPT = "my-private-prompt-text-4711"


class EnvelopeReceiver:
    """A loopback stand-in for sentry.io: keeps every envelope it is sent, decoded."""

    def __init__(self) -> None:
        self.envelopes: list[bytes] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> EnvelopeReceiver:
        app = web.Application()
        app.router.add_post("/api/{project}/envelope/", self.envelope)
        # The SDK gzips its envelopes: decode them here, as sentry.io does.
        self.runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def envelope(self, request: web.Request) -> web.Response:
        data = await request.read()
        encoding = request.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            data = gzip.decompress(data)
        elif encoding == "deflate":
            data = zlib.decompress(data)
        elif encoding == "br":
            import brotli  # type: ignore[import-not-found]

            data = brotli.decompress(data)
        self.envelopes.append(data)
        return web.json_response({"id": "0" * 32})

    def events(self) -> list[dict]:
        """The `event` items of every envelope, parsed by the SDK's own envelope reader."""
        found = []
        for raw in self.envelopes:
            for item in Envelope.deserialize(raw).items:
                if item.type == "event" and item.payload.json is not None:
                    found.append(item.payload.json)
        return found

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def receiver():
    rec = await EnvelopeReceiver().start()
    yield rec
    client = sentry_sdk.get_client()
    if client.is_active():
        client.close(timeout=1.0)
    sentry_sdk.init(dsn=None)  # the rest of the session reports nowhere
    await rec.stop()


async def test_an_exception_in_a_handler_reaches_sentry_without_secrets(
        receiver, fakes, make_routes, http, until) -> None:
    (fake,) = await fakes(1)
    dsn = f"http://publickey@127.0.0.1:{receiver.port}/42"
    config = make_routes([{"url": fake.url, "api_key": BACKEND_KEY}],
                         server={"sentry_dsn": dsn},
                         auth={"keys": [{"name": "team", "key": CLIENT_KEY}], "admin_key": ADMIN_KEY})
    router = await Router.create(parse_config(config, "sentry-routes.yaml"))
    assert router.app is not None

    async def broken(request: web.Request) -> web.Response:
        await request.read()
        secret_local = CLIENT_KEY  # noqa: F841 - a local that must not travel in the event
        raise RuntimeError("boom from a broken handler")

    router.app.router.add_post("/v1/broken", broken)
    server = await serve(router, "127.0.0.1", 0)
    try:
        async with http.post(server.url + "/v1/broken", data=orjson.dumps({"prompt": PROMPT}),
                             headers={"Authorization": f"Bearer {CLIENT_KEY}",
                                      "X-Api-Key": CLIENT_KEY, "api-key": CLIENT_KEY,
                                      "Cookie": f"session={CLIENT_KEY}",
                                      "Content-Type": "application/json"}) as r:
            assert r.status == 500
            body = await r.json()
        assert body["error"]["message"] == "Internal router error"
        assert "boom" not in orjson.dumps(body).decode()  # the client learns nothing inside

        await until(lambda: receiver.events(), timeout=10, message="an event at the DSN")
    finally:
        await server.close()
    (event,) = [e for e in receiver.events()
                if any(v.get("value") == "boom from a broken handler"
                       for v in e.get("exception", {}).get("values", []))]
    exc = event["exception"]["values"][-1]
    assert exc["type"] == "RuntimeError"
    assert any(f["function"] == "broken" for f in exc["stacktrace"]["frames"])
    assert event["level"] == "error"
    assert event["release"].startswith("vllm-smart-router@")
    raw = b"".join(receiver.envelopes)
    for secret in (CLIENT_KEY, BACKEND_KEY, ADMIN_KEY, PROMPT):
        i = raw.find(secret.encode())
        assert i < 0, f"{secret} reached Sentry: ...{raw[max(0, i - 300):i + 40]!r}"
