"""Admission control from outside: rate limits per key, and the queue in front of a
saturated fleet (priority first, clients in turn, bounded, timed out)."""

from __future__ import annotations

import asyncio
import time

import orjson

KEYS = [{"name": "a", "key": "sk-key-a-000000000"}, {"name": "b", "key": "sk-key-b-000000000"},
        {"name": "vip", "key": "sk-key-vip-0000000", "priority": 5}]


def bearer(name: str) -> dict[str, str]:
    key = next(k["key"] for k in KEYS if k["name"] == name)
    return {"Authorization": f"Bearer {key}"}


async def test_requests_per_second_per_key(fakes, start_router, make_routes, http, metric) -> None:
    (fake,) = await fakes(1)
    keys = [{**KEYS[0], "rate_limit": {"requests_per_s": 2, "burst": 2}}, KEYS[1]]
    server = await start_router(make_routes([fake.url], auth={"keys": keys}))
    url = server.url + "/v1/completions"
    statuses = []
    for _ in range(3):
        async with http.post(url, json={"model": "sim-a", "prompt": "x"}, headers=bearer("a")) as r:
            statuses.append(r.status)
            if r.status == 429:
                assert int(r.headers["Retry-After"]) >= 1
                assert (await r.json())["error"]["type"] == "RateLimitError"
    assert statuses == [200, 200, 429]
    for _ in range(5):  # another key has its own (here: no) limit
        async with http.post(url, json={"model": "sim-a", "prompt": "x"}, headers=bearer("b")) as r:
            assert r.status == 200
    await asyncio.sleep(0.6)
    async with http.post(url, json={"model": "sim-a", "prompt": "x"}, headers=bearer("a")) as r:
        assert r.status == 200
    async with http.get(server.url + "/metrics") as r:
        assert metric(await r.text(), "router_rejections_total", reason="rate_limit_requests") == 1


async def test_tokens_per_minute_and_anonymous_clients_by_address(fakes, start_router, make_routes,
                                                                  http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url], admission={
        "rate_limit": {"tokens_per_min": 1000}}))
    url = server.url + "/v1/completions"
    async with http.post(url, json={"model": "sim-a", "prompt": "x", "max_tokens": 900}) as r:
        assert r.status == 200
    async with http.post(url, json={"model": "sim-a", "prompt": "x", "max_tokens": 900}) as r:
        assert r.status == 429 and "tokens/min" in (await r.json())["error"]["message"]
        assert int(r.headers["Retry-After"]) >= 40  # most of a minute's tokens are gone


async def test_a_saturated_fleet_queues_by_priority_then_in_turns(fakes, start_router,
                                                                  make_routes, http,
                                                                  metric, until) -> None:
    (fake,) = await fakes(1)
    fake.waiting = 50  # the replica reports a deep queue of its own
    server = await start_router(make_routes([fake.url], auth={"keys": KEYS}, admission={
        "max_waiting_per_replica": 1, "queue_size": 20, "max_wait": 10}))
    url = server.url + "/v1/completions"
    replica = next(iter(server.router.fleet))
    await until(lambda: replica.load.waiting == 50, message="saturation scraped")

    async def one(name: str, tag: str, priority: str | None = None) -> int:
        headers = bearer(name) | ({"X-Priority": priority} if priority else {})
        async with http.post(url, json={"model": "sim-a", "prompt": tag}, headers=headers) as r:
            return r.status

    tasks = []
    for name, tag, priority in [("a", "a1", None), ("a", "a2", None), ("a", "a3", None),
                                ("b", "b1", None), ("vip", "low", "-1"), ("vip", "v1", None)]:
        tasks.append(asyncio.create_task(one(name, tag, priority)))
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    assert not fake.seen  # all waiting in the router, none piled onto the replica
    async with http.get(server.url + "/metrics") as r:
        assert metric(await r.text(), "router_admission_queue_length", model="sim-a") == 6
    fake.waiting = 0  # room for one at a time (max_waiting_per_replica 1, per scrape)
    assert await asyncio.wait_for(asyncio.gather(*tasks), 10) == [200] * 6
    order = [orjson.loads(body)["prompt"] for _, _, body in fake.seen]
    # vip first; then priority 0 in turns between a and b (vip's own request at -1 last).
    assert order == ["v1", "a1", "b1", "a2", "a3", "low"], order
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    assert metric(text, "router_admission_wait_seconds_count", model="sim-a") == 6


