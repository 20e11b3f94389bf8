"""Request lifecycle hooks (router/transport/hooks.py): which moments an attempt goes through.

A recording hook is added to a real router's hooks; FakeReplicas answer, fail, or hang.
"""

from __future__ import annotations

import asyncio

import aiohttp

from router.transport.hooks import Attempt, Hook


async def post_and_leave(http, url: str, body: dict, seconds: float) -> None:
    """A client that sends `body` and leaves after `seconds` without its answer."""
    try:
        async with http.post(url, json=body, timeout=aiohttp.ClientTimeout(total=seconds)) as r:
            await r.read()
    except TimeoutError:
        pass


class Recorder(Hook):
    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []

    def on_dispatch(self, attempt: Attempt) -> None:
        self.events.append(("dispatch", attempt.replica.url, attempt.number))

    def on_first_byte(self, attempt: Attempt, status: int) -> None:
        self.events.append(("first_byte", attempt.replica.url, status))

    def on_failure(self, attempt: Attempt, failure) -> None:
        self.events.append(("failure", attempt.replica.url, failure.kind))

    def on_complete(self, attempt: Attempt, outcome: str) -> None:
        self.events.append(("complete", attempt.replica.url, outcome))


async def test_the_moments_of_success_failover_and_abandonment(fakes, start_router, make_routes,
                                                              http, until) -> None:
    bad, good = await fakes(2)
    bad.status = 500
    server = await start_router(make_routes([bad.url, good.url], policy="round_robin",
                                            circuit_breaker={"failure_threshold": 100}))
    recorder = Recorder()
    server.router.proxy.hooks.add(recorder)
    body = {"model": "sim-a", "prompt": "x"}
    for _ in range(2):  # round robin: one of the two starts on the failing replica
        async with http.post(server.url + "/v1/completions", json=body) as r:
            assert r.status == 200
    failover = [e for e in recorder.events if e[1] == bad.url]
    assert failover == [("dispatch", bad.url, 1), ("failure", bad.url, "status_5xx"),
                        ("complete", bad.url, "failure")]
    assert recorder.events.count(("first_byte", good.url, 200)) == 2
    assert recorder.events.count(("complete", good.url, "success")) == 2
    assert ("dispatch", good.url, 2) in recorder.events  # the failover was attempt 2

    # A client that leaves while the replica hangs: dispatch, then abandoned.
    recorder.events.clear()
    bad.status, good.mode = 200, "hang"
    server.router.fleet.remove(server.router.fleet.find("sim-a", bad.url))
    await post_and_leave(http, server.url + "/v1/completions", body, 0.3)
    await until(lambda: ("complete", good.url, "abandoned") in recorder.events,
                message="the abandoned attempt completed")
    assert recorder.events == [("dispatch", good.url, 1), ("complete", good.url, "abandoned")]
    assert all(r.in_flight == 0 for r in server.router.fleet)


async def test_a_replica_counts_the_prompt_tokens_it_has_yet_to_prefill_until_its_first_byte(
        fakes, start_router, make_routes, http, until) -> None:
    """The queue term's fresh view of the wait on a replica (hooks.InFlight): an unanswered
    request's uncached prompt tokens count there until its first byte; a request whose
    client left stops counting."""
    (replica,) = await fakes(1)
    replica.mode = "hang"
    server = await start_router(make_routes([replica.url]))
    (target,) = server.router.fleet
    prompt = "a long prompt that no replica has seen before " * 200
    body = {"model": "sim-a", "prompt": prompt, "stream": True}

    task = asyncio.create_task(post_and_leave(http, server.url + "/v1/completions", body, 1.0))
    await until(lambda: target.in_flight == 1, message="the request was dispatched")
    held = target.pending_prefill_tokens
    assert held >= len(prompt) // 8  # the router's estimate of the prompt, all of it uncached
    async with http.get(server.url + "/admin/replicas") as r:  # what an operator sees
        listed = (await r.json())["replicas"]
    assert [rep["pending_prefill_tokens"] for rep in listed] == [held]
    await task
    await until(lambda: target.in_flight == 0, message="the abandoned attempt completed")
    assert target.pending_prefill_tokens == 0

    seen: list[int] = []

    class Watch(Hook):
        def on_first_byte(self, attempt: Attempt, status: int) -> None:
            seen.append(attempt.replica.pending_prefill_tokens)

    server.router.proxy.hooks.add(Watch())
    replica.mode = "sse"
    async with http.post(server.url + "/v1/completions", json=dict(body, prompt=prompt + "!")) as r:
        assert r.status == 200
        await r.read()
    assert seen == [0]  # InFlight, the first hook, took it off at the first byte
    assert target.pending_prefill_tokens == 0 and target.in_flight == 0

    # A whole answer's first byte comes after its generation: its prompt is not counted
    # (it would read as waiting all that time).
    replica.mode = "hang"
    whole = asyncio.create_task(post_and_leave(http, server.url + "/v1/completions",
                                               {"model": "sim-a", "prompt": prompt + "?"}, 1.0))
    await until(lambda: target.in_flight == 1, message="the whole-answer request was dispatched")
    assert target.pending_prefill_tokens == 0
    await whole


async def test_a_request_answered_since_the_last_scrape_no_longer_counts_as_waiting(
        fakes, start_router, make_routes, http, until) -> None:
    """The scrape is up to an interval old: a request it saw waiting that the router has
    since seen answered stops counting there (EngineLoad.request_left), or a conversation's
    next turn is moved off the replica holding its prefix (CI saw it once)."""
    (replica,) = await fakes(1)
    server = await start_router(make_routes([replica.url], metrics={"scrape_interval": 3600}))
    (target,) = server.router.fleet
    monitor = server.router.monitor

    async def held_request(stream: bool) -> None:
        """One request held on the replica while the router scrapes it, then answered."""
        replica.mode, replica.release = "hold", asyncio.Event()
        body = {"model": "sim-a", "prompt": "hello", "stream": stream}
        task = asyncio.create_task(http.post(server.url + "/v1/completions", json=body))
        await until(lambda: replica.in_flight == 1, message="the request reached the replica")
        assert await monitor.scrape_metrics(target)
        assert target.load.waiting == replica.waiting
        replica.release.set()
        async with await task as r:
            assert r.status == 200
            await r.read()

    # The engine reports it waiting (a stream, then a whole answer): answered, it is not.
    replica.running, replica.waiting = 0.0, 1.0
    await held_request(stream=True)
    assert target.load.waiting == 0.0
    await held_request(stream=False)
    assert target.load.waiting == 0.0
    # Running and waiting one each (the other client's is waiting): vLLM takes requests
    # first come first served, so the router's, sent first, is taken to be the running one.
    replica.running, replica.waiting = 1.0, 1.0
    await held_request(stream=False)
    assert target.load.waiting == 1.0
    # A request sent after the scrape was not in its count: it corrects nothing.
    replica.running, replica.waiting, replica.mode = 0.0, 1.0, "json"
    assert await monitor.scrape_metrics(target)
    async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": "x"}) as r:
        assert r.status == 200
    assert target.load.waiting == 1.0
