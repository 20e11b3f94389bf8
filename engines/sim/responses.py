"""The OpenAI Responses API as vLLM 0.32 serves it (the facts: engines/sim/README.md, "The
agentic APIs"; the samples: tests/reference/agentic/).

POST /v1/responses                     a response: JSON, or named SSE events with ``stream``;
                                       ``background`` answers the queued response at once
POST /v1/responses/render              the prompt's token ids (no previous_response_id)
GET  /v1/responses/{id}                a stored response; ``?stream=true&starting_after=N``
                                       replays a background stream's events after N and follows it
POST /v1/responses/{id}/cancel         cancels a queued background job

The store (previous_response_id, GET, cancel, background) is off unless
``VLLM_ENABLE_RESPONSES_API_STORE=1`` (vLLM's switch) or ``--enable-responses-api-store``;
off, ``store: true`` is silently ignored, as in vLLM.  It is this process's memory, like
vLLM's dicts, but bounded (``--responses-store-size``, the oldest finished entries go first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from engines.sim.agentic import (
    SSEWriter,
    cut,
    generate_request,
    invalid,
    json_response,
    missing,
    openai_error,
    template_messages,
)
from engines.sim.protocol import ApiError, check_model, parse_json, random_id
from engines.sim.responses_shapes import (
    EventStream,
    ResponseShape,
    chat_tools,
    continues_final_message,
    input_messages,
    output_message,
    usage,
)

if TYPE_CHECKING:
    from engines.sim.server import SimServer

log = logging.getLogger("engines.sim")

STORE_ENV = "VLLM_ENABLE_RESPONSES_API_STORE"
_COMPLETED = b"event: response.completed\n"
_NO_STORE_BACKGROUND = ("This vLLM engine does not support `store=True` and therefore does not support the "
                        "background mode. To enable these features, set the environment variable "
                        "`VLLM_ENABLE_RESPONSES_API_STORE=1` when launching the vLLM server.")


def store_enabled_by_env() -> bool:
    """vLLM's reading of the switch: ``bool(int(value))``, unset meaning off."""
    value = os.environ.get(STORE_ENV, "0")
    try:
        return bool(int(value))
    except ValueError:
        raise SystemExit(f"{STORE_ENV}={value!r}: not an integer") from None


@dataclass(eq=False)
class StoredResponse:
    body: dict[str, Any]  # the response object GET answers (status changes in place)
    messages: list[dict[str, Any]]  # this turn's chat messages: the next turn's history
    events: list[bytes] | None = None  # a background stream's SSE events, for GET ?stream=true
    task: asyncio.Task[None] | None = None  # a background job while it runs
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        await self._changed.wait()


