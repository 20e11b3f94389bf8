"""LoRA-adapter-aware routing against simulated replicas that serve adapters like vLLM 0.32
(--lora-modules, --max-loras, runtime loading, vllm:lora_requests_info; engines/sim/lora.py).

Checked on the replicas themselves (their /admin/stats: adapter loads into GPU slots, which
adapters sit in the slots, requests answered): adapter requests go where the adapter is
loaded while such a replica exists; a burst for one adapter spreads; the router's dynamic
loading is single-flight and its failures are OpenAI-shaped without a path or a URL;
/v1/models through the router lists adapters with their parent."""

from __future__ import annotations

import asyncio

import aiohttp
from conftest import MODEL, routes, wait_for

from engines.sim.process import SimProcess
from router.fleet.adapter_slots import MAX_SLOTS, AdapterSlots
from router.fleet.engine_load import EngineLoad
from router.fleet.vllm_metrics import parse_engine_load

ADAPTERS = ("a1", "a2", "a3")


def lora_args(*, modules: tuple[str, ...] = ADAPTERS, max_loras: int = 1, load_s: float = 0.5,
              runtime: bool = False) -> list[str]:
    args = ["--enable-lora", "--max-loras", str(max_loras), "--lora-load-s", str(load_s)]
    if modules:
        args += ["--lora-modules", *(f"{m}=/adapters/{m}" for m in modules)]
    if runtime:
        args.append("--allow-runtime-lora-updating")
    return args


async def stats(http: aiohttp.ClientSession, sim: SimProcess) -> dict:
    async with http.get(sim.url + "/admin/stats") as resp:
        return await resp.json()


async def ask(http: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int = 4) -> tuple[int, dict]:
    async with http.post(url + "/v1/completions", json={"model": model, "prompt": prompt,
                                                        "max_tokens": max_tokens}) as resp:
        return resp.status, await resp.json()


async def adapters_known(router, n: int) -> None:
    await wait_for(lambda: sum(1 for r in router.fleet if r.adapters) == n, 10,
                   message="every replica's adapters discovered")


async def test_requests_for_an_adapter_go_where_it_is_loaded(make_sims, start_router, http):
    sims = await make_sims(3, args=lora_args())
    server = await start_router(routes([s.url for s in sims], policy="cache_aware"))
    await adapters_known(server.router, 3)
    # Sequential requests cycling over the adapters, one replica per adapter is enough:
    # after each adapter's first load, none should be loaded again.
    for round_ in range(4):
        for name in ADAPTERS:
            status, _ = await ask(http, server.url, name, f"round {round_} for {name} " * 20)
            assert status == 200
    seen = [await stats(http, s) for s in sims]
    assert sum(s["lora_loads"] for s in seen) == len(ADAPTERS), seen
    slots = sorted(name for s in seen for name in s["lora_slots"])
    assert slots == sorted(ADAPTERS), seen  # each adapter in one replica's slot
    # The router's own picture of the slots (/admin/replicas) is the replicas' real one.
    async with http.get(server.url + "/admin/replicas") as resp:
        view = {r["url"]: r for r in (await resp.json())["replicas"]}
    for sim, seen_one in zip(sims, seen):
        mine = view[sim.url]
        assert mine["role"] == "both" and mine["adapters"] == sorted(ADAPTERS), mine
        assert mine["adapter_slots"]["likely_loaded"] == seen_one["lora_slots"], (mine, seen_one)


async def test_base_model_requests_are_not_charged_for_adapters(make_sims, start_router, http):
    sims = await make_sims(2, args=lora_args())
    server = await start_router(routes([s.url for s in sims], policy="cache_aware"))
    await adapters_known(server.router, 2)
    for i in range(6):
        status, body = await ask(http, server.url, MODEL, f"plain request {i} " * 10)
        assert status == 200 and body["model"] == MODEL
    assert sum([(await stats(http, s))["lora_loads"] for s in sims]) == 0


async def test_a_burst_for_one_adapter_spreads_over_replicas(make_sims, start_router, http):
    sims = await make_sims(3, args=lora_args(load_s=0.2))
    server = await start_router(routes([s.url for s in sims], policy="cache_aware"))
    await adapters_known(server.router, 3)
    status, _ = await ask(http, server.url, "a1", "warm the adapter up " * 10)
    assert status == 200
    before = [(await stats(http, s))["answered"] for s in sims]
    results = await asyncio.gather(*(ask(http, server.url, "a1", f"burst {i} " * 30, max_tokens=64)
                                     for i in range(30)))
    assert all(status == 200 for status, _ in results)
    after = [(await stats(http, s))["answered"] for s in sims]
    share = [a - b for a, b in zip(after, before)]
    assert sum(share) == 30
    assert max(share) < 30 and sum(1 for n in share if n) >= 2, share  # not all on the loaded one


