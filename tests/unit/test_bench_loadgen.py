"""The load generator against a tiny in-process OpenAI-shaped streaming server."""

import asyncio
import json

import pytest
from aiohttp import web

from benchmarks import loadgen
from benchmarks.scenario import WORKLOAD_PARAMS, WorkloadSpec
from benchmarks.workloads import build


class FakeServer:
    """Streams `tokens` chunks like vLLM (role chunk, content chunks, usage, [DONE])."""

    def __init__(self, tokens=4, gap=0.002, fail_every=0):
        self.tokens = tokens
        self.gap = gap
        self.fail_every = fail_every
        self.bodies = []
        self.active = 0
        self.max_active = 0

    async def chat(self, request):
        body = await request.json()
        self.bodies.append(body)
        if self.fail_every and len(self.bodies) % self.fail_every == 0:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)

            async def send(obj):
                await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

            await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for i in range(self.tokens):
                await asyncio.sleep(self.gap)
                await send({"choices": [{"index": 0, "delta": {"content": f"w{len(self.bodies)}.{i} "}}]})
            await send({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": self.tokens,
                                                  "prompt_tokens_details": {"cached_tokens": 4}}})
            await resp.write(b"data: [DONE]\n\n")
            return resp
        finally:
            self.active -= 1


@pytest.fixture
async def server(aiohttp_server):
    fake = FakeServer()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    srv = await aiohttp_server(app)
    fake.url = str(srv.make_url("")).rstrip("/")
    return fake


def multi_turn(users=2, rounds=3, think=0.0):
    params = {k: v[0] for k, v in WORKLOAD_PARAMS["multi_turn"].items()}
    params.update(users=users, rounds=rounds, think_time_s=think, system_prompt_tokens=20,
                  question_tokens=5, answer_tokens=4)
    return build(WorkloadSpec("multi_turn", params), 1)


async def test_history_grows_with_the_streamed_answers(server):
    w = multi_turn(users=1, rounds=3)
    spec = loadgen.LoadSpec(url=server.url, model="m", arrival="closed", concurrency=1)
    result = await loadgen.run(spec, w)
    assert len(result.records) == 3 and not any(r["error"] for r in result.records)
    third = server.bodies[2]["messages"]
    answers = [m["content"] for m in third if m["role"] == "assistant"]
    assert answers == ["w1.0 w1.1 w1.2 w1.3 ", "w2.0 w2.1 w2.2 w2.3 "]  # exactly what was streamed
    assert server.bodies[0]["stream_options"] == {"include_usage": True}
    assert server.bodies[0]["user"] == w.sessions[0].id
    assert result.prompts[2]["messages"] == third


async def test_records_latencies_usage_and_gaps(server):
    w = multi_turn(users=2, rounds=2)
    result = await loadgen.run(loadgen.LoadSpec(url=server.url, model="m", concurrency=2), w)
    r = result.records[0]
    assert r["ttft_s"] > 0 and r["e2e_s"] >= r["ttft_s"]
    assert (r["output_tokens"], r["prompt_tokens"], r["cached_tokens"]) == (4, 10, 4)
    assert len(result.itls) == 4 * 3  # 3 gaps per 4-chunk answer
    assert all(g >= 0.001 for g in result.itls)


async def test_closed_loop_concurrency_is_respected(server):
    w = multi_turn(users=8, rounds=2)
    await loadgen.run(loadgen.LoadSpec(url=server.url, model="m", concurrency=3), w)
    assert server.max_active <= 3 and len(server.bodies) == 16


async def test_bounded_by_request_count(server):
    w = multi_turn(users=8, rounds=4)
    result = await loadgen.run(loadgen.LoadSpec(url=server.url, model="m", concurrency=4, max_requests=10), w)
    assert len(result.records) == 10 and result.stopped_by == "max_requests"


async def test_bounded_by_time(server):
    w = multi_turn(users=2, rounds=50, think=0.05)
    result = await loadgen.run(loadgen.LoadSpec(url=server.url, model="m", concurrency=2, max_duration_s=0.3), w)
    assert result.stopped_by == "max_duration" and 2 <= len(result.records) < 100
    assert result.duration_s < 2


async def test_poisson_rate(server):
    params = {k: v[0] for k, v in WORKLOAD_PARAMS["no_reuse"].items()}
    params.update(requests=40, prompt_tokens=8)
    w = build(WorkloadSpec("no_reuse", params), 1)
    result = await loadgen.run(loadgen.LoadSpec(url=server.url, model="m", arrival="poisson", qps=100), w)
    assert len(result.records) == 40
    sent = sorted(r["sent_at_s"] for r in result.records)
    assert 0.15 < sent[-1] < 1.5  # 39 gaps of mean 10 ms
    assert server.max_active > 1  # open loop: requests overlap


async def test_errors_are_recorded_and_end_the_session(server):
    server.fail_every = 2
    w = multi_turn(users=1, rounds=4)
    result = await loadgen.run(loadgen.LoadSpec(url=server.url, model="m", concurrency=1), w)
    assert [r["error"] is None for r in result.records] == [True, False]  # history would be wrong after a failure
    assert result.records[1]["error"].startswith("http 500")


async def test_connection_refused_is_an_error():
    w = multi_turn(users=1, rounds=1)
    result = await loadgen.run(loadgen.LoadSpec(url="http://127.0.0.1:9", model="m", request_timeout_s=2), w)
    assert result.records[0]["error"].startswith("client:")


async def test_malformed_chunk_is_an_error_not_a_crash(aiohttp_server):
    async def bad(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: {not json\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", bad)
    srv = await aiohttp_server(app)
    w = multi_turn(users=2, rounds=2)
    result = await loadgen.run(loadgen.LoadSpec(url=str(srv.make_url("")).rstrip("/"), model="m", concurrency=2), w)
    assert len(result.records) == 2 and all(r["error"].startswith("bad response") for r in result.records)


class _NeverReady:
    async def next(self):
        await asyncio.get_running_loop().create_future()  # no turn ever becomes ready


async def test_a_wait_cut_by_the_deadline_returns_only_once_the_deadline_has_passed():
    """The caller tells "stopped by the deadline" from "the workload is done" by reading the
    loop's clock after the wait; a timer that fired while the clock still read a hair below
    the deadline (float rounding of the loop's millisecond clock) made a time-bounded run
    report "done" (test_bounded_by_time, 1 CI run in many)."""
    loop = asyncio.get_running_loop()
    for k in range(150):
        deadline = loop.time() + 0.001 + k * 1.37e-5
        assert await loadgen._next_before(_NeverReady(), deadline) is None
        assert loop.time() >= deadline, k
