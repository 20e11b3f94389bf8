"""The agentic APIs, the same checks against the simulator and real vLLM 0.32 (CPU build):
OpenAI Responses (/v1/responses: JSON, named SSE events, the store behind
VLLM_ENABLE_RESPONSES_API_STORE, previous_response_id, GET / resume / cancel, background)
and Anthropic Messages (/v1/messages, its SSE sequence, /v1/messages/count_tokens).

Answers are compared with the real answers captured in tests/reference/agentic/
(tests/reference/capture_agentic.py): the same keys in the same order at every level, the
same SSE event names in the same order, error bodies word for word.  Random weights give
arbitrary text, so token counts are checked through /tokenize of the equivalent chat
conversation, which is what both engines render these APIs into.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _conformance import MODEL, Engine, counters, metric, post_json, unique_text, wait_for

REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "agentic"
BASE = {"model": MODEL, "temperature": 0, "ignore_eos": True}
MBASE = {"model": MODEL, "temperature": 0}


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
        yield session


# -- helpers ---------------------------------------------------------------------------------------

def ref_json(name: str) -> Any:
    return json.loads((REFERENCE / name).read_text())


def named_events(raw: bytes) -> list[tuple[str | None, dict]]:
    """(event name, data) of each server-sent event."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        names = [line[7:] for line in lines if line.startswith("event: ")]
        data = [line[6:] for line in lines if line.startswith("data: ")]
        assert len(data) == 1, block
        out.append((names[0] if names else None, json.loads(data[0])))
    return out


def same_keys(ours: Any, ref: Any, path: str = "") -> None:
    """The same keys in the same order at every level, the same JSON kinds where the reference
    is not null; lists compare their first elements."""
    if isinstance(ref, dict):
        assert isinstance(ours, dict), f"{path}: {ours!r} is not an object"
        assert list(ours) == list(ref), f"{path}: keys {list(ours)} != {list(ref)}"
        for key in ref:
            same_keys(ours[key], ref[key], f"{path}.{key}")
    elif isinstance(ref, list):
        assert isinstance(ours, list), f"{path}: {ours!r} is not a list"
        if ref and ours:
            same_keys(ours[0], ref[0], f"{path}[0]")
    elif ref is not None:
        numbers = (int, float)
        assert type(ours) is type(ref) or (isinstance(ours, numbers) and isinstance(ref, numbers)
                                          and not isinstance(ours, bool)), f"{path}: {ours!r} vs {ref!r}"


async def call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


async def post_sse(http: aiohttp.ClientSession, url: str, body: dict) -> bytes:
    async with http.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return await resp.read()


async def chat_count(http: aiohttp.ClientSession, engine: Engine, messages: list[dict]) -> int:
    out = await post_json(http, engine.url + "/tokenize", {"model": MODEL, "messages": messages})
    return int(out["count"])


def output_text(response: dict) -> str:
    return "".join(p["text"] for item in response["output"] for p in item.get("content", []))


async def read_for(resp: aiohttp.ClientResponse, seconds: float) -> tuple[bytes, str]:
    """What a stream sends within `seconds`, and how it ended: eof, open or broken."""
    raw = b""
    try:
        async with asyncio.timeout(seconds):
            async for chunk in resp.content.iter_any():
                raw += chunk
        return raw, "eof"
    except TimeoutError:
        return raw, "open"
    except aiohttp.ClientPayloadError:
        return raw, "broken"


async def running(http: aiohttp.ClientSession, engine: Engine) -> float:
    return await metric(http, engine.url, "vllm:num_requests_running")


# -- Responses: one turn ------------------------------------------------------------------------------

async def test_responses_json_matches_reference(engine, http):
    text = unique_text(10)
    body = await post_json(http, engine.url + "/v1/responses", {**BASE, "input": text, "max_output_tokens": 6})
    same_keys(body, ref_json("responses.json"))
    assert body["id"].startswith("resp_") and body["object"] == "response" and body["model"] == MODEL
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["max_output_tokens"] == 6 and body["tool_choice"] == "none" and body["background"] is False
    (item,) = body["output"]
    assert item["id"].startswith("msg_") and item["role"] == "assistant" and item["status"] == "completed"
    assert item["content"][0]["type"] == "output_text" and item["content"][0]["text"]
    usage = body["usage"]
    assert usage["output_tokens"] == 6 and usage["total_tokens"] == usage["input_tokens"] + 6
    assert usage["input_tokens"] == await chat_count(http, engine, [{"role": "user", "content": text}])
    assert usage["input_tokens_details"]["cached_tokens"] == 0


