"""The exact prefix index end to end: simulated replicas that tokenize with a real tokenizer.json
(the tiny Llama's) and publish vLLM's KV events, routers that subscribe to them.

What is checked against the replicas themselves: the tokens the router predicts cached on the
replica that answers equal the answer's ``usage.prompt_tokens_details.cached_tokens`` (the
replica's own count) within one block; lost events are replayed or, when the replay buffer no
longer has them, the replica is routed approximately until it re-learns; a restarted replica
is forgotten; a router started late learns what the replay buffer still holds; two routers
subscribed to the same replicas agree."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
from conftest import routes, wait_for

from benchmarks.runner import parse_prediction_counts
from engines.sim.process import SimProcess

MODEL = "sim-a"
BLOCK = 16
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
         "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def sim_args(tokenizer: str, blocks: int = 2000) -> list[str]:
    return ["--tokenizer", tokenizer, "--block-size", str(BLOCK), "--num-gpu-blocks", str(blocks),
            "--enable-prompt-tokens-details", "--max-model-len", "8192"]


def backend(sim: SimProcess) -> dict:
    return {"url": sim.url, "kv_events": {"endpoint": sim.kv_events_endpoint,
                                          "replay_endpoint": sim.kv_replay_endpoint}}


def exact_routes(sims: list[SimProcess], tokenizer: str, **exact: float) -> dict:
    doc = routes([backend(s) for s in sims], policy="cache_aware",
                 prefix={"exact": {"relearn_s": 0.5, **exact}})  # confirm_s: production's default
    doc["models"][0]["tokenizer"] = tokenizer
    return doc


async def complete(http: aiohttp.ClientSession, url: str, prompt: str | list[int], max_tokens: int = 2) -> int:
    async with http.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt,
                                                        "max_tokens": max_tokens}) as resp:
        await resp.read()
        return resp.status


async def make_exact_sims(make_sim, tokenizer: str, n: int, **kw) -> list[SimProcess]:
    return list(await asyncio.gather(*(make_sim(MODEL, kv_events=True, args=sim_args(tokenizer), **kw)
                                       for _ in range(n))))


async def wait_exact(router, n: int, timeout: float = 10.0) -> None:
    await wait_for(lambda: sum(router.exact.mode(r.id) == "exact" for r in router.fleet) == n, timeout,
                   message=f"{n} replica(s) in exact mode")


async def predictions(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    async with http.get(url + "/metrics") as resp:
        return parse_prediction_counts(await resp.text())


async def test_predicted_cached_tokens_match_the_replicas_answers(make_sim, start_router, http, tiny_tokenizer):
    sims = await make_exact_sims(make_sim, tiny_tokenizer, 2)
    server = await start_router(exact_routes(sims, tiny_tokenizer))
    await wait_exact(server.router, 2)
    rng = random.Random(7)
    system = text(rng, 300)
    answered = cached_seen = 0
    for _ in range(3):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": text(rng, 40)}]
        for turn in range(3):
            stream = turn == 2
            body = {"model": MODEL, "messages": messages, "max_tokens": 12, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
            async with http.post(server.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                if stream:
                    reply, usage = "", None
                    async for line in resp.content:
                        if line.startswith(b"data: {"):
                            chunk = json.loads(line[6:])
                            if chunk.get("usage"):
                                usage = chunk["usage"]
                            for choice in chunk.get("choices", []):
                                reply += choice.get("delta", {}).get("content") or ""
                else:
                    data = await resp.json()
                    reply, usage = data["choices"][0]["message"]["content"], data["usage"]
            answered += 1
            cached_seen += usage["prompt_tokens_details"]["cached_tokens"] > 0
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": text(rng, 30)}]
    # completions: a string prompt, then the same ids sent as token ids
    prompt = system + " " + text(rng, 20)
    ids = list(server.router.prompt_tokens.local(MODEL).tokens("/v1/completions", {"prompt": prompt}))
    for p in (prompt, ids):
        assert await complete(http, server.url, p, max_tokens=4) == 200
        answered += 1
    got = await predictions(http, server.url)
    assert got.get(("exact", "within_block"), 0) == answered, got
    assert server.router.exact.pending.records == 0  # every request ended: nothing pending
    assert cached_seen >= 6  # most turns found their history cached
    assert not any(index == "approximate" for index, _ in got)


async def test_lost_events_are_replayed_or_routed_approximately(make_sim, start_router, http, tiny_tokenizer):
    (sim,) = await make_exact_sims(make_sim, tiny_tokenizer, 1)
    server = await start_router(exact_routes([sim], tiny_tokenizer, relearn_s=1.0))
    router = server.router
    await wait_exact(router, 1)
    rid = sim.url
    rng = random.Random(3)
    await sim.set_faults(http, drop_events=0.5)
    prompts = [text(rng, 120) for _ in range(12)]
    for p in prompts:
        assert await complete(http, server.url, p) == 200
    await asyncio.sleep(0.3)
    # one more batch so the last gap is seen
    assert await complete(http, server.url, text(rng, 80)) == 200
    await wait_for(lambda: router.kv_events.stats(rid)["gaps"] > 0, 5, message="a gap")
    stats = router.kv_events.stats(rid)
    assert stats["gaps_replayed"] == stats["gaps"] and stats["gaps_lost"] == 0, stats
    assert router.exact.mode(rid) == "exact"
    tok = router.prompt_tokens.local(MODEL)
    for p in prompts:  # every prompt's blocks are known although half the batches were dropped
        ids = tok.tokens("/v1/completions", {"prompt": p})
        held = router.exact.blocks.match(router.exact.request_hashes(MODEL, ids, BLOCK, None), (rid,))[rid]
        assert held == len(ids) // BLOCK
    # now the dropped batches leave the replay buffer too: the gap cannot be recovered
    await sim.set_faults(http, drop_events=0.5, drop_events_replay=True)
    for _ in range(8):
        assert await complete(http, server.url, text(rng, 60)) == 200
    await wait_for(lambda: router.kv_events.stats(rid)["gaps_lost"] > 0, 5, message="a lost gap")
    assert router.exact.mode(rid) == "approximate"
    async with http.get(server.url + "/admin/replicas") as r:
        shown = (await r.json())["replicas"][0]["kv_events"]
    assert shown["gaps_lost"] > 0 and shown["connected"] is True
    await sim.set_faults(http, clear=True)
    await asyncio.sleep(1.1)  # relearn_s
    assert await complete(http, server.url, text(rng, 60)) == 200
    await wait_for(lambda: router.exact.mode(rid) == "exact", 5, message="exact again after re-learning")


async def test_a_restarted_replica_is_forgotten(make_sim, start_router, http, tiny_tokenizer):
    (sim,) = await make_exact_sims(make_sim, tiny_tokenizer, 1)
    server = await start_router(exact_routes([sim], tiny_tokenizer))
    router = server.router
    await wait_exact(router, 1)
    rid = sim.url
    prompt = text(random.Random(5), 200)
    assert await complete(http, server.url, prompt) == 200
    await wait_for(lambda: router.exact.blocks.replica_blocks(rid) > 0, 5, message="blocks learned")
    await sim.stop()
    again = SimProcess(MODEL, port=sim.port, kv_events=True, args=sim_args(tiny_tokenizer), time_scale=50)
    again.kv_port, again.replay_port = sim.kv_port, sim.replay_port
    await again.start()
    try:
        # another prompt's request makes the new engine publish from sequence 0, and the
        # monitor sees its prefix-cache counters start over
        async with http.post(again.url + "/v1/completions",
                             json={"model": MODEL, "prompt": text(random.Random(6), 50), "max_tokens": 2}):
            pass
        await wait_for(lambda: router.kv_events.stats(rid)["restarts"] >= 1, 10, message="the restart seen")
        ids = router.prompt_tokens.local(MODEL).tokens("/v1/completions", {"prompt": prompt})
        await wait_for(lambda: router.exact.match(MODEL, ids, None, [rid])[rid] == 0, 5,
                       message="the old prompt forgotten")
        assert router.exact.mode(rid) == "exact"
    finally:
        await again.stop()


async def test_a_router_started_late_replays_what_it_can(make_sim, start_router, http, tiny_tokenizer):
    (sim,) = await make_exact_sims(make_sim, tiny_tokenizer, 1)
    prompt = text(random.Random(8), 150)
    assert await complete(http, sim.url, prompt) == 200
    server = await start_router(exact_routes([sim], tiny_tokenizer))
    router = server.router
    await wait_exact(router, 1)
    ids = router.prompt_tokens.local(MODEL).tokens("/v1/completions", {"prompt": prompt})
    await wait_for(lambda: router.exact.match(MODEL, ids, None, [sim.url])[sim.url] > 0, 5,
                   message="the earlier prompt learned from the replay")
    assert router.kv_events.stats(sim.url)["replays"] >= 1


async def test_two_routers_see_the_same_matches(make_sim, start_router, http, tiny_tokenizer):
    sims = await make_exact_sims(make_sim, tiny_tokenizer, 2)
    one = await start_router(exact_routes(sims, tiny_tokenizer, confirm_s=0.0))
    two = await start_router(exact_routes(sims, tiny_tokenizer, confirm_s=0.0))
    await wait_exact(one.router, 2)
    await wait_exact(two.router, 2)
    rng = random.Random(11)
    prompts = [text(rng, rng.randint(40, 200)) for _ in range(10)]
    for i, p in enumerate(prompts):  # half through each router
        url = (one if i % 2 else two).url
        assert await complete(http, url, p) == 200
    ids = [one.router.prompt_tokens.local(MODEL).tokens("/v1/completions", {"prompt": p + " more"}) for p in prompts]
    urls = [s.url for s in sims]

    def same() -> bool:
        a = [one.router.exact.match(MODEL, t, None, urls) for t in ids]
        b = [two.router.exact.match(MODEL, t, None, urls) for t in ids]
        return a == b and all(max(m.values()) > 0 for m in a)

    await wait_for(same, 5, message="both routers' matches equal and non-zero")


async def test_no_tokenizer_or_a_failing_template_routes_approximately(make_sim, start_router, http, tiny_tokenizer):
    (sim,) = await make_exact_sims(make_sim, tiny_tokenizer, 1)
    server = await start_router(exact_routes([sim], tiny_tokenizer))
    await wait_exact(server.router, 1)
    # A null content breaks the template's string concatenation: the router's render fails,
    # and the request is still forwarded, so the answer is the replica's own 400.
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": None}]}
    async with http.post(server.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 400
        assert "chat template failed" in (await r.json())["error"]["message"]  # the simulator's words
    # The same replica behind a router whose model has no tokenizer: routed, and predicted,
    # by the approximate index only.
    plain = routes([backend(sim)], policy="cache_aware")
    other = await start_router(plain)
    await wait_exact(other.router, 1)  # its stream is trusted, but requests have no token ids
    assert await complete(http, other.url, text(random.Random(2), 80)) == 200
    assert set(await predictions(http, other.url)) == {("approximate", "within_block")}


async def test_replica_tokenization_needs_no_tokenizer_file(make_sim, start_router, http):
    """`tokenizer: replica`: the router asks the replica's /tokenize (here the simulator's own
    chunk tokenizer, which no tokenizer.json describes) and still predicts exactly."""
    sims = list(await asyncio.gather(*(make_sim(MODEL, kv_events=True, args=[
        "--block-size", str(BLOCK), "--num-gpu-blocks", "2000", "--enable-prompt-tokens-details"])
        for _ in range(2))))
    doc = routes([backend(s) for s in sims], policy="cache_aware", prefix={"exact": {"confirm_s": 0.5}})
    doc["models"][0]["tokenizer"] = "replica"
    server = await start_router(doc)
    await wait_exact(server.router, 2)
    rng = random.Random(21)
    system = text(rng, 200)
    for i in range(6):
        body = {"model": MODEL, "max_tokens": 4, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": text(rng, 10 + i)}]}
        async with http.post(server.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
    got = await predictions(http, server.url)
    assert got == {("exact", "within_block"): 6.0}, got
    stats = server.router.prompt_tokens.remote.stats()
    assert stats["misses"] == 6 and stats["failures"] == 0


async def test_a_replica_that_advertises_its_events_is_subscribed(make_sim, start_router, http, tiny_tokenizer):
    """No `kv_events:` in routes.yaml: the router reads the replica's GET /kv_event_sources."""
    (sim,) = await make_exact_sims(make_sim, tiny_tokenizer, 1)
    doc = routes([sim.url], policy="cache_aware")
    doc["models"][0]["tokenizer"] = tiny_tokenizer
    server = await start_router(doc)
    await wait_exact(server.router, 1)
    replica = next(iter(server.router.fleet))
    assert replica.kv_events_endpoint == sim.kv_events_endpoint
    assert replica.kv_replay_endpoint == sim.kv_replay_endpoint
    assert await complete(http, server.url, text(random.Random(4), 100)) == 200
    await wait_for(lambda: server.router.exact.blocks.replica_blocks(sim.url) > 0, 5, message="events applied")