async def test_queue_full_and_wait_timeout_are_429(fakes, start_router, make_routes, http) -> None:
    (fake,) = await fakes(1)
    fake.waiting = 50
    server = await start_router(make_routes([fake.url], admission={
        "max_waiting_per_replica": 1, "queue_size": 2, "max_wait": 0.5}))
    replica = next(iter(server.router.fleet))
    started = time.monotonic()
    while replica.load.waiting != 50:
        await asyncio.sleep(0.02)

    async def one() -> tuple[int, str]:
        async with http.post(server.url + "/v1/completions",
                             json={"model": "sim-a", "prompt": "x"}) as r:
            return r.status, (await r.json())["error"]["message"]

    first = [asyncio.create_task(one()) for _ in range(2)]
    await asyncio.sleep(0.1)
    status, message = await one()
    assert status == 429 and "queue is full" in message
    results = await asyncio.gather(*first)
    assert all(s == 429 and "waited 0.5s" in m for s, m in results)
    assert time.monotonic() - started < 5 and not fake.seen


async def test_priority_header_cannot_raise_above_the_key(fakes, start_router, make_routes,
                                                          http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url], auth={"keys": KEYS}))
    async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": "x"},
                         headers=bearer("a") | {"X-Priority": "high"}) as r:
        assert r.status == 400 and "X-Priority" in (await r.json())["error"]["message"]
    async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": "x"},
                         headers=bearer("a") | {"X-Priority": "99"}) as r:
        assert r.status == 200  # accepted, but counted as the key's own priority


async def test_a_first_byte_hands_the_admission_slot_on(fakes, start_router, make_routes, http,
                                                        until) -> None:
    """The engine took a request off its queue when its first byte comes: the next waiting
    request goes then, not only when that answer (maybe a long stream) ends.  No scrape
    frees room here (one at start, then none for 60 s)."""
    (fake,) = await fakes(1)
    fake.waiting = 50
    server = await start_router(make_routes([fake.url], admission={
        "max_waiting_per_replica": 1, "queue_size": 10, "max_wait": 20},
        metrics={"scrape_interval": 60}))
    replica = next(iter(server.router.fleet))
    await until(lambda: replica.load.waiting == 50, message="saturation scraped")
    fake.mode = "big"  # half an answer at once, the rest on `release`
    url = server.url + "/v1/completions"

    async def one(tag: str) -> int:
        async with http.post(url, json={"model": "sim-a", "prompt": tag}) as r:
            await r.read()
            return r.status

    tasks = [asyncio.create_task(one("first"))]
    await asyncio.sleep(0.05)
    tasks.append(asyncio.create_task(one("second")))
    await until(lambda: server.router.api.admission.queued("sim-a") == 2, message="both queued")
    server.router.api.admission.on_request_end("sim-a")  # some other request ended: one goes
    # The first one's first byte lets the second one go while the first is still unanswered.
    await until(lambda: fake.in_flight == 2, timeout=5, message="the second admitted at the first's first byte")
    fake.release.set()
    assert await asyncio.wait_for(asyncio.gather(*tasks), 20) == [200, 200]


async def test_a_burst_into_an_engine_with_room_is_not_held_in_the_router(make_sim, start_router, make_routes,
                                                                        http, metric) -> None:
    """A burst of streams into an engine that admits them all at its next step: its waiting
    queue is long at every scrape, but what it schedules waited a step, not seconds, so the
    router lets them through (holding them, one per first byte, added seconds of TTFT in the
    overhead scenario's 1,000-stream phase).  Judged by the count alone, they queue."""
    sim = await make_sim(time_scale=1.0, args=["--max-num-seqs", "512", "--step-overhead-s", "0.1"])

    async def burst(max_queue_time: float) -> float:
        server = await start_router(make_routes([sim.url], admission={
            "max_waiting_per_replica": 4, "max_queue_time": max_queue_time, "queue_size": 1000, "max_wait": 60},
            metrics={"scrape_interval": 0.2}))

        async def one() -> int:
            body = {"model": "sim-a", "prompt": "hello", "max_tokens": 10, "stream": True}
            async with http.post(server.url + "/v1/completions", json=body) as r:
                await r.read()
                return r.status

        tasks = []
        for _ in range(120):  # 100 a second for 1.2 s
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(0.01)
        assert await asyncio.wait_for(asyncio.gather(*tasks), 60) == [200] * 120
        async with http.get(server.url + "/metrics") as r:
            text = await r.text()
        return metric(text, "router_admission_wait_seconds_count", model="sim-a") or 0.0

    assert await burst(1.0) == 0  # none waited in the router
    assert await burst(0) > 0  # the count alone: the same burst queues