async def test_responses_stream_named_events_match_reference(engine, http):
    raw = await post_sse(http, engine.url + "/v1/responses",
                         {**BASE, "input": unique_text(10), "max_output_tokens": 5, "stream": True})
    events = named_events(raw)
    names = [name for name, _ in events]
    assert names[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert names[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert names[4:-4] and set(names[4:-4]) == {"response.output_text.delta"}
    assert [data["type"] for _, data in events] == names
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    reference = dict(named_events((REFERENCE / "responses_stream.sse").read_bytes()))
    for name, data in events:
        same_keys(data, reference[name], name)
    text = "".join(data["delta"] for name, data in events if name == "response.output_text.delta")
    assert events[-4][1]["text"] == text
    created, final = events[0][1]["response"], events[-1][1]["response"]
    assert created["status"] == "in_progress" and created["usage"] is None and created["output"] == []
    assert final["id"] == created["id"] and output_text(final) == text
    assert final["output"][0]["id"] == events[2][1]["item"]["id"]
    assert final["usage"]["output_tokens"] == 5


# -- the store: previous_response_id, GET ---------------------------------------------------------------

async def test_previous_response_id_prepends_the_stored_conversation(engine, http):
    """Turn N+1's prompt is the chat rendering of [instructions, turn N's messages without their
    system message, turn N's output as assistant text, the new input]: it extends turn N's, so
    it reads turn N's blocks from the prefix cache."""
    bs = engine.block_size
    url = engine.url + "/v1/responses"
    text = unique_text(90)
    system = {"role": "system", "content": "Answer briefly."}
    t1 = await post_json(http, url, {**BASE, "instructions": "Answer briefly.", "input": text,
                                     "max_output_tokens": 8})
    n1 = t1["usage"]["input_tokens"]
    assert n1 == await chat_count(http, engine, [system, {"role": "user", "content": text}])
    assert t1["usage"]["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": n1 // bs * bs,
                                                   "input_tokens_per_turn": [], "cached_tokens_per_turn": []}
    t2 = await post_json(http, url, {**BASE, "instructions": "Answer briefly.", "input": "And then?",
                                     "previous_response_id": t1["id"], "max_output_tokens": 8})
    history = [system, {"role": "user", "content": text}, {"role": "assistant", "content": output_text(t1)},
               {"role": "user", "content": "And then?"}]
    assert t2["previous_response_id"] == t1["id"]
    assert t2["usage"]["input_tokens"] == await chat_count(http, engine, history)
    cached = t2["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached % bs == 0 and n1 // bs * bs <= cached < t2["usage"]["input_tokens"]
    t3 = await post_json(http, url, {**BASE, "instructions": "Answer briefly.", "input": "Once more.",
                                     "previous_response_id": t2["id"], "max_output_tokens": 4})
    history += [{"role": "assistant", "content": output_text(t2)}, {"role": "user", "content": "Once more."}]
    assert t3["usage"]["input_tokens"] == await chat_count(http, engine, history)
    assert t3["usage"]["input_tokens_details"]["cached_tokens"] >= cached
    status, stored = await call(http, "GET", f"{url}/{t2['id']}")
    assert status == 200 and stored == t2


async def test_instructions_do_not_carry_over(engine, http):
    """The previous turn's system messages are dropped (its developer messages are kept) and
    the new instructions lead."""
    url = engine.url + "/v1/responses"
    tag = unique_text(3)
    first = [{"role": "system", "content": "SYS " + tag}, {"role": "developer", "content": "DEV " + tag},
             {"role": "user", "content": "U1 " + tag}]
    t1 = await post_json(http, url, {**BASE, "max_output_tokens": 2, "input": first})
    t2 = await post_json(http, url, {**BASE, "max_output_tokens": 2, "instructions": "NEW", "input": "U2",
                                     "previous_response_id": t1["id"]})
    history = [{"role": "system", "content": "NEW"}, *first[1:],
               {"role": "assistant", "content": output_text(t1)}, {"role": "user", "content": "U2"}]
    assert t2["usage"]["input_tokens"] == await chat_count(http, engine, history)


async def test_function_call_items_render_as_tool_messages(engine, http):
    tools = [{"type": "function", "name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    city = unique_text(2)
    body = await post_json(http, engine.url + "/v1/responses", {
        **BASE, "max_output_tokens": 3, "tools": tools,
        "input": [{"role": "user", "content": f"Weather in {city}?"},
                  {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                   "arguments": "{\"city\": \"Paris\"}"},
                  {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]})
    same_keys(body, ref_json("responses_tools.json"))
    assert body["tool_choice"] == "auto" and body["tools"][0]["name"] == "get_weather"
    call = {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}
    call_msg = {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
                                                                     "function": call}]}
    tool_dicts = [{"type": "function", "function": {k: tools[0][k] for k in ("name", "description", "parameters")}}]
    expected = await post_json(http, engine.url + "/tokenize", {
        "model": MODEL, "tools": tool_dicts,
        "messages": [{"role": "user", "content": f"Weather in {city}?"}, call_msg,
                     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]})
    assert body["usage"]["input_tokens"] == expected["count"]


async def test_unknown_response_ids_are_404s_in_vllms_words(engine, http):
    url = engine.url + "/v1/responses"
    reference = ref_json("responses_get_unknown_404.json")
    for method, path, body in (("GET", "/resp_doesnotexist", None), ("POST", "/resp_doesnotexist/cancel", None),
                               ("POST", "", {**BASE, "input": "x", "max_output_tokens": 2,
                                             "previous_response_id": "resp_doesnotexist"})):
        status, answer = await call(http, method, url + path, body)
        assert (status, answer) == (404, reference), (method, path)


async def test_cancelling_a_finished_response_is_a_400(engine, http):
    url = engine.url + "/v1/responses"
    done = await post_json(http, url, {**BASE, "input": unique_text(4), "max_output_tokens": 2})
    assert await call(http, "POST", f"{url}/{done['id']}/cancel") == (
        400, ref_json("responses_cancel_completed_400.json"))
    status, body = await call(http, "POST", url, {**BASE, "input": "x", "background": True, "store": False})
    assert (status, body) == (400, ref_json("responses_background_no_store_400.json"))
    status, body = await call(http, "POST", url, {"model": MODEL})
    assert status == 400 and body["error"]["param"] == "body.input" and body["error"]["type"] == "Bad Request"


async def test_get_stream_of_a_foreground_response_is_broken_off(engine, http):
    """Only a background stream keeps its events: GET ?stream=true of any other stored response
    answers 200 and then drops the connection without an event (vLLM 0.32)."""
    url = engine.url + "/v1/responses"
    done = await post_json(http, url, {**BASE, "input": unique_text(4), "max_output_tokens": 2})
    async with http.get(f"{url}/{done['id']}?stream=true") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        raw, how = await read_for(resp, 5.0)
    assert raw == b"" and how == "broken"


# -- background -----------------------------------------------------------------------------------------

async def test_background_job_is_queued_until_done_and_cancellable(engine, http):
    url = engine.url + "/v1/responses"
    await wait_for(lambda: _idle(http, engine), timeout=30)
    queued = await post_json(http, url, {**BASE, "input": unique_text(8), "background": True,
                                         "max_output_tokens": 1800})
    same_keys(queued, ref_json("responses_background.json"))
    assert queued["status"] == "queued" and queued["background"] is True and queued["usage"] is None
    assert await wait_for(lambda: _busy(http, engine), timeout=10), "the background job never ran"
    assert await call(http, "GET", f"{url}/{queued['id']}") == (200, queued)  # never "in_progress"
    status, cancelled = await call(http, "POST", f"{url}/{queued['id']}/cancel")
    assert status == 200 and cancelled == {**queued, "status": "cancelled"}
    assert await call(http, "GET", f"{url}/{queued['id']}") == (200, cancelled)
    assert await call(http, "POST", f"{url}/{queued['id']}/cancel") == (
        400, ref_json("responses_background_cancel_again.json"))
    assert await wait_for(lambda: _idle(http, engine), timeout=10), "the cancelled job kept running"


async def test_background_job_completes_and_is_stored(engine, http):
    url = engine.url + "/v1/responses"
    queued = await post_json(http, url, {**BASE, "input": unique_text(6), "background": True,
                                         "max_output_tokens": 5})

    async def finished():
        status, body = await call(http, "GET", f"{url}/{queued['id']}")
        return body if body["status"] not in ("queued", "in_progress") else None

    done = await wait_for(finished, timeout=60, interval=0.1)
    assert done, "the background job did not finish"
    same_keys(done, ref_json("responses_background_get_done.json"))
    assert done["status"] == "incomplete" and done["usage"]["output_tokens"] == 5 and output_text(done)
    assert done["id"] == queued["id"] and done["created_at"] == queued["created_at"]


async def test_background_stream_resumes_after_a_sequence_number(engine, http):
    url = engine.url + "/v1/responses"
    raw = await post_sse(http, url, {**BASE, "input": unique_text(6), "background": True, "stream": True,
                                     "max_output_tokens": 4})
    events = named_events(raw)
    assert events[-1][0] == "response.completed" and events[0][1]["response"]["background"] is True
    rid = events[0][1]["response"]["id"]
    async with http.get(f"{url}/{rid}?stream=true&starting_after=3") as resp:
        assert resp.status == 200
        resumed = named_events(await resp.read())
    assert resumed == events[4:]
    status, stored = await call(http, "GET", f"{url}/{rid}")
    assert status == 200 and stored == events[-1][1]["response"]


async def test_cancelled_background_stream_stops_and_stays_open(engine, http):
    """vLLM 0.32: cancelling a background stream stops its events; the streams waiting on it
    (the POST's own, GET ?stream=true) get no response.completed and stay open."""
    url = engine.url + "/v1/responses"
    async with http.post(url, json={**BASE, "input": unique_text(6), "background": True, "stream": True,
                                    "max_output_tokens": 1800}) as post:
        first = b""
        async for chunk in post.content.iter_any():
            first += chunk
            if first.count(b"response.output_text.delta") >= 2:
                break
        rid = named_events(first.split(b"\n\n", 1)[0] + b"\n\n")[0][1]["response"]["id"]
        status, cancelled = await call(http, "POST", f"{url}/{rid}/cancel")
        assert status == 200 and cancelled["status"] == "cancelled"
        await asyncio.sleep(0.5)  # events already on the wire drain
        await read_for(post, 0.5)
        rest, how = await read_for(post, 1.5)
    assert rest == b"" and how == "open"
    assert await wait_for(lambda: _idle(http, engine), timeout=10)


async def _idle(http, engine) -> bool:
    return await running(http, engine) == 0


async def _busy(http, engine) -> bool:
    return await running(http, engine) >= 1


# -- Anthropic Messages ------------------------------------------------------------------------------------

async def test_messages_json_matches_reference(engine, http):
    user = unique_text(8)
    body = {**MBASE, "system": "Be brief.", "messages": [{"role": "user", "content": user}]}
    answer = await post_json(http, engine.url + "/v1/messages", {**body, "max_tokens": 5})
    same_keys(answer, ref_json("messages.json"))
    assert answer["id"].startswith("chatcmpl-") and answer["type"] == "message" and answer["role"] == "assistant"
    assert answer["stop_reason"] == "max_tokens" and "stop_sequence" not in answer
    usage = answer["usage"]
    assert usage["output_tokens"] == 5
    count = await post_json(http, engine.url + "/v1/messages/count_tokens", body)
    assert count == {"input_tokens": count["input_tokens"],
                     "context_management": {"original_input_tokens": count["input_tokens"]}}
    assert count["input_tokens"] == await chat_count(http, engine, [{"role": "system", "content": "Be brief."},
                                                                    {"role": "user", "content": user}])
    total = usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]
    assert total == count["input_tokens"]


async def test_messages_stream_events_match_reference(engine, http):
    body = {**MBASE, "messages": [{"role": "user", "content": unique_text(6)}]}
    raw = await post_sse(http, engine.url + "/v1/messages", {**body, "max_tokens": 4, "stream": True})
    events = named_events(raw)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert names[2:-3] and set(names[2:-3]) == {"content_block_delta"}
    assert [data["type"] for _, data in events] == names
    reference = dict(named_events((REFERENCE / "messages_stream.sse").read_bytes()))
    for name, data in events:
        same_keys(data, reference[name], name)
    count = await post_json(http, engine.url + "/v1/messages/count_tokens", body)
    assert events[0][1]["message"]["usage"] == {"input_tokens": count["input_tokens"], "output_tokens": 0}
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 4


async def test_messages_next_turn_reads_the_previous_turns_blocks(engine, http):
    bs = engine.block_size
    url = engine.url + "/v1/messages"
    system = [{"type": "text", "text": "Be brief."}]
    conv = [{"role": "user", "content": unique_text(90)}]
    t1 = await post_json(http, url, {**MBASE, "max_tokens": 5, "system": system, "messages": conv})
    u1 = t1["usage"]
    prompt1 = u1["input_tokens"] + u1["cache_creation_input_tokens"] + u1["cache_read_input_tokens"]
    assert u1["cache_read_input_tokens"] == 0 and u1["cache_creation_input_tokens"] == prompt1 // bs * bs
    conv += [{"role": "assistant", "content": t1["content"]}, {"role": "user", "content": "More?"}]
    t2 = await post_json(http, url, {**MBASE, "max_tokens": 5, "system": system, "messages": conv})
    read = t2["usage"]["cache_read_input_tokens"]
    # Turn 1's last token is the open assistant header's, which the next turn's reply extends
    # (a partial chunk for the simulator's tokenizer, a merge for a BPE): only the blocks
    # before it are shared.  When turn 1 ended on a block boundary (1 run in 32), that block
    # is not read back.
    assert read % bs == 0 and read >= (prompt1 - 1) // bs * bs


async def test_tool_blocks_become_tool_calls_and_tool_messages(engine, http):
    conv = [{"role": "user", "content": "Weather in " + unique_text(2)},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                                         {"type": "text", "text": "So?"}]}]
    count = await post_json(http, engine.url + "/v1/messages/count_tokens", {"model": MODEL, "messages": conv})
    chat = [{"role": "user", "content": conv[0]["content"]},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            {"role": "user", "content": "So?"}]
    assert count["input_tokens"] == await chat_count(http, engine, chat)
    answer = await post_json(http, engine.url + "/v1/messages", {**MBASE, "max_tokens": 3, "messages": conv})
    same_keys(answer, ref_json("extra_messages_tool_blocks.json"))


async def test_tools_without_a_tool_parser_are_refused(engine, http):
    tools = [{"name": "get_weather", "description": "Weather of a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    refusal = ref_json("messages_tools.json")
    assert await call(http, "POST", engine.url + "/v1/messages",
                      {**MBASE, "max_tokens": 3, "tools": tools, "messages": messages}) == (400, refusal)
    assert await call(http, "POST", engine.url + "/v1/messages/count_tokens",
                      {"model": MODEL, "tools": tools, "messages": messages}) == (400, refusal)
    status, _ = await call(http, "POST", engine.url + "/v1/messages",
                           {**MBASE, "max_tokens": 3, "tools": tools, "tool_choice": {"type": "none"},
                            "messages": messages})
    assert status == 200


async def test_messages_errors_in_vllms_shapes(engine, http):
    url = engine.url + "/v1/messages"
    assert await call(http, "POST", url, {**MBASE, "max_tokens": 5, "model": "nope",
                                          "messages": [{"role": "user", "content": "x"}]}) == (
        404, ref_json("messages_unknown_model_404.json"))
    assert await call(http, "POST", url, {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}) == (
        400, ref_json("messages_missing_max_tokens_400.json"))
    assert await call(http, "POST", url, {**MBASE, "max_tokens": 4000,
                                          "messages": [{"role": "user", "content": "x"}]}) == (
        400, ref_json("messages_too_long_400.json"))
    assert await call(http, "POST", url + "/count_tokens", {"model": "nope", "messages": [
        {"role": "user", "content": "x"}]}) == (404, ref_json("extra_count_tokens_unknown_model.json"))


# -- the engine counts them like chat ------------------------------------------------------------------------

async def test_agentic_requests_count_in_the_metrics(engine, http):
    await wait_for(lambda: _idle(http, engine), timeout=30)
    await asyncio.sleep(0.3)
    before = await counters(http, engine.url)
    r = await post_json(http, engine.url + "/v1/responses", {**BASE, "input": unique_text(40), "max_output_tokens": 3})
    m = await post_json(http, engine.url + "/v1/messages", {**MBASE, "max_tokens": 2, "messages": [
        {"role": "user", "content": unique_text(40)}]})
    mu = m["usage"]
    prompt = r["usage"]["input_tokens"] + mu["input_tokens"] + mu["cache_read_input_tokens"] \
        + mu["cache_creation_input_tokens"]
    cached = r["usage"]["input_tokens_details"]["cached_tokens"] + mu["cache_read_input_tokens"]

    async def settled():
        now = await counters(http, engine.url)
        return now if now["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] >= 5 else None

    after = await wait_for(settled)
    assert after, "generation tokens were not counted"
    delta = {k: after[k] - before[k] for k in after}
    assert delta["vllm:prompt_tokens_total"] == prompt
    assert delta["vllm:prefix_cache_queries_total"] == prompt
    assert delta["vllm:prefix_cache_hits_total"] == cached
    assert delta["vllm:generation_tokens_total"] == 5