async def test_dynamic_loading_is_single_flight(make_sims, start_router, http, tmp_path):
    (tmp_path / "dyn").mkdir()
    sims = await make_sims(2, args=lora_args(modules=(), runtime=True))
    doc = routes([s.url for s in sims], policy="cache_aware")
    doc["models"][0]["lora"] = {"adapters": {"dyn": str(tmp_path / "dyn"),
                                             "missing": str(tmp_path / "not-there")},
                                "dynamic_loading": True, "load_timeout": 5}
    server = await start_router(doc)
    results = await asyncio.gather(*(ask(http, server.url, "dyn", f"dynamic {i} " * 10)
                                     for i in range(10)))
    assert [status for status, _ in results] == [200] * 10, results
    assert all(body["model"] == "dyn" for _, body in results)
    loader = server.router.api.flow.loader
    assert loader.loads_started == 1 and loader.in_flight == 0
    holders = []
    for sim in sims:
        async with http.get(sim.url + "/v1/models") as resp:
            cards = (await resp.json())["data"]
        holders += [c for c in cards if c["id"] == "dyn"]
    assert len(holders) == 1 and holders[0]["parent"] == MODEL
    # A second wave needs no load: the replica serves it now.
    status, _ = await ask(http, server.url, "dyn", "after the load " * 10)
    assert status == 200 and loader.loads_started == 1

    status, body = await ask(http, server.url, "missing", "no such adapter directory")
    assert status == 502
    message = body["error"]["message"]
    assert "missing" in message and "answered 404" in message
    assert str(tmp_path) not in message and "127.0.0.1" not in message


async def test_models_list_adapters_with_their_parent(make_sims, start_router, http, tmp_path):
    sims = await make_sims(2, args=lora_args(modules=("a1", "a2")))
    doc = routes([s.url for s in sims], policy="cache_aware")
    doc["models"][0]["lora"] = {"adapters": {"on-demand": str(tmp_path)}, "dynamic_loading": True}
    server = await start_router(doc)
    await adapters_known(server.router, 2)
    async with http.get(server.url + "/v1/models") as resp:
        assert resp.status == 200
        cards = {c["id"]: c for c in (await resp.json())["data"]}
    assert cards[MODEL]["parent"] is None
    for name in ("a1", "a2", "on-demand"):
        assert cards[name]["parent"] == MODEL and cards[name]["root"] == MODEL


def test_lora_requests_info_newest_series_wins() -> None:
    page = "\n".join([
        "# TYPE vllm:lora_requests_info gauge",
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a1",waiting_lora_adapters="a1"} 100.0',
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a2,a3",waiting_lora_adapters=""} 300.0',
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 200.0',
        ""])
    load = parse_engine_load(page)
    assert load.running_adapters == {"a2", "a3"} and load.waiting_adapters == set()
    assert load.max_loras == 2
    assert parse_engine_load("").max_loras is None


def test_adapter_slots_are_bounded() -> None:
    slots = AdapterSlots()
    slots.observe(EngineLoad(max_loras=10 ** 9, running_adapters=frozenset({"x"})))
    for i in range(MAX_SLOTS * 3):
        slots.touch(f"adapter-{i}")
    assert len(slots.names()) == MAX_SLOTS
    assert slots.holds(f"adapter-{MAX_SLOTS * 3 - 1}") and not slots.holds("adapter-0")
    small = AdapterSlots()
    small.observe(EngineLoad(max_loras=2, running_adapters=frozenset({"p", "q"})))
    assert small.batch_full_without("r") and not small.batch_full_without("p")
    # The router's own requests in flight fill batch slots before a scrape says so, and
    # leave no entry behind once they end.
    fresh = AdapterSlots()
    fresh.observe(EngineLoad(max_loras=2))
    fresh.dispatched("p")
    fresh.dispatched("q")
    fresh.dispatched("q")
    assert fresh.batch_full_without("r") and not fresh.batch_full_without("q")
    for name in ("p", "q", "q"):
        fresh.finished(name)
    assert fresh.in_flight == {} and not fresh.batch_full_without("r")
