"""The official `openai` client, sync and async, streaming and not, through the router."""

from __future__ import annotations

import asyncio

import openai
import pytest


@pytest.fixture
async def server(make_sims, start_router, make_routes):
    sims = await make_sims(2)
    return await start_router(make_routes([s.url for s in sims], aliases=["alias-a"],
                                          policy="least_load"))


def _sync_calls(base_url: str) -> dict[str, object]:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="client-key", max_retries=0)
    out: dict[str, object] = {}
    chat = client.chat.completions.create(
        model="sim-a", messages=[{"role": "user", "content": "Say hello"}], max_tokens=5)
    out["chat"] = chat
    comp = client.completions.create(model="alias-a", prompt="Once upon a time", max_tokens=4)
    out["completion"] = comp
    stream = client.chat.completions.create(
        model="sim-a", messages=[{"role": "user", "content": "Count"}], max_tokens=6, stream=True,
        stream_options={"include_usage": True})
    out["stream"] = list(stream)
    out["models"] = [m.id for m in client.models.list()]
    out["embedding"] = client.embeddings.create(model="sim-a", input="hello world")
    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    except openai.NotFoundError as exc:
        out["not_found"] = exc
    try:
        client.chat.completions.create(model="sim-a", messages="not a list", max_tokens=1)  # type: ignore[arg-type]
    except openai.BadRequestError as exc:
        out["bad_request"] = exc
    return out


async def test_sync_client(server) -> None:
    out = await asyncio.to_thread(_sync_calls, server.url)
    chat = out["chat"]
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 5  # type: ignore[attr-defined]
    assert out["completion"].model == "sim-a"  # type: ignore[attr-defined]
    chunks = out["stream"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # type: ignore[attr-defined]
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6  # type: ignore[index]
    assert out["models"] == ["sim-a", "alias-a"]
    assert len(out["embedding"].data[0].embedding) > 0  # type: ignore[attr-defined]
    not_found = out["not_found"]
    assert not_found.status_code == 404 and "sim-a" in str(not_found)  # type: ignore[attr-defined]
    assert out["bad_request"].status_code == 400  # type: ignore[attr-defined]


async def test_async_client(server) -> None:
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
    try:
        results = await asyncio.gather(*(
            client.completions.create(model="sim-a", prompt=f"Question {i}: why?", max_tokens=3)
            for i in range(10)))
        assert all(r.choices[0].text for r in results)
        stream = await client.completions.create(model="alias-a", prompt="Tell me", max_tokens=8,
                                                 stream=True)
        pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
        assert len(pieces) == 8
        chat_stream = await client.chat.completions.create(
            model="sim-a", messages=[{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hi"}],
            max_tokens=4, stream=True)
        deltas = [c async for c in chat_stream]
        assert deltas[0].choices[0].delta.role == "assistant"
        assert deltas[-1].choices[0].finish_reason == "length"
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=[], max_tokens=1)
    finally:
        await client.close()
