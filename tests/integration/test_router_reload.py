"""The live fleet: hot reload (POST /admin/reload, SIGHUP) and run-time registration.

Each test runs real simulated replicas behind an in-process router started from a real
routes.yaml file, and keeps traffic flowing while the fleet changes.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import yaml

from router.config import load_config
from router.fleet.replicas import Health

PROMPT = "You are a helpful assistant. Answer the question briefly, please. " * 3


def write_routes(path: Path, make_routes, urls: list[str], **sections) -> Path:
    path.write_text(yaml.safe_dump(make_routes(urls, **sections)))
    return path


class Load:
    """Streams sent continuously (a few at a time) until stopped; every outcome kept."""

    def __init__(self, url: str, *, concurrency: int = 6, max_tokens: int = 12) -> None:
        self.url = url
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.outcomes: list[tuple[int, bool, str]] = []  # status, complete, error text
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _one(self, http: aiohttp.ClientSession, i: int) -> None:
        body = {"model": "sim-a", "prompt": f"{PROMPT} {i}", "max_tokens": self.max_tokens,
                "stream": True}
        try:
            async with http.post(self.url + "/v1/completions", json=body) as r:
                raw = await r.read()
                complete = raw.rstrip().endswith(b"data: [DONE]") and b'"error"' not in raw
                self.outcomes.append((r.status, complete, "" if complete else raw[-300:].decode()))
        except aiohttp.ClientError as exc:
            self.outcomes.append((0, False, repr(exc)))

    async def _worker(self, w: int) -> None:
        async with aiohttp.ClientSession() as http:
            i = 0
            while not self._stop.is_set():
                await self._one(http, w * 100_000 + i)
                i += 1

    def start(self) -> Load:
        self._tasks = [asyncio.create_task(self._worker(w)) for w in range(self.concurrency)]
        return self

    async def stop(self) -> list[tuple[int, bool, str]]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.outcomes


async def test_reload_under_load_adds_removes_and_changes_policy_losing_nothing(
        make_sims, start_router, make_routes, http, tmp_path, until, metric) -> None:
    a, b, c = await make_sims(3, time_scale=10.0)
    path = write_routes(tmp_path / "routes.yaml", make_routes, [a.url, b.url])
    server = await start_router(load_config(path))
    router = server.router
    load = Load(server.url).start()
    # A long stream on each replica, running across the reload.
    long_body = {"model": "sim-a", "prompt": PROMPT, "max_tokens": 1500, "stream": True}
    long_streams = [asyncio.create_task(http.post(server.url + "/v1/completions", json=long_body))
                    for _ in range(2)]
    await asyncio.sleep(0.8)
    b_replica = router.fleet.find("sim-a", b.url)
    assert b_replica is not None
    blocks_before = router.index.replica_blocks(b.url)
    assert blocks_before > 0
    a_replica = router.fleet.find("sim-a", a.url)
    assert a_replica is not None and a_replica.in_flight >= 1  # a stream runs on it

    write_routes(path, make_routes, [b.url, c.url], policy="cache_aware",
                 proxy={"max_attempts": 4}, health={"interval": 0.1, "failure_threshold": 3})
    async with http.post(server.url + "/admin/reload") as r:
        assert r.status == 200, await r.text()
        summary = await r.json()
    assert summary["replicas_added"] == [c.url] and summary["replicas_removed"] == [a.url]
    # a serves until c, its successor, passed a probe (make-before-break)
    assert summary["replicas_leaving"] == [a.url]
    assert summary["policy"] == "cache_aware" and summary["restart_required"] == []
    assert set(summary["applied"]) >= {"models", "routing", "proxy", "health"}
    # The replica that stays keeps its health, breaker and prefix-index records.
    assert router.fleet.find("sim-a", b.url) is b_replica and b_replica.health is Health.HEALTHY
    assert router.index.replica_blocks(b.url) >= blocks_before
    assert router.proxy.config.max_attempts == 4 and router.policy.name == "cache_aware"
    # The new one joins when healthy; then the removed one is gone from the fleet, the
    # index and (below) the metrics.
    await until(lambda: router.fleet.find("sim-a", c.url).health is Health.HEALTHY,
                message="the new replica probed healthy")
    await until(lambda: router.fleet.find("sim-a", a.url) is None, message="a left")
    assert router.index.replica_blocks(a.url) == 0
    await asyncio.sleep(1.0)
    outcomes = await load.stop()
    for task in long_streams:
        resp = await task
        raw = await resp.read()
        assert resp.status == 200 and raw.rstrip().endswith(b"data: [DONE]") and b'"error"' not in raw
    bad = [o for o in outcomes if o[0] != 200 or not o[1]]
    assert not bad and len(outcomes) > 30, (len(outcomes), bad[:3])

    async def metrics_page() -> str:
        async with http.get(server.url + "/metrics") as r:
            return await r.text()

    # The removed replica's series go once its last request is done.
    for _ in range(50):
        page = await metrics_page()
        if f'replica="{a.url}"' not in page:
            break
        await asyncio.sleep(0.1)
    assert f'replica="{a.url}"' not in page
    assert (metric(page, "router_policy_decisions_total", replica=c.url) or 0) > 0


async def test_an_invalid_reload_changes_nothing_and_says_why(
        make_sims, start_router, make_routes, http, tmp_path, caplog) -> None:
    (a,) = await make_sims(1)
    path = write_routes(tmp_path / "routes.yaml", make_routes, [a.url])
    server = await start_router(load_config(path))
    router = server.router
    before = (router.config, list(router.fleet), router.policy)
    doc = make_routes([a.url, "http://127.0.0.1:9"])
    doc["routing"]["polcy"] = "random"
    path.write_text(yaml.safe_dump(doc))
    async with http.post(server.url + "/admin/reload") as r:
        assert r.status == 400
        message = (await r.json())["error"]["message"]
    assert "nothing changed" in message and "routes.yaml" in message
    assert "routing.polcy" in message and "did you mean 'policy'" in message
    assert (router.config, list(router.fleet), router.policy) == before
    assert "reload of" in caplog.text and "refused" in caplog.text
    doc["server"] = {"log_format": "jsn"}  # two mistakes: both in the one answer
    path.write_text(yaml.safe_dump(doc))
    async with http.post(server.url + "/admin/reload") as r:
        assert r.status == 400
        message = (await r.json())["error"]["message"]
    assert "routing.polcy" in message and "server.log_format" in message
    path.write_text("models: [unclosed")  # not even YAML
    async with http.post(server.url + "/admin/reload") as r:
        assert r.status == 400
    assert list(router.fleet) == before[1]
    async with http.post(server.url + "/v1/completions",
                         json={"model": "sim-a", "prompt": "x", "max_tokens": 2}) as r:
        assert r.status == 200


async def test_admin_registration_under_load(make_sims, start_router, make_routes, http,
                                             tmp_path, until) -> None:
    a, b = await make_sims(2, time_scale=10.0)
    admin = "admin-key-0123456789"
    path = write_routes(tmp_path / "routes.yaml", make_routes, [a.url], auth={"admin_key": admin})
    server = await start_router(load_config(path))
    router = server.router
    auth = {"Authorization": f"Bearer {admin}"}
    url = server.url + "/admin/replicas"
    async with http.post(url, json={"model": "sim-a", "url": b.url}) as r:
        assert r.status == 401
    load = Load(server.url).start()
    await asyncio.sleep(0.3)
    async with http.post(url, json={"model": "sim-a", "url": b.url, "weight": 2}, headers=auth) as r:
        assert r.status == 201, await r.text()
        assert (await r.json())["registered"]["health"] == "unknown"
    async with http.post(url, json={"model": "sim-a", "url": b.url}, headers=auth) as r:
        assert r.status == 400 and "already a replica" in (await r.json())["error"]["message"]
    async with http.post(url, json={"model": "sim-a", "url": "ftp://x", "wieght": 1},
                         headers=auth) as r:
        assert r.status == 400
        assert "body" in (await r.json())["error"]["message"]
    await until(lambda: router.fleet.find("sim-a", b.url).health is Health.HEALTHY,
                message="the registered replica probed healthy")
    await asyncio.sleep(0.8)
    registered = router.fleet.find("sim-a", b.url)
    assert registered is not None and registered.weight == 2
    # A reload of the file (which does not list it) keeps the registered replica.
    async with http.post(server.url + "/admin/reload", headers=auth) as r:
        assert r.status == 200 and (await r.json())["replicas_removed"] == []
    async with http.request("DELETE", url, json={"url": a.url}, headers=auth) as r:
        assert r.status == 200, await r.text()
    async with http.request("DELETE", url, json={"url": a.url}, headers=auth) as r:
        assert r.status == 404
    await asyncio.sleep(0.8)
    outcomes = await load.stop()
    bad = [o for o in outcomes if o[0] != 200 or not o[1]]
    assert not bad and len(outcomes) > 20, (len(outcomes), bad[:3])
    assert [r.url for r in router.fleet] == [b.url]
    async with http.get(url, headers=auth) as r:
        listed = await r.json()
    assert [rep["url"] for rep in listed["replicas"]] == [b.url]


async def test_sighup_reloads_the_file(make_sims, make_routes, unused_port, tmp_path, http,
                                       until) -> None:
    """SIGHUP on a real `router` process re-reads its file."""
    import os
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    a, b = await make_sims(2)
    path = write_routes(tmp_path / "routes.yaml", make_routes, [a.url],
                        server={"port": unused_port, "log_format": "text"})
    log_path = tmp_path / "router.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "router", "--config", str(path)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=root,
                                env={**os.environ, "PYTHONPATH": str(root)})
    base = f"http://127.0.0.1:{unused_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                async with http.get(base + "/ready") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        write_routes(path, make_routes, [a.url, b.url],
                     server={"port": unused_port, "log_format": "text"})
        proc.send_signal(signal.SIGHUP)

        async def urls() -> list[str]:
            async with http.get(base + "/admin/replicas") as r:
                return [rep["url"] for rep in (await r.json())["replicas"]]

        deadline = time.monotonic() + 10
        while await urls() != [a.url, b.url]:
            assert time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.1)
        path.write_text("models: [unclosed")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "refused, nothing changed" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.1)
        assert await urls() == [a.url, b.url] and proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)
    assert "Traceback" not in log_path.read_text()


async def test_a_reload_keeps_the_learned_prefill_rates(
        make_sims, start_router, make_routes, http, tmp_path) -> None:
    a, b = await make_sims(2)
    path = write_routes(tmp_path / "routes.yaml", make_routes, [a.url, b.url], policy="cache_aware")
    server = await start_router(load_config(path))
    router = server.router
    for i in range(8):  # long, unique, streamed prompts teach prefill rates
        async with http.post(server.url + "/v1/completions", json={
                "model": "sim-a", "prompt": f"{i} " + "fresh words every time " * 120,
                "max_tokens": 2, "stream": True}) as r:
            assert r.status == 200
            await r.read()
    # What an operator sees: the two equal replicas expect one learned rate, not each its own.
    async with http.get(server.url + "/admin/replicas") as r:
        before = {entry["url"]: entry["prefill_tokens_per_s"] for entry in (await r.json())["replicas"]}
    assert before[a.url] == before[b.url] != 20_000.0, before
    old_policy = router.policy
    old_rates = old_policy.producer("rates")
    learned = dict(old_rates._class_rates)  # per capacity class (both replicas are TP=1)
    assert learned, "the policy learned no rate"
    stays = a.url  # one replica stays, the other (b) goes
    staying = next(r for r in router.fleet if r.url == stays)
    rate_before = old_rates.prefill_rate(staying)
    assert rate_before == learned[1.0] != old_rates.prior_rate(staying)
    doc = make_routes([stays], policy="cache_aware")
    doc["routing"]["params"] = {"load_factor": 1.5}
    doc["routing"]["terms"] = {"queue": 1.0, "prefill": 1.0, "eviction": 1.0}  # new weights, same rates
    path.write_text(yaml.safe_dump(doc))
    async with http.post(server.url + "/admin/reload") as r:
        assert r.status == 200
        summary = await r.json()
    assert summary["cost_terms"] == {"queue": 1.0, "prefill": 1.0, "eviction": 1.0}
    async with http.get(server.url + "/admin/replicas") as r:
        listing = await r.json()
    assert listing["policy"] == "cache_aware" and listing["cost_terms"] == summary["cost_terms"]
    (shown,) = [entry for entry in listing["replicas"] if entry["url"] == stays]
    assert shown["prefill_tokens_per_s"] == round(rate_before, 1)  # the learned rate, kept
    assert router.policy is not old_policy and router.policy.keys[0].load_factor == 1.5  # the guard
    cost = router.policy.cost
    assert cost is not None and cost.weights["eviction"] == 1.0
    kept = router.policy.producer("rates")
    assert kept._class_rates == learned  # learned per capacity class: nothing to forget of b


class Paced:
    """Requests started at a fixed rate (open loop: a slow answer does not slow the sender),
    each outcome kept: (status, complete, error text)."""

    def __init__(self, url: str, per_s: float, *, stream: bool = False) -> None:
        self.url = url
        self.period = 1.0 / per_s
        self.stream = stream
        self.outcomes: list[tuple[int, bool, str]] = []
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    async def _one(self, http: aiohttp.ClientSession, i: int) -> None:
        body = {"model": "sim-a", "prompt": f"{PROMPT} {i}", "max_tokens": 4, "stream": self.stream}
        try:
            async with http.post(self.url + "/v1/completions", json=body) as r:
                raw = await r.read()
                if self.stream:
                    complete = raw.rstrip().endswith(b"data: [DONE]") and b'"error"' not in raw
                else:
                    complete = r.status == 200 and b'"choices"' in raw
                self.outcomes.append((r.status, complete, "" if complete else raw[-300:].decode()))
        except aiohttp.ClientError as exc:
            self.outcomes.append((0, False, repr(exc)))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        sent: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            start = loop.time()
            i = 0
            while not self._stop.is_set():
                task = asyncio.create_task(self._one(http, i))
                sent.add(task)
                task.add_done_callback(sent.discard)
                i += 1
                await asyncio.sleep(max(0.0, start + i * self.period - loop.time()))
            await asyncio.gather(*sent)

    def start(self) -> Paced:
        self._runner = asyncio.create_task(self._run())
        return self

    async def stop(self) -> list[tuple[int, bool, str]]:
        self._stop.set()
        assert self._runner is not None
        await self._runner
        return self.outcomes


async def test_reloads_that_swap_the_backend_list_lose_no_request_at_100_per_s(
        make_sims, start_router, make_routes, http, tmp_path, until, metric) -> None:
    """Issue 23 #2: a reload that swaps the backend list must keep the leaving replicas
    routable until their successors are healthy (make-before-break).  Before, the old ones
    left at once while the new ones waited for their first passing probe, and the requests
    in between got 503 'No healthy replica'.  Every other swap the incoming pair warms up
    (its /health fails for 0.3 s, as a replica that just restarted), which widens that window
    from a probe's round trip to what a real deployment sees."""
    sims = await make_sims(4)
    sets = [[s.url for s in sims[:2]], [s.url for s in sims[2:]]]
    path = write_routes(tmp_path / "routes.yaml", make_routes, sets[0])
    server = await start_router(load_config(path))
    router = server.router
    paced = Paced(server.url, per_s=100).start()
    summaries = []
    for swap in range(6):
        await asyncio.sleep(0.7)
        incoming = sims[2:] if swap % 2 == 0 else sims[:2]
        if swap % 4 == 0:  # a warming-up successor pair
            await asyncio.gather(*(s.set_faults(http, unhealthy_for=0.3) for s in incoming))
        write_routes(path, make_routes, [s.url for s in incoming])
        async with http.post(server.url + "/admin/reload") as r:
            assert r.status == 200, await r.text()
            summaries.append(await r.json())
    await asyncio.sleep(0.7)
    outcomes = await paced.stop()
    bad = [o for o in outcomes if o[0] != 200 or not o[1]]
    assert not bad and len(outcomes) > 400, (len(bad), len(outcomes), bad[:3])
    # Each reload said what it took out, and which of those keep serving until their
    # successors pass a probe; the fleet ends as the last file says.
    for swap, summary in enumerate(summaries):
        gone = sets[swap % 2]
        assert summary["replicas_added"] == sets[(swap + 1) % 2]
        assert summary["replicas_removed"] == gone
        assert set(summary["replicas_leaving"]) <= set(gone)
    assert summaries[0]["replicas_leaving"] == sets[0]  # its successors were warming up
    await until(lambda: sorted(r.url for r in router.fleet) == sorted(sets[0]),
                message="the leaving replicas of the last reload went")
    async with http.get(server.url + "/metrics") as r:
        page = await r.text()
    assert metric(page, "router_replicas_leaving") == 0
    assert (metric(page, "router_reload_handovers_total", outcome="successors_healthy") or 0) >= 6


