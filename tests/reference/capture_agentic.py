"""Capture real vLLM 0.32's answers on the agentic APIs (OpenAI Responses, Anthropic Messages)
into tests/reference/agentic/, the reference the simulator and the conformance suite check against.

    .venv/bin/python tests/reference/capture_agentic.py [--extra | --no-store | --no-scale-out]

Starts ONE real vLLM CPU server (.venv-vllm, the tiny random-weights Llama in
.engines/models/tiny-llama, the flags of vllm-cpu.md plus --block-size 32
--num-gpu-blocks-override 80 --enable-scale-out) with VLLM_ENABLE_RESPONSES_API_STORE=1,
runs the requests below, writes every answer as it came (JSON bodies, raw SSE bytes; status,
content type and request in index*.json) and stops the server.  --extra: the second set
(extra_*); --no-store: without the store switch (store_off_*); --no-scale-out: without
--enable-scale-out, the render endpoints (scale_out_off_*).
Random weights give arbitrary text: the shapes are what matter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "agentic"
MODEL = "tiny-llama"

# A conversation long enough to fill a few 32-token blocks, so the second turn shows cached tokens.
LONG = ("The quick brown fox jumps over a lazy dog while river stones hum under a silver moon, "
        "and seven tired sailors count copper coins near the harbor walls before dawn breaks "
        "across the northern hills where old farmers plant barley, wheat and green beans.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(port: int, store: bool, log: Path, scale_out: bool = True) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    if store:
        env["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"
    argv = [str(ROOT / ".venv-vllm/bin/vllm"), "serve", str(ROOT / ".engines/models/tiny-llama"),
            "--served-model-name", MODEL, "--port", str(port), "--load-format", "dummy",
            "--enable-prefix-caching", "--max-model-len", "2048", "--dtype", "float32", "--enforce-eager",
            "--enable-prompt-tokens-details", "--disable-uvicorn-access-log", "--block-size", "32",
            "--num-gpu-blocks-override", "80"] + (["--enable-scale-out"] if scale_out else [])
    print("$", " ".join(argv), flush=True)
    return subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


class Capture:
    def __init__(self, http: aiohttp.ClientSession, url: str, prefix: str) -> None:
        self.http = http
        self.url = url
        self.prefix = prefix
        self.index: dict[str, Any] = {}

    def _save(self, name: str, status: int, content_type: str, raw: bytes, request: Any) -> None:
        name = self.prefix + name
        raw = trim_sse(raw, request) if name.endswith(".sse") else raw
        (OUT / name).write_bytes(raw)
        self.index[name] = {"status": status, "content_type": content_type, "request": request}
        print(f"{status} {name} ({len(raw)} bytes)", flush=True)

    async def call(self, name: str, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        async with self.http.request(method, self.url + path, json=body) as r:
            raw, broken = b"", None
            try:
                async for chunk in r.content.iter_any():
                    raw += chunk
            except aiohttp.ClientPayloadError as exc:  # the server broke the stream off
                broken = str(exc)
            request = {"method": method, "path": path, "body": body}
            if broken:
                request["broken_off"] = broken
            self._save(name, r.status, r.headers.get("Content-Type", ""), raw, request)
            return r.status, raw

    async def json(self, name: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
        _, raw = await self.call(name, method, path, body)
        try:
            out = json.loads(raw)
        except ValueError:
            return {}
        return out if isinstance(out, dict) else {"list": out}


def trim_sse(raw: bytes, request: dict[str, Any], keep: int = 6, longer_than: int = 40) -> bytes:
    """A stream of more than `longer_than` events kept short: its first `keep` events and its
    last two (the count goes to the index as events_total)."""
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    if len(events) <= longer_than:
        return raw
    request["events_total"] = len(events)
    request["trimmed"] = f"events {keep}..{len(events) - 3} left out"
    return b"\n\n".join(events[:keep] + events[-2:]) + b"\n\n"


def sse_events(raw: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    out = []
    for block in raw.decode().split("\n\n"):
        name, data = None, None
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
        if data and data != "[DONE]":
            out.append((name, json.loads(data)))
    return out


async def store_on(c: Capture) -> None:
    base = {"model": MODEL, "temperature": 0, "ignore_eos": True}
    # -- Responses: one turn, JSON and SSE ------------------------------------------------
    one = await c.json("responses.json", "POST", "/v1/responses",
                       {**base, "input": "Say hello.", "max_output_tokens": 6})
    await c.call("responses_stream.sse", "POST", "/v1/responses",
                 {**base, "input": "Say hello.", "max_output_tokens": 4, "stream": True})
    await c.json("responses_instructions.json", "POST", "/v1/responses",
                 {**base, "instructions": "You are terse.", "input": [
                     {"role": "user", "content": "hi"},
                     {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and"}]}],
                  "max_output_tokens": 3})
    # Without max_output_tokens (max_output_tokens becomes max_model_len - prompt; EOS may stop it).
    await c.json("responses_default_max.json", "POST", "/v1/responses",
                 {"model": MODEL, "input": "x", "max_output_tokens": None, "temperature": 0,
                  "stop_token_ids": None})
    # -- the store: GET, a 2-turn chain, the rendered prompts ------------------------------
    await c.json("responses_get.json", "GET", f"/v1/responses/{one['id']}")
    t1 = await c.json("responses_chain_turn1.json", "POST", "/v1/responses",
                      {**base, "instructions": "Answer briefly.", "input": LONG, "max_output_tokens": 8})
    t2 = await c.json("responses_chain_turn2.json", "POST", "/v1/responses",
                      {**base, "instructions": "Answer briefly.", "input": "And then?",
                       "previous_response_id": t1["id"], "max_output_tokens": 8})
    await c.json("responses_chain_turn3.json", "POST", "/v1/responses",
                 {**base, "instructions": "Answer briefly.", "input": "Once more.",
                  "previous_response_id": t2["id"], "max_output_tokens": 4})
    # The same conversation through chat (the rendered prompt must be the same token ids).
    text1 = "".join(p["text"] for item in t1["output"] for p in item.get("content", []))
    await c.json("responses_chain_as_chat_tokenize.json", "POST", "/tokenize", {
        "model": MODEL, "messages": [{"role": "system", "content": "Answer briefly."},
                                     {"role": "user", "content": LONG},
                                     {"role": "assistant", "content": text1},
                                     {"role": "user", "content": "And then?"}]})
    # Render endpoints (registered with --enable-scale-out; 403 without it).
    await c.json("responses_render.json", "POST", "/v1/responses/render",
                 {**base, "instructions": "Answer briefly.", "input": LONG, "max_output_tokens": 8})
    await c.json("responses_render_previous.json", "POST", "/v1/responses/render",
                 {**base, "input": "x", "previous_response_id": t1["id"]})
    # Tool items: function_call and function_call_output in the input.
    await c.json("responses_tools.json", "POST", "/v1/responses", {
        **base, "max_output_tokens": 3,
        "tools": [{"type": "function", "name": "get_weather", "description": "Weather of a city",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "input": [{"role": "user", "content": "Weather in Paris?"},
                  {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                   "arguments": "{\"city\": \"Paris\"}"},
                  {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]})
    # -- errors ------------------------------------------------------------------------------
    await c.json("responses_get_unknown_404.json", "GET", "/v1/responses/resp_doesnotexist")
    await c.json("responses_cancel_unknown_404.json", "POST", "/v1/responses/resp_doesnotexist/cancel")
    await c.json("responses_previous_unknown_404.json", "POST", "/v1/responses",
                 {**base, "input": "x", "previous_response_id": "resp_doesnotexist", "max_output_tokens": 2})
    await c.json("responses_cancel_completed_400.json", "POST", f"/v1/responses/{one['id']}/cancel")
    await c.json("responses_unknown_model_404.json", "POST", "/v1/responses",
                 {"model": "nope", "input": "x", "max_output_tokens": 2})
    await c.json("responses_missing_input_400.json", "POST", "/v1/responses", {"model": MODEL})
    await c.json("responses_background_no_store_400.json", "POST", "/v1/responses",
                 {**base, "input": "x", "background": True, "store": False})
    await c.call("responses_get_stream_not_background.sse", "GET", f"/v1/responses/{one['id']}?stream=true")
    # -- background: queued, GET while it runs, cancel, GET after --------------------------
    bg = await c.json("responses_background.json", "POST", "/v1/responses",
                      {**base, "input": "Write a long story.", "background": True, "max_output_tokens": 1800})
    await asyncio.sleep(1.0)
    await c.json("responses_background_get_running.json", "GET", f"/v1/responses/{bg['id']}")
    await c.json("responses_background_cancel.json", "POST", f"/v1/responses/{bg['id']}/cancel")
    await c.json("responses_background_get_cancelled.json", "GET", f"/v1/responses/{bg['id']}")
    await c.json("responses_background_cancel_again.json", "POST", f"/v1/responses/{bg['id']}/cancel")
    bg2 = await c.json("responses_background_done.json", "POST", "/v1/responses",
                       {**base, "input": "short", "background": True, "max_output_tokens": 5})
    for _ in range(100):
        async with c.http.get(f"{c.url}/v1/responses/{bg2['id']}") as r:
            if (await r.json())["status"] not in ("queued", "in_progress"):
                break
        await asyncio.sleep(0.1)
    await c.json("responses_background_get_done.json", "GET", f"/v1/responses/{bg2['id']}")
    # -- background + stream, then GET ?stream=true&starting_after=N (resume) ---------------
    _, raw = await c.call("responses_background_stream.sse", "POST", "/v1/responses",
                          {**base, "input": "Stream in the background.", "background": True, "stream": True,
                           "max_output_tokens": 4})
    events = sse_events(raw)
    rid = events[0][1]["response"]["id"]
    await c.call("responses_background_stream_resume.sse", "GET",
                 f"/v1/responses/{rid}?stream=true&starting_after=3")
    await c.json("responses_background_stream_get.json", "GET", f"/v1/responses/{rid}")
    # Cancel a background stream while it runs.
    async with c.http.post(c.url + "/v1/responses", json={
            **base, "input": "Long background stream.", "background": True, "stream": True,
            "max_output_tokens": 1800}) as r:
        first = b""
        async for chunk in r.content.iter_any():
            first += chunk
            if b"response.output_text.delta" in first:
                break
        rid = sse_events(first.rsplit(b"\n\n", 1)[0] + b"\n\n")[0][1]["response"]["id"]
        await c.json("responses_background_stream_cancel.json", "POST", f"/v1/responses/{rid}/cancel")
    await c.json("responses_background_stream_get_cancelled.json", "GET", f"/v1/responses/{rid}")
    # -- Anthropic Messages -------------------------------------------------------------------
    mbase = {"model": MODEL, "temperature": 0, "max_tokens": 5}
    await c.json("messages.json", "POST", "/v1/messages",
                 {**mbase, "system": "Be brief.", "messages": [{"role": "user", "content": "Say hello."}]})
    await c.call("messages_stream.sse", "POST", "/v1/messages",
                 {**mbase, "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "Hello"}]})
    conv = [{"role": "user", "content": LONG}]
    m1 = await c.json("messages_turn1.json", "POST", "/v1/messages",
                      {**mbase, "system": [{"type": "text", "text": "Be brief."}], "messages": conv})
    conv2 = conv + [{"role": "assistant", "content": m1["content"]}, {"role": "user", "content": "More?"}]
    await c.json("messages_turn2.json", "POST", "/v1/messages",
                 {**mbase, "system": [{"type": "text", "text": "Be brief."}], "messages": conv2})
    await c.call("messages_turn2_stream.sse", "POST", "/v1/messages",
                 {**mbase, "max_tokens": 3, "stream": True, "system": [{"type": "text", "text": "Be brief."}],
                  "messages": conv2})
    tools = [{"name": "get_weather", "description": "Weather of a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    tool_conv = [{"role": "user", "content": "Weather in Paris?"},
                 {"role": "assistant", "content": [
                     {"type": "text", "text": "Let me check."},
                     {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                               "content": "sunny"}]}]
    await c.json("messages_tools.json", "POST", "/v1/messages", {**mbase, "tools": tools, "messages": tool_conv})
    await c.json("messages_count_tokens.json", "POST", "/v1/messages/count_tokens",
                 {"model": MODEL, "system": "Be brief.", "messages": [{"role": "user", "content": "Say hello."}]})
    await c.json("messages_count_tokens_tools.json", "POST", "/v1/messages/count_tokens",
                 {"model": MODEL, "tools": tools, "messages": tool_conv})
    await c.json("messages_tokenize_as_chat.json", "POST", "/tokenize", {
        "model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Say hello."}]})
    await c.json("messages_render.json", "POST", "/v1/messages/render",
                 {**mbase, "system": "Be brief.", "messages": [{"role": "user", "content": "Say hello."}]})
    await c.json("messages_unknown_model_404.json", "POST", "/v1/messages",
                 {**mbase, "model": "nope", "messages": [{"role": "user", "content": "x"}]})
    await c.json("messages_missing_max_tokens_400.json", "POST", "/v1/messages",
                 {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    await c.json("messages_too_long_400.json", "POST", "/v1/messages",
                 {**mbase, "max_tokens": 4000, "messages": [{"role": "user", "content": "x"}]})


async def read_for(resp: aiohttp.ClientResponse, seconds: float) -> tuple[bytes, str]:
    """What a stream sends within `seconds`, and how it ended (eof / still open / broken)."""
    raw = b""
    try:
        async with asyncio.timeout(seconds):
            async for chunk in resp.content.iter_any():
                raw += chunk
        return raw, "eof"
    except TimeoutError:
        return raw, f"still open after {seconds} s"
    except aiohttp.ClientPayloadError as exc:
        return raw, f"broken off: {exc}"


async def store_on_extra(c: Capture) -> None:
    base = {"model": MODEL, "temperature": 0, "ignore_eos": True}
    # A background stream cancelled while it runs: what its own POST stream does afterwards,
    # and GET ?stream=true (no starting_after) of a running background stream.
    async with c.http.post(c.url + "/v1/responses", json={
            **base, "input": "Long background stream.", "background": True, "stream": True,
            "max_output_tokens": 1800}) as post:
        first = b""
        async for chunk in post.content.iter_any():
            first += chunk
            if first.count(b"response.output_text.delta") >= 2:
                break
        rid = sse_events(first.split(b"\n\n", 1)[0] + b"\n\n")[0][1]["response"]["id"]
        await c.json("extra_bg_stream_get_running.json", "GET", f"/v1/responses/{rid}")
        async with c.http.get(f"{c.url}/v1/responses/{rid}?stream=true") as live:
            replay, how = await read_for(live, 1.0)
            c._save("extra_bg_stream_get_stream_live.sse", live.status, live.headers.get("Content-Type", ""),
                    replay, {"method": "GET", "path": f"/v1/responses/{rid}?stream=true", "ended": how})
        await c.json("extra_bg_stream_cancel.json", "POST", f"/v1/responses/{rid}/cancel")
        rest, how = await read_for(post, 3.0)
        c._save("extra_bg_stream_post_after_cancel.sse", post.status, post.headers.get("Content-Type", ""),
                first + rest, {"method": "POST", "path": "/v1/responses", "ended": how})
    async with c.http.get(f"{c.url}/v1/responses/{rid}?stream=true&starting_after=0") as after:
        raw, how = await read_for(after, 2.0)
        c._save("extra_bg_stream_get_stream_after_cancel.sse", after.status, after.headers.get("Content-Type", ""),
                raw, {"method": "GET", "path": f"/v1/responses/{rid}?stream=true&starting_after=0", "ended": how})
    # GET ?stream=true of a running background job that was not streamed.
    bg = await c.json("extra_bg_running.json", "POST", "/v1/responses",
                      {**base, "input": "Long job.", "background": True, "max_output_tokens": 1800})
    async with c.http.get(f"{c.url}/v1/responses/{bg['id']}?stream=true") as r:
        raw, how = await read_for(r, 2.0)
        c._save("extra_bg_get_stream.sse", r.status, r.headers.get("Content-Type", ""), raw,
                {"method": "GET", "path": f"/v1/responses/{bg['id']}?stream=true", "ended": how})
    await c.json("extra_bg_cancel.json", "POST", f"/v1/responses/{bg['id']}/cancel")
    # A plain (foreground) stream with store on: stored at the end?
    _, raw = await c.call("extra_stream_stored.sse", "POST", "/v1/responses",
                          {**base, "input": "stream me", "stream": True, "max_output_tokens": 3})
    rid = sse_events(raw)[0][1]["response"]["id"]
    await c.json("extra_stream_stored_get.json", "GET", f"/v1/responses/{rid}")
    await c.json("extra_store_false_get.json", "GET", "/v1/responses/" + (await c.json(
        "extra_store_false.json", "POST", "/v1/responses",
        {**base, "input": "not stored", "store": False, "max_output_tokens": 2}))["id"])
    await c.json("extra_client_request_id.json", "POST", "/v1/responses",
                 {**base, "input": "x", "request_id": "resp_mine123", "max_output_tokens": 2})
    await c.json("extra_get_stream_unknown_404.json", "GET", "/v1/responses/resp_nope?stream=true")
    # A chain whose second turn changes the instructions, and a chain where the first turn's input
    # is a list with a system message (what is carried over).
    t1 = await c.json("extra_chain_a1.json", "POST", "/v1/responses", {
        **base, "max_output_tokens": 2, "input": [{"role": "system", "content": "SYS"},
                                                  {"role": "developer", "content": "DEV"},
                                                  {"role": "user", "content": "U1"}]})
    await c.json("extra_chain_a2.json", "POST", "/v1/responses", {
        **base, "max_output_tokens": 2, "instructions": "NEW", "input": "U2", "previous_response_id": t1["id"]})
    out1 = "".join(p["text"] for item in t1["output"] for p in item.get("content", []))
    await c.json("extra_chain_a2_tokenize.json", "POST", "/tokenize", {
        "model": MODEL, "messages": [{"role": "system", "content": "NEW"}, {"role": "developer", "content": "DEV"},
                                     {"role": "user", "content": "U1"}, {"role": "assistant", "content": out1},
                                     {"role": "user", "content": "U2"}]})
    # Anthropic: tool blocks without tools (no tool parser needed), tools with tool_choice none.
    tool_conv = [{"role": "user", "content": "Weather in Paris?"},
                 {"role": "assistant", "content": [
                     {"type": "text", "text": "Let me check."},
                     {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                               "content": "sunny"}, {"type": "text", "text": "So?"}]}]
    tools = [{"name": "get_weather", "description": "Weather of a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    mbase = {"model": MODEL, "temperature": 0, "max_tokens": 3}
    await c.json("extra_messages_tool_blocks.json", "POST", "/v1/messages", {**mbase, "messages": tool_conv})
    await c.json("extra_messages_tool_blocks_count.json", "POST", "/v1/messages/count_tokens",
                 {"model": MODEL, "messages": tool_conv})
    await c.json("extra_messages_tools_choice_none.json", "POST", "/v1/messages",
                 {**mbase, "messages": tool_conv, "tools": tools, "tool_choice": {"type": "none"}})
    await c.json("extra_messages_tools_choice_none_count.json", "POST", "/v1/messages/count_tokens",
                 {"model": MODEL, "messages": tool_conv, "tools": tools, "tool_choice": {"type": "none"}})
    await c.json("extra_messages_tool_blocks_render.json", "POST", "/v1/messages/render",
                 {**mbase, "messages": tool_conv})
    await c.call("extra_messages_stream_too_long.sse", "POST", "/v1/messages",
                 {**mbase, "max_tokens": 4000, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    await c.json("extra_messages_bad_role_400.json", "POST", "/v1/messages",
                 {**mbase, "messages": [{"role": "tool", "content": "x"}]})
    await c.json("extra_count_tokens_unknown_model.json", "POST", "/v1/messages/count_tokens",
                 {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    await c.json("extra_messages_stop_sequence.json", "POST", "/v1/messages",
                 {**mbase, "max_tokens": 20, "stop_sequences": ["handle"],
                  "messages": [{"role": "user", "content": "x"}]})
    await c.json("extra_responses_tool_items_render.json", "POST", "/v1/responses/render", {
        **base, "max_output_tokens": 3,
        "input": [{"role": "user", "content": "Weather in Paris?"},
                  {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                   "arguments": "{\"city\": \"Paris\"}"},
                  {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]})


async def scale_out_off(c: Capture) -> None:
    """Without --enable-scale-out (how the project's launcher starts vLLM): the render endpoints."""
    await c.json("responses_render.json", "POST", "/v1/responses/render", {"model": MODEL, "input": "x"})
    await c.json("messages_render.json", "POST", "/v1/messages/render",
                 {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
    await c.json("chat_render.json", "POST", "/v1/chat/completions/render",
                 {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})


async def store_off(c: Capture) -> None:
    base = {"model": MODEL, "temperature": 0, "ignore_eos": True, "max_output_tokens": 3}
    one = await c.json("responses.json", "POST", "/v1/responses", {**base, "input": "hi"})
    await c.json("get_404.json", "GET", f"/v1/responses/{one['id']}")
    await c.json("previous_404.json", "POST", "/v1/responses",
                 {**base, "input": "x", "previous_response_id": one["id"]})
    await c.json("background_400.json", "POST", "/v1/responses", {**base, "input": "x", "background": True})
    await c.json("cancel_404.json", "POST", f"/v1/responses/{one['id']}/cancel")


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-store", action="store_true")
    ap.add_argument("--extra", action="store_true", help="the second set of store-on captures (extra_*)")
    ap.add_argument("--no-scale-out", action="store_true",
                    help="without --enable-scale-out: the render endpoints (scale_out_off_*)")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    port = free_port()
    log = Path("/tmp") / f"capture-vllm-{port}.log"
    proc = start(port, not args.no_store, log, scale_out=not args.no_scale_out)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    print(log.read_text()[-3000:])
                    return 1
                try:
                    async with http.get(url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    return 1
                await asyncio.sleep(1)
            if args.no_scale_out:
                cap, run, name = Capture(http, url, "scale_out_off_"), scale_out_off, "index_scale_out_off.json"
            elif args.no_store:
                cap, run, name = Capture(http, url, "store_off_"), store_off, "index_store_off.json"
            elif args.extra:
                cap, run, name = Capture(http, url, ""), store_on_extra, "index_extra.json"
            else:
                cap, run, name = Capture(http, url, ""), store_on, "index.json"
            await run(cap)
            (OUT / name).write_text(json.dumps(cap.index, indent=1) + "\n")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
