"""Disaggregated prefill/decode through the router, against simulated replicas speaking vLLM's
NixlConnector protocol (engines/sim/kv_transfer.py): prefill replicas that hold their KV
blocks and answer kv_transfer_params, decode replicas that read them.

Checked on the replicas themselves (their /admin/stats: answered requests, KV reads and
failed reads, requests in flight) and on the answers: the decode replica's cached_tokens
covers the prompt the prefill replica computed."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
from conftest import MODEL, routes, wait_async

from engines.sim.process import SimProcess

PD = ["--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}']
LONG = " ".join(f"token{i}" for i in range(400))  # ~1,500 characters: over min_prompt_tokens


async def stats(http: aiohttp.ClientSession, sim: SimProcess) -> dict:
    async with http.get(sim.url + "/admin/stats") as resp:
        return await resp.json()


async def pd_fleet(make_sim, start_router, *, prefill_args=(), decode_args=(), n_prefill=2,
                   n_decode=2, **disaggregation):
    prefills = await asyncio.gather(*(make_sim(args=PD + list(prefill_args)) for _ in range(n_prefill)))
    decodes = await asyncio.gather(*(make_sim(args=PD + list(decode_args)) for _ in range(n_decode)))
    backends = [{"url": s.url, "role": "prefill"} for s in prefills] + \
               [{"url": s.url, "role": "decode"} for s in decodes]
    doc = routes(backends, policy="cache_aware")
    doc["models"][0]["disaggregation"] = {"min_prompt_tokens": 64, **disaggregation}
    server = await start_router(doc)
    return server, list(prefills), list(decodes)


async def pd_paths(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("router_pd_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            path = labels.split('path="')[1].split('"')[0]
            out[path] = float(value)
    return out


async def total(http, sims, key):
    return sum([(await stats(http, s))[key] for s in sims])


async def test_pd_end_to_end_through_the_openai_sdk(make_sim, start_router, http):
    server, prefills, decodes = await pd_fleet(make_sim, start_router)
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    comp = await client.completions.create(model=MODEL, prompt=LONG, max_tokens=8)
    assert comp.usage.completion_tokens == 8 and len(comp.choices[0].text) > 0
    cached = comp.usage.prompt_tokens_details.cached_tokens
    assert cached == comp.usage.prompt_tokens - 1  # every prompt token came from the prefill
    assert await total(http, prefills, "answered") == 1
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": LONG}], max_tokens=6, stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].usage.prompt_tokens - 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert await total(http, prefills, "answered") == 2
    assert sum([(await stats(http, s))["kv_transfer"]["reads"] for s in decodes]) == 2
    # Short prompts skip the prefill hop.
    short = await client.completions.create(model=MODEL, prompt="hi there", max_tokens=3)
    assert short.usage.completion_tokens == 3
    assert await total(http, prefills, "answered") == 2
    paths = await pd_paths(http, server.url)
    assert paths == {"disaggregated": 2.0, "skipped_short_prompt": 1.0}
    await client.close()


async def test_each_hop_fails_over_before_its_first_byte(make_sim, start_router, http):
    server, prefills, decodes = await pd_fleet(make_sim, start_router)
    await prefills[0].set_faults(http, fail_rate=1.0)
    await decodes[0].set_faults(http, fail_rate=1.0)
    for i in range(6):
        async with http.post(server.url + "/v1/completions",
                             json={"model": MODEL, "prompt": f"{i} {LONG}", "max_tokens": 4}) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == body["usage"]["prompt_tokens"] - 1
    assert (await stats(http, prefills[1]))["answered"] == 6
    assert (await stats(http, decodes[1]))["answered"] == 6
    assert (await stats(http, decodes[1]))["kv_transfer"]["reads"] == 6


async def test_a_client_that_leaves_aborts_the_prefill_hop(make_sim, start_router, http):
    server, prefills, decodes = await pd_fleet(make_sim, start_router, n_prefill=1, n_decode=1)
    await prefills[0].set_faults(http, hang_rate=1.0)
    try:
        async with http.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": LONG, "max_tokens": 4},
                             timeout=aiohttp.ClientTimeout(total=0.5)) as resp:
            await resp.read()
    except TimeoutError:
        pass

    async def prefill_idle() -> bool:
        return (await stats(http, prefills[0]))["in_flight"] == 0
    await wait_async(prefill_idle, 5, message="the prefill replica's request aborted")
    assert (await stats(http, decodes[0]))["in_flight"] == 0
    assert (await stats(http, decodes[0]))["kv_transfer"]["reads"] == 0


async def test_a_client_that_leaves_aborts_the_decode_hop(make_sim, start_router, http):
    server, prefills, decodes = await pd_fleet(make_sim, start_router, n_prefill=1, n_decode=1)
    async with http.post(server.url + "/v1/completions",
                         json={"model": MODEL, "prompt": LONG, "max_tokens": 4000, "stream": True}) as resp:
        assert resp.status == 200
        await resp.content.readany()  # the decode replica is streaming now
    # the connection is closed: the router closes the decode hop, vLLM aborts it

    async def decode_idle() -> bool:
        seen = await stats(http, decodes[0])
        return seen["in_flight"] == 0 and seen["running"] == 0
    await wait_async(decode_idle, 5, message="the decode replica's request aborted")
    assert (await stats(http, decodes[0]))["answered"] == 0  # it never finished
    assert (await stats(http, prefills[0]))["answered"] == 1


async def test_a_decode_replica_that_cannot_read_the_transfer_gets_a_clear_error(make_sim, start_router, http):
    # The prefill's lease ends at once: its blocks are gone when the decode replica reads.
    server, prefills, decodes = await pd_fleet(make_sim, start_router, n_prefill=1,
                                               prefill_args=["--kv-lease-s", "0.0001"])
    async with http.post(server.url + "/v1/completions",
                         json={"model": MODEL, "prompt": LONG, "max_tokens": 4}) as resp:
        body = await resp.json()
    assert resp.status == 502
    assert "decode replica could not complete" in body["error"]["message"]
    assert "127.0.0.1" not in body["error"]["message"]
    failures = sum([(await stats(http, s))["kv_transfer"]["read_failures"] for s in decodes])
    assert failures == 3  # proxy.max_attempts attempts over both decode replicas, then the clear error


async def test_clients_may_not_send_kv_transfer_params(make_sim, start_router, http):
    server, _, decodes = await pd_fleet(make_sim, start_router, n_prefill=1, n_decode=1)
    params = {"do_remote_prefill": True, "remote_engine_id": "x", "remote_request_id": "y",
              "remote_host": "10.0.0.1", "remote_port": 22}
    async with http.post(server.url + "/v1/completions",
                         json={"model": MODEL, "prompt": LONG, "max_tokens": 4, "kv_transfer_params": params}) as resp:
        body = await resp.json()
    assert resp.status == 400 and body["error"]["param"] == "kv_transfer_params"
    assert (await stats(http, decodes[0]))["kv_transfer"]["reads"] == 0
