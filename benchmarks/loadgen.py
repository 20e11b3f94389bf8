"""The load generator: an aiohttp client that streams OpenAI requests and times every token.

Arrival processes (always bounded by a request count and a deadline):

- `poisson` at a QPS: tickets at exponential gaps (seeded).  A ticket takes the next turn
  that is ready; a multi-turn user's next round is ready only after its previous answer
  came back plus the think time, so when no turn is ready the ticket waits for one and
  the next gap counts from the dispatch.  The offered rate is therefore at most QPS (for
  multi-turn: min(QPS, users / (round latency + think time))).
- `closed` with a concurrency C: C workers each send the next ready turn and wait for it.

Each request is streamed (`stream_options.include_usage`); the record has the time to the
first content token (TTFT), every gap between content chunks (inter-token latency), the
end-to-end latency, the usage (prompt, completion and cached tokens) and the error, if
any.  The answer text is appended to the session's history, so multi-turn prompts grow
with the real answers.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from benchmarks.agent_apis import DONE_EVENTS, PATHS, encode, event_text, event_usage, whole_answer
from benchmarks.workloads import Session, Workload, messages_for, render


@dataclass(frozen=True, slots=True)
class LoadSpec:
    url: str  # the target's base URL, e.g. http://127.0.0.1:9000
    model: str
    api: str = "chat"  # chat | completions | responses | messages (benchmarks/agent_apis.py)
    arrival: str = "closed"  # poisson | closed | trace (each session at its start_s, open loop)
    qps: float = 0.0
    concurrency: int = 8
    max_requests: int = 1000
    max_duration_s: float = 120.0
    request_timeout_s: float = 60.0
    ignore_eos: bool = True
    seed: int = 0
    stream: bool = True
    ramp_s: float = 0.0  # closed loop: start the workers evenly over this many seconds
    alt_urls: tuple[str, ...] = ()  # more routers of one target: requests alternate over url + these


@dataclass(slots=True)
class LoadResult:
    records: list[dict[str, Any]] = field(default_factory=list)  # in completion order
    itls: list[float] = field(default_factory=list)  # every inter-chunk gap, seconds
    prompts: list[dict[str, Any]] = field(default_factory=list)  # what was sent, in send order
    duration_s: float = 0.0  # first dispatch to last completion
    stopped_by: str = "done"  # done | max_requests | max_duration


class _Ready:
    """Turns ready to send, earliest first; knows when the whole workload is finished."""

    def __init__(self, workload: Workload, now: float) -> None:
        self._heap: list[tuple[float, int, int]] = [(now + s.start_s, i, 0) for i, s in enumerate(workload.sessions)]
        heapq.heapify(self._heap)
        self._sessions = workload.sessions
        self._in_flight = 0
        self._changed = asyncio.Event()
        self.closed = False

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def next(self) -> tuple[int, int] | None:
        """The next (session, turn) once it is ready; None when nothing is left or closed."""
        loop = asyncio.get_running_loop()
        while not self.closed:
            if not self._heap:
                if self._in_flight == 0:
                    return None
                await self._changed.wait()
                continue
            ready_at, si, ti = self._heap[0]
            wait = ready_at - loop.time()
            if wait > 0:
                changed = self._changed
                try:
                    await asyncio.wait_for(changed.wait(), wait)
                except TimeoutError:
                    pass
                continue
            heapq.heappop(self._heap)
            self._in_flight += 1
            return si, ti
        return None

    def finished(self, si: int, ti: int, now: float, failed: bool) -> None:
        """A turn came back; a failed turn ends its session (its history would be wrong)."""
        self._in_flight -= 1
        turns = self._sessions[si].turns
        if not failed and ti + 1 < len(turns):
            heapq.heappush(self._heap, (now + turns[ti + 1].think_s, si, ti + 1))
        self._notify()

    def close(self) -> None:
        self.closed = True
        self._notify()


def request_body(spec: LoadSpec, session: Session, answers: list[str], turn: int) -> dict[str, Any]:
    messages = messages_for(session, answers, turn)
    body: dict[str, Any] = {"model": session.model or spec.model, "max_tokens": session.turns[turn].max_tokens,
                            "temperature": 0, "stream": spec.stream, "user": session.id}
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    if spec.ignore_eos:
        body["ignore_eos"] = True
    if session.prompt is not None:  # a trace's request: its prompt as synthesized, nothing around it
        body["prompt"] = session.prompt
    elif spec.api == "completions":
        body["prompt"] = render(messages)
    else:
        encode(spec.api, body, messages, tools=session.tool_loop)
    return body


async def send(http: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str],
               timeout_s: float, api: str = "chat") -> tuple[dict[str, Any], list[float], str]:
    """Send one request (`api`: its shape, for a whole answer's parsing); return its record,
    its inter-chunk gaps and the answer text."""
    record: dict[str, Any] = {"ttft_s": None, "e2e_s": None, "output_tokens": 0, "prompt_tokens": None,
                              "cached_tokens": None, "status": None, "error": None}
    gaps: list[float] = []
    pieces: list[str] = []
    start = time.perf_counter()
    last = None
    try:
        async with http.post(url, data=orjson.dumps(body), headers=headers,
                             timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            record["status"] = resp.status
            if resp.status != 200:
                text = (await resp.text())[:200]
                record["error"] = f"http {resp.status}: {text}"
                return record, gaps, ""
            if not body.get("stream"):
                data = orjson.loads(await resp.read())
                now = time.perf_counter()
                record["ttft_s"] = record["e2e_s"] = now - start
                text, usage = whole_answer(api, data)
                pieces.append(text)
                _usage(record, usage)
                return record, gaps, "".join(pieces)
            chunks = 0
            done = False
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                data = orjson.loads(payload)
                if "error" in data or data.get("type") in ("error", "response.failed"):
                    record["error"] = f"stream error: {str(data.get('error') or data)[:200]}"
                    break
                if "type" in data:  # a Responses or Messages event (agent_apis.py)
                    _usage(record, event_usage(data))
                    texts = [event_text(data)]
                    if data["type"] in DONE_EVENTS:
                        done = True
                else:
                    if data.get("usage"):
                        _usage(record, data["usage"])
                    texts = [(c["delta"].get("content") if c.get("delta") is not None else c.get("text"))
                             for c in data.get("choices") or ()]
                for text in texts:
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            record["ttft_s"] = now - start
                        else:
                            gaps.append(now - last)
                        last = now
                        chunks += 1
                        pieces.append(text)
            if not done and record["error"] is None:
                record["error"] = "truncated: stream ended without [DONE]"
            if not record["output_tokens"]:
                record["output_tokens"] = chunks
    except TimeoutError:
        record["error"] = f"timeout after {timeout_s:g}s"
    except aiohttp.ClientError as exc:
        record["error"] = f"client: {type(exc).__name__}: {str(exc)[:160]}"
    except (ValueError, OSError) as exc:  # a malformed chunk, a socket error: this request failed
        record["error"] = f"bad response: {type(exc).__name__}: {str(exc)[:160]}"
    record["e2e_s"] = time.perf_counter() - start
    if record["error"] is None and record["ttft_s"] is None:
        record["ttft_s"] = record["e2e_s"]  # an empty answer: first byte is the whole answer
    if gaps:
        record["itl_mean_s"] = sum(gaps) / len(gaps)
    return record, gaps, "".join(pieces)


def _usage(record: dict[str, Any], usage: dict[str, Any] | None) -> None:
    if not usage:
        return
    record["prompt_tokens"] = usage.get("prompt_tokens")
    record["output_tokens"] = usage.get("completion_tokens") or record["output_tokens"]
    details = usage.get("prompt_tokens_details") or {}
    record["cached_tokens"] = details.get("cached_tokens")


def make_client(connections: int = 0) -> aiohttp.ClientSession:
    """One HTTP client for a run: no connection cap (0) unless asked, keep-alive on."""
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=0, ttl_dns_cache=None,
                                     enable_cleanup_closed=True)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


async def run(spec: LoadSpec, workload: Workload,
              on_done: Callable[[dict[str, Any]], None] | None = None,
              http: aiohttp.ClientSession | None = None) -> LoadResult:
    """Run `workload` against `spec.url` with the spec's arrival process and bounds."""
    path = PATHS[spec.api]
    urls = [u.rstrip("/") + path for u in (spec.url, *spec.alt_urls)]
    loop = asyncio.get_running_loop()
    result = LoadResult()
    answers: list[list[str]] = [[] for _ in workload.sessions]
    start = loop.time()
    deadline = start + spec.max_duration_s
    ready = _Ready(workload, start)
    tasks: set[asyncio.Task] = set()
    own_client = http is None
    http = http or make_client()
    perf0 = time.perf_counter()
    last_end = [perf0]

    async def one(si: int, ti: int) -> None:
        session = workload.sessions[si]
        body = request_body(spec, session, answers[si], ti)
        # What the oracle replays: the conversation in chat's shape, whatever the API.
        result.prompts.append({"prompt": body["prompt"]} if "prompt" in body else
                              {"messages": messages_for(session, answers[si], ti)})
        sent_at = time.perf_counter() - perf0
        url = urls[(len(result.prompts) - 1) % len(urls)]  # alternate: one router, then the next
        record, gaps, text = await send(http, url, body, {"Content-Type": "application/json",
                                                           "X-Session-Id": session.id}, spec.request_timeout_s,
                                        spec.api)
        last_end[0] = time.perf_counter()
        record.update(session=session.id, turn=ti, sent_at_s=round(sent_at, 6))
        answers[si].append(text)
        result.records.append(record)
        result.itls.extend(gaps)
        ready.finished(si, ti, loop.time(), failed=record["error"] is not None)
        if on_done is not None:
            on_done(record)

    def may_dispatch() -> bool:
        if ready.closed:
            return False
        if len(result.prompts) >= spec.max_requests:
            if len(result.prompts) < workload.total_requests:
                result.stopped_by = "max_requests"
        elif loop.time() >= deadline:
            result.stopped_by = "max_duration"
        else:
            return True
        ready.close()  # wake every waiting worker: nothing more is sent
        return False

    async def poisson() -> None:
        rng = random.Random(spec.seed)
        ticket = loop.time()
        while may_dispatch():
            if ticket > loop.time():
                await asyncio.sleep(ticket - loop.time())
            item = await _next_before(ready, deadline)
            if not may_dispatch() or item is None:  # may_dispatch() notes a deadline that passed
                break
            task = asyncio.create_task(one(*item))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            ticket = max(ticket, loop.time()) + rng.expovariate(spec.qps)
        if tasks:
            await asyncio.gather(*list(tasks), return_exceptions=True)

    async def timed() -> None:
        """Open loop at the sessions' own times (a trace): each request when it is due."""
        while may_dispatch():
            item = await _next_before(ready, deadline)
            if not may_dispatch() or item is None:
                break
            task = asyncio.create_task(one(*item))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*list(tasks), return_exceptions=True)

    async def worker(index: int) -> None:
        if spec.ramp_s > 0:
            await asyncio.sleep(spec.ramp_s * index / spec.concurrency)
        while may_dispatch():
            item = await _next_before(ready, deadline)
            if not may_dispatch() or item is None:
                return
            await one(*item)

    try:
        if spec.arrival == "poisson":
            await poisson()
        elif spec.arrival == "trace":
            await timed()
        else:
            await asyncio.gather(*(worker(i) for i in range(spec.concurrency)))
    finally:
        ready.close()
        for task in list(tasks):
            task.cancel()
        if own_client:
            await http.close()
    result.duration_s = max(last_end[0] - perf0, 1e-9)
    return result


async def _next_before(ready: _Ready, deadline: float) -> tuple[int, int] | None:
    """The next ready turn, or None if the deadline passes first."""
    loop = asyncio.get_running_loop()
    remaining = deadline - loop.time()
    if remaining <= 0:
        return None
    try:
        return await asyncio.wait_for(ready.next(), remaining)
    except TimeoutError:
        # The timer can fire while the loop's clock still reads a hair below the deadline
        # (uvloop counts milliseconds; the deadline is a float sum): wait out the rest, so
        # the caller sees the deadline as passed and records max_duration, not "done".
        while (late := deadline - loop.time()) > 0:
            await asyncio.sleep(late)
        return None
