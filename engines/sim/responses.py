"""The OpenAI Responses API as vLLM 0.32 serves it (the facts: engines/sim/README.md, "The
agentic APIs"; the samples: tests/reference/agentic/).

POST /v1/responses                     a response: JSON, or named SSE events with ``stream``;
                                       ``background`` answers the queued response at once
POST /v1/responses/render              the prompt's token ids (no previous_response_id)
GET  /v1/responses/{id}                a stored response; ``?stream=true&starting_after=N``
                                       replays a background stream's events after N and follows it
POST /v1/responses/{id}/cancel         cancels a queued background job

The store (previous_response_id, GET, cancel, background: response_store.py) is off unless
``VLLM_ENABLE_RESPONSES_API_STORE=1`` or ``--enable-responses-api-store``; off, ``store:
true`` is silently ignored, as in vLLM.  Parsing a request: responses_request.py; the wire
shapes: responses_shapes.py; this module runs the jobs and answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from engines.sim.agentic import generate_request
from engines.sim.answers import SSEWriter, cut, json_response, openai_error
from engines.sim.host import SimHost
from engines.sim.protocol import ApiError, parse_json
from engines.sim.response_store import ResponseStore, StoredResponse
from engines.sim.responses_request import Job, not_found, parse_job, query_bool, query_int
from engines.sim.responses_shapes import EventStream, ResponseShape, output_message, usage

log = logging.getLogger("engines.sim")

_COMPLETED = b"event: response.completed\n"


class ResponsesAPI:
    def __init__(self, server: SimHost) -> None:
        self.srv = server
        opts = server.opts
        self.store: ResponseStore | None = ResponseStore(opts.responses_store_size) if opts.responses_store else None
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/responses", self.create)
        router.add_post("/v1/responses/render", self.render)
        router.add_get("/v1/responses/{response_id}", self.retrieve)
        router.add_post("/v1/responses/{response_id}/cancel", self.cancel)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def stats(self) -> dict[str, Any]:
        return {"enabled": self.store is not None, "stored": len(self.store) if self.store else 0,
                "capacity": self.store.capacity if self.store else 0, "background_running": len(self._tasks)}

    # -- handlers --------------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.StreamResponse:
        srv = self.srv
        srv.in_flight += 1
        try:
            try:
                job = parse_job(srv, self.store, parse_json(await request.read()))
            except ApiError as exc:
                return openai_error(exc)
            refused = await srv.admission()
            if refused is not None:
                return openai_error(*refused)
            shape = ResponseShape(job.id, job.body, job.model, job.echo_max)
            if job.background:
                return await self._start_background(request, job, shape)
            if not job.stream:
                return json_response(await self._run(job, shape, None))
            writer = SSEWriter(request, srv.faults.draw_cut())
            await writer.start()
            await self._run(job, shape, writer.send)
            return await writer.end()
        finally:
            srv.in_flight -= 1

    async def render(self, request: web.Request) -> web.Response:
        try:
            body = parse_json(await request.read())
            job = parse_job(self.srv, self.store, body, render=True)
        except ApiError as exc:
            return openai_error(exc)
        sampling = {"presence_penalty": float(body.get("presence_penalty") or 0.0),
                    "frequency_penalty": float(body.get("frequency_penalty") or 0.0),
                    "repetition_penalty": float(body.get("repetition_penalty") or 1.0),
                    "temperature": float(body["temperature"]) if body.get("temperature") is not None else 1.0,
                    "stop": [], "stop_token_ids": [], "ignore_eos": bool(body.get("ignore_eos")),
                    "max_tokens": job.echo_max, "output_kind": 1 if job.stream else 2, "skip_clone": True,
                    "extra_args": {}, "bad_words": [], "skip_reading_prefix_cache": False}
        return json_response(generate_request(job.id, job.prompt_ids, sampling, body.get("model"), job.stream,
                                              body))

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        rid = request.match_info["response_id"]
        try:
            stream = query_bool(request, "stream")
            after = query_int(request, "starting_after")
        except ApiError as exc:
            return openai_error(exc)
        entry = self.store.get(rid) if self.store is not None else None
        if entry is None:
            return openai_error(not_found(rid))
        if not stream:
            return json_response(entry.body)
        if entry.events is None:
            # vLLM answers 200 and then breaks the stream off: only a background stream keeps events.
            writer = SSEWriter(request, None)
            await writer.start()
            cut(request)
        return await self._replay(request, entry, 0 if after is None else after + 1)

    async def cancel(self, request: web.Request) -> web.Response:
        rid = request.match_info["response_id"]
        entry = self.store.get(rid) if self.store is not None else None
        if entry is None:
            return openai_error(not_found(rid))
        if entry.body["status"] not in ("queued", "in_progress"):
            return openai_error(ApiError(400, "Cannot cancel a synchronous response.", "response_id",
                                         "invalid_request_error"))
        entry.body["status"] = "cancelled"
        task = entry.task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return json_response(entry.body)

    # -- generation ------------------------------------------------------------------------
    async def _run(self, job: Job, shape: ResponseShape,
                   emit: Callable[[bytes], Awaitable[None]] | None) -> dict[str, Any]:
        """Generate in the engine; with `emit`, send the SSE events as they come.  The final
        response is stored (with `store`) before response.completed is sent, as in vLLM."""
        srv = self.srv
        events = EventStream(shape)
        req = srv.new_request(job.prompt_ids, job.max_tokens, job.seed, job.body, job.model)
        chan = srv.engine.submit(req)
        try:
            if emit is not None:
                for ev in events.start():
                    await emit(ev)
            done = False
            while not done:
                tokens, done = await chan.next()
                if emit is None:
                    continue
                for tok in tokens:
                    for ev in events.delta(srv.tok.token_str(tok)):
                        await emit(ev)
        finally:
            srv.engine.abort(req)
        output = events.output() if emit is not None else [output_message(events.item_id,
                                                                           srv.tok.decode(req.output_ids))]
        status = "completed" if req.finish_reason == "stop" else "incomplete"
        final = shape.obj(status, output, usage(len(req.prompt_ids), len(req.output_ids), *req.cache_counts()))
        if job.store and self.store is not None:
            entry = self.store.get(job.id)
            if entry is None:
                self.store.put(job.id, StoredResponse(final, job.messages))
            elif entry.body["status"] != "cancelled":
                entry.body = final
        if emit is not None:
            for ev in events.finish(final):
                await emit(ev)
        srv.answered_one()
        return final

    async def _start_background(self, request: web.Request, job: Job, shape: ResponseShape) -> web.StreamResponse:
        """The job is stored as "queued" and runs on its own (vLLM never marks it in_progress);
        the answer is that queued response, or with `stream` its events as they come."""
        assert self.store is not None
        queued = shape.obj("queued", [], None)
        answer = json_response(queued)  # serialized now: the stored object changes later
        entry = StoredResponse(queued, job.messages, events=[] if job.stream else None)
        self.store.put(job.id, entry)
        task = asyncio.get_running_loop().create_task(self._background(job, shape, entry))
        entry.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if job.stream:
            return await self._replay(request, entry, 0)
        return answer

    async def _background(self, job: Job, shape: ResponseShape, entry: StoredResponse) -> None:
        emit = None
        if entry.events is not None:
            events = entry.events

            async def emit(ev: bytes) -> None:
                events.append(ev)
                entry.notify()

        try:
            await self._run(job, shape, emit)
        except Exception:  # noqa: BLE001 - a failed job is reported as such, like vLLM's
            log.exception("background response %s failed", job.id)
            if entry.body["status"] not in ("completed", "incomplete", "cancelled"):
                entry.body["status"] = "failed"

    async def _replay(self, request: web.Request, entry: StoredResponse, start: int) -> web.StreamResponse:
        """A background stream's events from index `start` (= sequence number), then the new
        ones as they come, until response.completed.  A cancelled job sends no more events and,
        as in vLLM 0.32, the stream then stays open until the client leaves."""
        assert entry.events is not None
        writer = SSEWriter(request, self.srv.faults.draw_cut())
        await writer.start()
        i = max(0, start)
        while True:
            while i < len(entry.events):
                ev = entry.events[i]
                i += 1
                await writer.send(ev)
                if ev.startswith(_COMPLETED):
                    return await writer.end()
            await entry.changed()
