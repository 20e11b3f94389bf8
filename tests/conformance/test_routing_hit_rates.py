"""The router's policies rank the same way on the simulator and on real vLLM.

One small multi-turn chat workload (three conversations, each with its own long system
prompt, turns interleaved) runs through the router in front of two replicas, once per
policy.  Round robin moves each conversation to the other replica every turn (three
conversations on two replicas), so a turn finds only the prefix its conversation left
there two turns ago; a prefix-aware policy keeps the conversation where its last turn is
cached.  The prefix-cache hit rate (cached / prompt tokens, from the responses' usage)
must order the policies the same way on both engine kinds.
"""

from __future__ import annotations

import aiohttp
from _conformance import MODEL, Engine, unique_text

POLICIES = ("round_robin", "prefix_affinity", "cache_aware")
CONVERSATIONS = 3
TURNS = 4


async def run_workload(http: aiohttp.ClientSession, url: str) -> float:
    """Hit rate of the workload sent to the router at `url`: sum(cached) / sum(prompt)."""
    systems = [unique_text(180) for _ in range(CONVERSATIONS)]
    history: list[list[dict]] = [[{"role": "system", "content": s}] for s in systems]
    cached = prompt = 0
    for _turn in range(TURNS):
        for conv in range(CONVERSATIONS):
            messages = history[conv] + [{"role": "user", "content": unique_text(25)}]
            async with http.post(url + "/v1/chat/completions", json={
                    "model": MODEL, "messages": messages, "max_tokens": 12,
                    "ignore_eos": True, "temperature": 0}) as resp:
                body = await resp.json()
                assert resp.status == 200, body
            usage = body["usage"]
            prompt += usage["prompt_tokens"]
            cached += usage["prompt_tokens_details"]["cached_tokens"]
            history[conv] = messages + [{"role": "assistant",
                                         "content": body["choices"][0]["message"]["content"]}]
    return cached / prompt


# Hit rates per engine kind, computed once per session (the workload takes a few seconds).
_RATES: dict[str, dict[str, float]] = {}
TIE = 0.05  # hit rates closer than this count as equal


async def rates_for(engine: Engine, start_router, make_routes, http) -> dict[str, float]:
    if engine.kind not in _RATES:
        rates = {}
        for policy in POLICIES:
            backends = [{"url": url, "kv_events": {"endpoint": kv, "topic": engine.topic}}
                        if kv else url for url, kv in zip(engine.urls, engine.kv_endpoints)]
            server = await start_router(make_routes(backends, model=MODEL, aliases=(),
                                                    policy=policy), timeout=30)
            try:
                rates[policy] = await run_workload(http, server.url)
            finally:
                await server.close()
        _RATES[engine.kind] = rates
    return _RATES[engine.kind]


def order(rates: dict[str, float]) -> dict[tuple[str, str], int]:
    """Pairwise comparison of round robin with each prefix-aware policy: -1, 0 (tie) or 1."""
    out = {}
    for policy in POLICIES[1:]:
        diff = rates[policy] - rates["round_robin"]
        out[(policy, "round_robin")] = 0 if abs(diff) < TIE else (1 if diff > 0 else -1)
    return out


async def test_prefix_aware_policies_beat_round_robin(engine, start_router, make_routes, http):
    rates = await rates_for(engine, start_router, make_routes, http)
    print(f"{engine.kind} hit rates: " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    assert rates["round_robin"] > 0, "round robin still hits the system prompt it left on a replica"
    assert order(rates) == {(p, "round_robin"): 1 for p in POLICIES[1:]}, rates


async def test_policy_order_is_the_same_on_sim_and_vllm(both_engines, start_router, make_routes,
                                                        http):
    rates = {kind: await rates_for(engine, start_router, make_routes, http)
             for kind, engine in both_engines.items()}
    assert order(rates["sim"]) == order(rates["vllm"]), rates
