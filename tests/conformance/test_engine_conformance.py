"""The same checks against the simulator and real vLLM: API shape, usage, metrics, caching, load.

Every test takes `engine` (once per kind: sim always, real vLLM CPU when installed).  Tests
use text nobody else sends, so they do not share cached prefixes.  Metrics are read as
deltas around each action (other tests ran before on the same replica).
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from _conformance import (
    BLOCK_SIZE,
    MODEL,
    NUM_BLOCKS,
    Engine,
    complete,
    counters,
    metric,
    post_json,
    scrape,
    sse,
    tokenize,
    unique_text,
    value,
    wait_for,
)

# The metric families the router and the benchmarks read, with their type and label names
# (shared/reference/vllm_metric_names.txt, real vLLM 0.32).  Counters are named without
# `_total` here, as the Prometheus parser names their families.
BASE = frozenset({"engine", "model_name"})
EXPECTED_FAMILIES = {
    "vllm:num_requests_running": ("gauge", BASE),
    "vllm:num_requests_waiting": ("gauge", BASE),
    "vllm:kv_cache_usage_perc": ("gauge", BASE),
    "vllm:prefix_cache_queries": ("counter", BASE),
    "vllm:prefix_cache_hits": ("counter", BASE),
    "vllm:prompt_tokens": ("counter", BASE),
    "vllm:prompt_tokens_cached": ("counter", BASE),
    "vllm:generation_tokens": ("counter", BASE),
    "vllm:num_preemptions": ("counter", BASE),
    "vllm:request_success": ("counter", BASE | {"finished_reason"}),
    "vllm:time_to_first_token_seconds": ("histogram", BASE),
    "vllm:inter_token_latency_seconds": ("histogram", BASE),
    "vllm:e2e_request_latency_seconds": ("histogram", BASE),
    # No model_name on this one in real vLLM 0.32 (the reference names file lists it; the
    # scrape in metrics_sample.txt shows it is not there): engine + the 37 CacheConfig fields.
    "vllm:cache_config_info": ("gauge", frozenset({"engine", "block_size", "num_gpu_blocks",
                                                   "enable_prefix_caching"})),
}


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def text_of_tokens(http, engine: Engine, target: int) -> tuple[str, list[int]]:
    """Unique text of about `target` tokens on this engine's tokenizer (never a block multiple)."""
    n_words = max(4, target // 2)
    for _ in range(6):
        text = unique_text(n_words)
        ids = await tokenize(http, engine, text)
        if abs(len(ids) - target) <= max(8, target // 10) and len(ids) % engine.block_size:
            return text, ids
        n_words = max(4, int(n_words * target / max(len(ids), 1)) + (1 if len(ids) % engine.block_size == 0 else 0))
    return text, ids


# -- /metrics ------------------------------------------------------------------------------------

async def test_metric_families_have_vllm_names_types_and_labels(engine, http):
    await complete(http, engine, unique_text(20), max_tokens=3)
    families = await scrape(http, engine.url)
    for name, (kind, labels) in EXPECTED_FAMILIES.items():
        assert name in families, f"{engine}: /metrics lacks {name}"
        fam = families[name]
        assert fam.type == kind, f"{engine}: {name} is a {fam.type}, vLLM's is a {kind}"
        assert fam.samples, f"{engine}: {name} has no samples"
        for sample, lab, _ in fam.samples:
            keys = set(lab) - {"le"}
            if name == "vllm:cache_config_info":
                assert labels <= keys, f"{engine}: {name} lacks labels {labels - keys}"
            elif not sample.endswith("_created"):
                assert keys == labels, f"{engine}: {sample} has labels {sorted(keys)}, want {sorted(labels)}"
            assert lab.get("model_name", MODEL) == MODEL
    info = families["vllm:cache_config_info"].samples[0][1]
    assert info["block_size"] == str(BLOCK_SIZE)
    assert info["num_gpu_blocks"] == str(NUM_BLOCKS)
    assert info["enable_prefix_caching"] == "True"
    reasons = {lab["finished_reason"] for s, lab, _ in families["vllm:request_success"].samples
               if s.endswith("_total")}
    assert "length" in reasons and "stop" in reasons
    hist = families["vllm:e2e_request_latency_seconds"]
    assert {s for s, _, _ in hist.samples} >= {
        "vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
        "vllm:e2e_request_latency_seconds_count"}


async def test_sim_and_vllm_export_the_same_families(both_engines, http):
    """Every vllm: family real vLLM exports, the simulator exports too, with the same type
    and label names (cache_config_info: the same 37 config labels)."""
    fams = {}
    for kind, eng in both_engines.items():
        await complete(http, eng, unique_text(10), max_tokens=2)
        fams[kind] = await scrape(http, eng.url)
    real, sim = fams["vllm"], fams["sim"]
    for name in EXPECTED_FAMILIES:
        assert sim[name].type == real[name].type
        sim_keys = {frozenset(lab) for _, lab, _ in sim[name].samples}
        real_keys = {frozenset(lab) for _, lab, _ in real[name].samples}
        assert sim_keys == real_keys, f"{name}: sim labels {sim_keys} != vLLM labels {real_keys}"
    real_reasons = {lab["finished_reason"] for s, lab, _ in real["vllm:request_success"].samples}
    sim_reasons = {lab["finished_reason"] for s, lab, _ in sim["vllm:request_success"].samples}
    assert sim_reasons == real_reasons


# -- responses -----------------------------------------------------------------------------------

async def test_completion_usage_and_shape(engine, http):
    body = await complete(http, engine, unique_text(30), max_tokens=5)
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str)
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


async def test_chat_completion_usage_and_shape(engine, http):
    body = await post_json(http, engine.url + "/v1/chat/completions", {
        "model": MODEL, "max_tokens": 4, "ignore_eos": True,
        "messages": [{"role": "user", "content": unique_text(12)}]})
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4
    assert "cached_tokens" in body["usage"]["prompt_tokens_details"]


async def _stream(http, engine, path, body) -> list[str]:
    async with http.post(engine.url + path, json={**body, "stream": True,
                                                  "stream_options": {"include_usage": True}}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return [data async for data in sse(resp)]


async def test_completion_stream_chunks_usage_and_done(engine, http):
    events = await _stream(http, engine, "/v1/completions", {
        "model": MODEL, "prompt": unique_text(20), "max_tokens": 6, "ignore_eos": True})
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    *content, last = chunks
    assert len({c["id"] for c in chunks}) == 1
    for c in chunks:
        assert c["object"] == "text_completion" and c["model"] == MODEL
        assert isinstance(c["created"], int)
    assert 1 <= len(content) <= 6
    for c in content:
        (choice,) = c["choices"]
        assert set(choice) >= {"index", "text", "logprobs", "finish_reason"}
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * (len(content) - 1) + ["length"]
    assert last["choices"] == []
    usage = last["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6


async def test_chat_stream_chunks_usage_and_done(engine, http):
    events = await _stream(http, engine, "/v1/chat/completions", {
        "model": MODEL, "max_tokens": 5, "ignore_eos": True,
        "messages": [{"role": "user", "content": unique_text(10)}]})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    first, *content, last = chunks
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["finish_reason"] is None
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert all("content" in c["choices"][0]["delta"] for c in content)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5


async def test_unknown_model_is_a_404_in_vllm_shape(engine, http):
    async with http.post(engine.url + "/v1/completions",
                         json={"model": "no-such-model", "prompt": "x", "max_tokens": 1}) as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["error"]["code"] == 404
    assert body["error"]["type"] == "NotFoundError"
    assert "no-such-model" in body["error"]["message"]


async def test_models_lists_max_model_len(engine, http):
    async with http.get(engine.url + "/v1/models") as resp:
        body = await resp.json()
    (card,) = body["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == 2048


# -- prefix caching --------------------------------------------------------------------------------

async def test_repeated_prompt_hits_whole_blocks(engine, http):
    text, ids = await text_of_tokens(http, engine, 600)
    n = len(ids)
    bs = engine.block_size
    expected_hits = (n - 1) // bs * bs  # whole blocks; the last token is always recomputed

    before = await counters(http, engine.url)
    first = await complete(http, engine, text, max_tokens=1)
    assert first["usage"]["prompt_tokens"] == n
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    mid = await wait_for(lambda: _counters_past(http, engine, before, "vllm:prefix_cache_queries_total", n))
    assert mid["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"] == n
    assert mid["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] == 0
    assert mid["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == n

    second = await complete(http, engine, text, max_tokens=1)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == expected_hits
    after = await wait_for(lambda: _counters_past(http, engine, mid, "vllm:prefix_cache_queries_total", n))
    assert after["vllm:prefix_cache_queries_total"] - mid["vllm:prefix_cache_queries_total"] == n
    assert after["vllm:prefix_cache_hits_total"] - mid["vllm:prefix_cache_hits_total"] == expected_hits
    assert after["vllm:prompt_tokens_cached_total"] - mid["vllm:prompt_tokens_cached_total"] == expected_hits
    assert after["vllm:prompt_tokens_total"] - mid["vllm:prompt_tokens_total"] == n


async def test_shared_prefix_hits_and_unrelated_prompt_does_not(engine, http):
    prefix, prefix_ids = await text_of_tokens(http, engine, 400)
    await complete(http, engine, prefix + " tail one", max_tokens=1)
    await asyncio.sleep(0.2)
    before = await counters(http, engine.url)
    shared = await complete(http, engine, prefix + " and then a different ending", max_tokens=1)
    cached = shared["usage"]["prompt_tokens_details"]["cached_tokens"]
    # All whole blocks of the common prefix hit (the block holding the join may not).
    assert cached >= (len(prefix_ids) // engine.block_size - 1) * engine.block_size
    assert cached % engine.block_size == 0
    mid = await wait_for(lambda: _counters_past(http, engine, before, "vllm:prefix_cache_hits_total", cached))
    assert mid["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] == cached

    unrelated = await complete(http, engine, unique_text(300), max_tokens=1)
    assert unrelated["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    n = unrelated["usage"]["prompt_tokens"]
    after = await wait_for(lambda: _counters_past(http, engine, mid, "vllm:prefix_cache_queries_total", n))
    assert after["vllm:prefix_cache_hits_total"] == mid["vllm:prefix_cache_hits_total"]
    assert after["vllm:prefix_cache_queries_total"] - mid["vllm:prefix_cache_queries_total"] == n


async def _counters_past(http, engine, base, name, delta):
    now = await counters(http, engine.url)
    return now if now[name] - base[name] >= delta else None


# -- load: a small KV cache fills, requests wait ---------------------------------------------------

async def test_kv_usage_and_waiting_move_under_load(engine, http):
    async def gauges():
        fams = await scrape(http, engine.url)
        return {k: value(fams, f"vllm:{k}") for k in
                ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting")}

    idle = await wait_for(lambda: _idle(gauges), timeout=20)
    assert idle, "engine not idle before the load test"
    assert idle["kv_cache_usage_perc"] == 0.0
    # Each prompt needs ~29 of the 80 blocks: two run, the others wait for blocks.
    prompts = [(await text_of_tokens(http, engine, 900))[0] for _ in range(4)]
    tasks = [asyncio.create_task(complete(http, engine, p, max_tokens=48)) for p in prompts]
    peak = {"kv_cache_usage_perc": 0.0, "num_requests_running": 0.0, "num_requests_waiting": 0.0}
    while not all(t.done() for t in tasks):
        g = await gauges()
        for k in peak:
            peak[k] = max(peak[k], g[k])
        await asyncio.sleep(0.01)
    results = await asyncio.gather(*tasks)
    assert all(r["usage"]["completion_tokens"] == 48 for r in results)
    assert peak["kv_cache_usage_perc"] >= 0.5, peak
    assert peak["kv_cache_usage_perc"] <= 1.0, peak
    assert peak["num_requests_running"] >= 1, peak
    assert peak["num_requests_waiting"] >= 1, peak
    end = await wait_for(lambda: _idle(gauges), timeout=10)
    assert end and end["kv_cache_usage_perc"] == 0.0, end


async def _idle(gauges):
    g = await gauges()
    return g if g["num_requests_running"] == 0 and g["num_requests_waiting"] == 0 \
        and g["kv_cache_usage_perc"] == 0 else None


# -- client disconnect aborts -----------------------------------------------------------------------

async def test_client_disconnect_aborts_the_request(engine, http):
    """Closing the connection mid-stream aborts the request: it leaves the running batch at
    once, stops generating, and is not counted as a success (vLLM counts finished requests
    only; an abort pops the request without a finish record)."""

    async def successes() -> float:
        return await metric(http, engine.url, "vllm:request_success_total")

    await wait_for(lambda: _zero_running(http, engine), timeout=10)
    before_gen = await metric(http, engine.url, "vllm:generation_tokens_total")
    before_ok = await successes()
    max_tokens = 1900
    async with aiohttp.ClientSession() as own:  # closed below: the disconnect
        resp = await own.post(engine.url + "/v1/completions", json={
            "model": MODEL, "prompt": unique_text(8), "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True})
        assert resp.status == 200
        got = 0
        async for _ in sse(resp):
            got += 1
            if got >= 3:
                break
        resp.close()  # the request is streaming (3 chunks in): hang up now
    loop = asyncio.get_running_loop()
    closed_at = loop.time()
    stopped = await wait_for(lambda: _zero_running(http, engine), timeout=5.0, interval=0.02)
    assert stopped, "the request kept running after the client went away"
    assert loop.time() - closed_at < 2.0
    await asyncio.sleep(0.3)
    generated = await metric(http, engine.url, "vllm:generation_tokens_total") - before_gen
    assert 3 <= generated < max_tokens, f"{generated} tokens generated: not aborted"
    assert await successes() == before_ok, "an aborted request was counted as a success"


async def _zero_running(http, engine):
    return await metric(http, engine.url, "vllm:num_requests_running") == 0


# -- sim vs real: the same JSON keys everywhere ------------------------------------------------------

def shape(obj: dict) -> dict[str, list[str]]:
    """The key sets of a response object and of its nested parts that clients read."""
    out = {"": sorted(obj)}
    for key in ("usage",):
        if isinstance(obj.get(key), dict):
            out[key] = sorted(obj[key])
            if isinstance(obj[key].get("prompt_tokens_details"), dict):
                out[key + ".prompt_tokens_details"] = sorted(obj[key]["prompt_tokens_details"])
    if obj.get("choices"):
        choice = obj["choices"][0]
        out["choices[0]"] = sorted(choice)
        for key in ("message", "delta"):
            if isinstance(choice.get(key), dict):
                out[f"choices[0].{key}"] = sorted(choice[key])
    return out


async def _shapes(http, engine: Engine) -> dict[str, dict]:
    prompt = unique_text(12)
    messages = [{"role": "user", "content": unique_text(12)}]
    base = {"model": MODEL, "max_tokens": 3, "ignore_eos": True}
    shapes = {
        "completion": shape(await post_json(http, engine.url + "/v1/completions",
                                            {**base, "prompt": prompt})),
        "chat": shape(await post_json(http, engine.url + "/v1/chat/completions",
                                      {**base, "messages": messages})),
    }
    events = await _stream(http, engine, "/v1/completions", {**base, "prompt": prompt})
    chunks = [json.loads(e) for e in events[:-1]]
    shapes["completion chunk"] = shape(chunks[0])
    shapes["completion last chunk"] = shape(chunks[-2])
    shapes["completion usage chunk"] = shape(chunks[-1])
    events = await _stream(http, engine, "/v1/chat/completions", {**base, "messages": messages})
    chunks = [json.loads(e) for e in events[:-1]]
    shapes["chat role chunk"] = shape(chunks[0])
    shapes["chat chunk"] = shape(chunks[1])
    shapes["chat last chunk"] = shape(chunks[-2])
    shapes["chat usage chunk"] = shape(chunks[-1])
    return shapes


async def test_sim_and_vllm_responses_have_the_same_keys(both_engines, http):
    real = await _shapes(http, both_engines["vllm"])
    sim = await _shapes(http, both_engines["sim"])
    diffs = []
    for what in real:
        for part in sorted(set(real[what]) | set(sim[what])):
            r, s = set(real[what].get(part, [])), set(sim[what].get(part, []))
            if r != s:
                diffs.append(f"{what} {part or '(top)'}: sim lacks {sorted(r - s)}, "
                             f"sim adds {sorted(s - r)}")
    assert not diffs, "\n".join(diffs)