async def test_a_replica_removed_and_added_again_is_subscribed_again(make_sim, start_router, http, tiny_tokenizer):
    static, sim = await make_exact_sims(make_sim, tiny_tokenizer, 2)
    admin = "admin-key-0123456789"
    doc = exact_routes([static], tiny_tokenizer)
    doc["auth"] = {"admin_key": admin}
    server = await start_router(doc)
    router = server.router
    url = server.url + "/admin/replicas"
    auth = {"Authorization": f"Bearer {admin}"}
    entry = {"model": MODEL, **backend(sim)}
    async with http.post(url, json=entry, headers=auth) as r:
        assert r.status == 201, await r.text()
    await wait_exact(router, 2)
    async with http.delete(url, json={"model": MODEL, "url": sim.url}, headers=auth) as r:
        assert r.status == 200, await r.text()
    async with http.post(url, json=entry, headers=auth) as r:  # at once, before the old socket closed
        assert r.status == 201, await r.text()
    await wait_for(lambda: sim.url in router.kv_events.subscriptions, 5, message="subscribed again")
    await wait_exact(router, 2)
    await complete(http, sim.url, text(random.Random(9), 100))  # straight to it: its events reach the router
    await wait_for(lambda: router.exact.blocks.replica_blocks(sim.url) > 0, 5, message="events applied")