async def test_consecutive_reloads_mid_handover_the_newest_file_wins(
        fakes, start_router, make_routes, http, tmp_path, until, metric) -> None:
    """A file that lists a leaving replica again keeps it (the same replica, nothing lost);
    DELETE /admin/replicas takes a leaving one out at once; a successor that never comes up
    lets the leaving one go after health.handover_timeout."""
    a, b, c = await fakes(3)
    c.healthy = False  # a successor that never passes a probe
    path = write_routes(tmp_path / "routes.yaml", make_routes, [a.url])
    server = await start_router(load_config(path))
    router = server.router
    a_replica = router.fleet.find("sim-a", a.url)

    async def reload(urls: list[str], **sections) -> dict:
        write_routes(path, make_routes, urls, **sections)
        async with http.post(server.url + "/admin/reload") as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def complete() -> int:
        async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": "x"}) as r:
            await r.read()
            return r.status

    async def listing() -> dict[str, dict]:
        async with http.get(server.url + "/admin/replicas") as r:
            return {rep["url"]: rep for rep in (await r.json())["replicas"]}

    summary = await reload([c.url])
    assert summary["replicas_removed"] == [a.url] and summary["replicas_leaving"] == [a.url]
    served = len(a.seen)
    assert [await complete() for _ in range(3)] == [200] * 3 and len(a.seen) == served + 3
    shown = await listing()
    assert shown[a.url]["leaving"] is True and shown[c.url]["leaving"] is False
    # The newest file lists a again: it stays, the same replica; c (never healthy) goes now.
    summary = await reload([a.url])
    assert summary["replicas_added"] == [] and summary["replicas_removed"] == [c.url]
    assert summary["replicas_leaving"] == []
    assert [r.url for r in router.fleet] == [a.url] and router.fleet.find("sim-a", a.url) is a_replica
    assert a_replica.health is Health.HEALTHY and (await listing())[a.url]["leaving"] is False
    await asyncio.sleep(0.3)
    assert router.fleet.find("sim-a", a.url) is a_replica  # no timer of the old handover took it
    # DELETE /admin/replicas of a leaving replica: out at once (its usual meaning).
    assert (await reload([c.url]))["replicas_leaving"] == [a.url]
    async with http.request("DELETE", server.url + "/admin/replicas", json={"url": a.url}) as r:
        assert r.status == 200
    assert [r.url for r in router.fleet] == [c.url] and len(router.reloader.handover) == 0
    # The timeout: a rejoins, then leaves for c with a short handover_timeout.
    await reload([a.url])
    await until(lambda: router.fleet.find("sim-a", a.url).health is Health.HEALTHY, message="a back")
    summary = await reload([c.url], health={"handover_timeout": 0.3})
    assert summary["replicas_leaving"] == [a.url]
    await until(lambda: router.fleet.find("sim-a", a.url) is None, timeout=3, message="a left")
    async with http.get(server.url + "/metrics") as r:
        page = await r.text()
    assert metric(page, "router_reload_handovers_total", outcome="timeout") == 1
    assert metric(page, "router_reload_handovers_total", outcome="unroutable") == 2  # c, dropped twice
    assert metric(page, "router_replicas_leaving") == 0