class ResponseStore:
    """The newest `capacity` responses of this process (vLLM keeps every one forever, a leak
    its own log warns about).  A running background job is never dropped."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, response_id: str) -> StoredResponse | None:
        return self._items.get(response_id)

    def put(self, response_id: str, entry: StoredResponse) -> None:
        self._items[response_id] = entry
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            victim = next((k for k, e in self._items.items() if e.task is None or e.task.done()), None)
            if victim is None:
                break
            del self._items[victim]


@dataclass
class Job:
    """One parsed request."""

    id: str
    body: dict[str, Any]
    model: str
    prompt_ids: list[int]
    max_tokens: int | None  # what the engine generates (None: --default-output-len, then "stop")
    echo_max: int  # max_output_tokens in the answer: vLLM's sampling max_tokens
    seed: int
    messages: list[dict[str, Any]]
    stream: bool
    background: bool
    store: bool


def _not_found(response_id: str) -> ApiError:
    return ApiError(404, f"Response with id '{response_id}' not found.", "response_id", "invalid_request_error")


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, "bool_type", "Input should be a valid boolean", value)
    return value


def _typed(body: dict[str, Any], name: str, types: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
        raise invalid(name, f"{what}_type", f"Input should be a valid {what}", value)
    return value


class ResponsesAPI:
    def __init__(self, server: SimServer) -> None:
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

    # -- parsing ---------------------------------------------------------------------------
    def _parse(self, body: dict[str, Any], *, render: bool = False) -> Job:
        srv = self.srv
        if body.get("input") is None:
            # vLLM's "before" validators have set tool_choice by then (to "none" without tools)
            raise missing("input", body if body.get("tools") else {**body, "tool_choice": "none"})
        input_ = body["input"]
        if not isinstance(input_, (str, list)):
            raise invalid("input", "string_type", "Input should be a valid string", input_)
        background = _bool(body, "background", False)
        store = body.get("store", True) is not False and body.get("store", True) is not None
        if background and not store:
            raise ApiError(400, "background can only be used when `store` is true (parameter=background)",
                           "background")
        if body.get("prompt") is not None:
            raise ApiError(400, "prompt template is not supported (parameter=prompt)", "prompt")
        instructions = _typed(body, "instructions", (str,), "string")
        requested = _typed(body, "max_output_tokens", (int,), "integer")
        previous = _typed(body, "previous_response_id", (str,), "string")
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            _typed(body, name, (int, float), "number")
        seed = _typed(body, "seed", (int,), "integer") or 0
        stream = _bool(body, "stream", False)
        tools = body.get("tools") or []
        if not isinstance(tools, list):
            raise invalid("tools", "list_type", "Input should be a valid list", tools)
        model = check_model(body, srv.model, srv._adapter_names())
        prev = None
        if render:
            if previous is not None:
                raise ApiError(400, "previous_response_id is not supported by the stateless render endpoint.",
                               "previous_response_id", "invalid_request_error")
        else:
            if store and background and self.store is None:
                raise ApiError(400, _NO_STORE_BACKGROUND, "background", "invalid_request_error")
            store = store and self.store is not None  # vLLM: `store` silently off without the switch
            if previous is not None:
                prev = self.store.get(previous) if self.store is not None else None
                if prev is None:
                    raise _not_found(previous)
        messages = input_messages(instructions, input_, prev.messages if prev else None,
                                  prev.body.get("output") if prev else None)
        continue_final = continues_final_message(input_)
        ids = srv.chat_ids({"messages": template_messages(messages), "tools": chat_tools(tools) or None,
                            "add_generation_prompt": not continue_final,
                            "continue_final_message": continue_final})
        limit = srv.max_model_len
        if len(ids) >= limit:
            raise ApiError(400, f"The engine prompt length {len(ids)} exceeds the max_model_len {limit}. "
                                "Please reduce prompt.", "input", "invalid_request_error")
        room = limit - len(ids)
        if requested is not None and requested < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {requested}.", "max_output_tokens")
        max_tokens = None if requested is None else min(requested, room)
        rid = body.get("request_id")
        return Job(id=rid if isinstance(rid, str) and rid else random_id("resp_"), body=body, model=model,
                   prompt_ids=ids, max_tokens=max_tokens, echo_max=room if max_tokens is None else max_tokens,
                   seed=seed, messages=messages, stream=stream, background=background, store=store)

    # -- handlers --------------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.StreamResponse:
        srv = self.srv
        srv.in_flight += 1
        try:
            try:
                job = self._parse(parse_json(await request.read()))
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
            job = self._parse(body, render=True)
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
            stream = _query_bool(request, "stream")
            after = _query_int(request, "starting_after")
        except ApiError as exc:
            return openai_error(exc)
        entry = self.store.get(rid) if self.store is not None else None
        if entry is None:
            return openai_error(_not_found(rid))
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
            return openai_error(_not_found(rid))
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
        final = shape.obj(status, output, usage(len(req.prompt_ids), len(req.output_ids),
                                                max(req.num_cached_tokens, 0), req.num_cache_creation_tokens))
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


_TRUE = ("1", "true", "t", "yes", "y", "on")
_FALSE = ("0", "false", "f", "no", "n", "off")


def _query_bool(request: web.Request, name: str) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return False
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ApiError(400, f"{name}: Input should be a valid boolean", f"query.{name}", "Bad Request")


def _query_int(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: Input should be a valid integer", f"query.{name}", "Bad Request") from None
