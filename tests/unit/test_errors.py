"""Errors are shaped like vLLM's / OpenAI's, whatever produced them; never a traceback."""

from __future__ import annotations

import orjson
from aiohttp import web

from router.errors import RouterError, error_body, error_payload, sse_error_event
from router.http_errors import error_answer

# What real vLLM 0.32 answers for an unknown model (shared/reference/error_404.json).
VLLM_404 = {"error": {"message": "The model `nope` does not exist. Valid aliases: tiny-llama.",
                      "type": "NotFoundError", "param": "model", "code": 404}}


def test_payload_has_vllm_shape() -> None:
    ours = error_payload(404, "The model `nope` does not exist.", param="model")
    assert set(ours) == set(VLLM_404)
    assert set(ours["error"]) == set(VLLM_404["error"])
    assert ours["error"]["type"] == "NotFoundError" and ours["error"]["code"] == 404
    assert orjson.loads(error_body(400, "bad"))["error"]["type"] == "BadRequestError"
    assert orjson.loads(error_body(503, "x"))["error"]["type"] == "ServiceUnavailableError"
    assert orjson.loads(error_body(599, "x"))["error"]["type"] == "InternalServerError"


def test_sse_error_event_ends_the_stream() -> None:
    event = sse_error_event(502, "replica died")
    first, done, rest = event.split(b"\n\n")
    assert first.startswith(b"data: ")
    assert orjson.loads(first[6:])["error"]["message"] == "replica died"
    assert done == b"data: [DONE]" and rest == b""


async def _boom(request: web.Request) -> web.Response:
    raise RuntimeError("secret internal detail")


async def _router_error(request: web.Request) -> web.Response:
    raise RouterError(503, "no replica", headers={"Retry-After": "2"})


async def _echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read())


@web.middleware
async def _shaped(request: web.Request, handler) -> web.StreamResponse:
    """What the router's front door does with a handler's exception (router/frontdoor/api.py)."""
    try:
        return await handler(request)
    except Exception as exc:
        return error_answer(request, exc)


async def test_every_error_is_shaped(aiohttp_client) -> None:
    app = web.Application(middlewares=[_shaped], client_max_size=1024)
    app.router.add_get("/boom", _boom)
    app.router.add_get("/busy", _router_error)
    app.router.add_post("/echo", _echo)
    client = await aiohttp_client(app)

    r = await client.get("/boom")
    assert r.status == 500
    text = await r.text()
    assert "secret internal detail" not in text and "Traceback" not in text
    assert orjson.loads(text)["error"]["code"] == 500

    r = await client.get("/busy")
    assert r.status == 503 and r.headers["Retry-After"] == "2"
    assert (await r.json())["error"]["message"] == "no replica"

    r = await client.get("/nowhere")
    assert r.status == 404 and r.content_type == "application/json"
    assert (await r.json())["error"]["type"] == "NotFoundError"

    r = await client.put("/echo")
    assert r.status == 405 and "POST" in r.headers["Allow"]
    body = await r.json()
    assert body["error"]["type"] == "MethodNotAllowedError" and "PUT" in body["error"]["message"]

    r = await client.post("/echo", data=b"x" * 5000)
    assert r.status == 413
    assert "1024" in (await r.json())["error"]["message"]