async def test_a_reload_whose_tokenizer_does_not_load_changes_nothing(make_sim, start_router, http, tiny_tokenizer,
                                                                      tmp_path):
    import yaml

    from router.config import load_config

    (sim,) = await make_exact_sims(make_sim, tiny_tokenizer, 1)
    path = tmp_path / "routes.yaml"
    doc = exact_routes([sim], tiny_tokenizer)
    doc["auth"] = {"admin_key": "admin-key-0123456789"}
    path.write_text(yaml.safe_dump(doc))
    server = await start_router(load_config(path))
    before = server.router.prompt_tokens.local(MODEL)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not a tokenizer")
    doc["models"][0]["tokenizer"] = str(broken)
    doc["routing"] = {"policy": "least_load"}
    path.write_text(yaml.safe_dump(doc))
    async with http.post(server.url + "/admin/reload",
                         headers={"Authorization": "Bearer admin-key-0123456789"}) as r:
        assert r.status == 400
        assert "models[0].tokenizer" in (await r.json())["error"]["message"]
    assert server.router.prompt_tokens.local(MODEL) is before
    assert server.router.policy.name == "cache_aware"  # nothing changed


async def test_exact_mode_predicts_the_agentic_apis_cached_tokens(make_sim, start_router, http, tiny_tokenizer):
    """Responses and Anthropic Messages conversations tokenized by the model's chat template
    (router/prefix/agentic.py maps them onto chat messages, as vLLM does): the tokens the
    router predicts cached equal what the replica reports, turn after turn."""
    sims = await make_exact_sims(make_sim, tiny_tokenizer, 2)
    server = await start_router(exact_routes(sims, tiny_tokenizer))
    await wait_exact(server.router, 2)
    rng = random.Random(11)
    system = text(rng, 300)
    answered = cached_seen = 0
    for api in ("responses", "messages"):
        turns: list = [{"role": "user", "content": text(rng, 40)}]
        for _ in range(3):
            if api == "responses":
                body = {"model": MODEL, "instructions": system, "input": turns, "max_output_tokens": 8}
            else:
                body = {"model": MODEL, "system": system, "messages": turns, "max_tokens": 8}
            async with http.post(server.url + f"/v1/{api}", json=body) as resp:
                data = await resp.json()
                assert resp.status == 200, data
            if api == "responses":
                reply = data["output"][0]["content"][0]["text"]
                cached = data["usage"]["input_tokens_details"]["cached_tokens"]
            else:
                reply = data["content"][0]["text"]
                cached = data["usage"].get("cache_read_input_tokens") or 0
            answered += 1
            cached_seen += cached > 0
            turns += [{"role": "assistant", "content": reply}, {"role": "user", "content": text(rng, 30)}]
    got = await predictions(http, server.url)
    assert got.get(("exact", "within_block"), 0) == answered, got
    assert server.router.exact.pending.records == 0  # every request ended: nothing pending
    assert cached_seen >= 4
