"""The endpoint picker's ext_proc servicer (router/picker/extproc.py) fed Envoy's messages
directly, over a real router's parts and real (fake) replicas: what the Envoy tests cannot
set up on demand (a subset hint, a full body budget, a saturated replica) or cannot tell
apart (the moment a lean stream ends).  tests/integration/test_envoy_picker.py runs the same
picker behind a real Envoy."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson
import pytest

pytest.importorskip("envoy.service.ext_proc.v3.external_processor_pb2")

from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

from router.cli import build_picker  # noqa: E402
from router.picker import messages  # noqa: E402
from router.picker.extproc import EndpointPicker  # noqa: E402

BODY = orjson.dumps({"model": "sim-a", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})


def picker_of(server: Any) -> EndpointPicker:
    """The picker `router pick` builds over this router's parts."""
    picker: EndpointPicker = build_picker(server.router)
    return picker


def headers(path: str = "/v1/chat/completions", *, lean: bool = True, subset: str | None = None) -> Any:
    message = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in
            ((":method", "POST"), (":path", path), ("content-type", "application/json"))])),
        protocol_config=ep.ProtocolConfiguration(
            request_body_mode=pm.ProcessingMode.BUFFERED,
            response_body_mode=pm.ProcessingMode.NONE if lean else pm.ProcessingMode.FULL_DUPLEX_STREAMED))
    if subset is not None:
        hint = struct_pb2.Struct()
        hint.update({messages.SUBSET: subset})
        message.metadata_context.filter_metadata[messages.SUBSET_NAMESPACE].CopyFrom(hint)
    return message


def body(data: bytes = BODY) -> Any:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=True))


def response_headers(status: int) -> Any:
    return ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":status", raw_value=str(status).encode())])))


async def run(picker: EndpointPicker, sent: Iterable[Any]) -> list[Any]:
    async def stream() -> AsyncIterator[Any]:
        for message in sent:
            yield message

    return [answer async for answer in picker.Process(stream(), None)]


def destination(answers: list[Any]) -> list[str]:
    found = re.findall(r'key: "x-gateway-destination-endpoint"\s+raw_value: "([^"]*)"', "\n".join(map(str, answers)))
    return found[0].split(",") if found else []


def requests_counted(server: Any, status: str) -> float:
    total = 0.0
    for metric in server.router.telemetry.registry.collect():
        if metric.name == "router_requests":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total") and s.labels["status"] == status)
    return total


async def test_the_subset_hint_narrows_the_candidates_before_admission(fakes, start_router, make_routes, until) -> None:
    """Only the hinted replica is a candidate; it is saturated, so the request queues (and is
    refused when its wait ends) instead of being admitted on the strength of another replica
    it may not use."""
    free, busy = await fakes(2)
    server = await start_router(make_routes([free.url, busy.url], policy="cache_aware",
                                            admission={"max_wait": 0.3, "max_waiting_per_replica": 4}))
    picker = picker_of(server)
    answers = await run(picker, [headers(subset=messages.address_of(busy.url)), body()])
    assert destination(answers) == [messages.address_of(busy.url)]
    busy.waiting = 50.0  # saturated, as its next scrape says
    await until(lambda: any(r.load.waiting >= 50 for r in server.router.fleet), message="the busy replica scraped")
    answers = await run(picker, [headers(subset=messages.address_of(busy.url)), body()])
    refusal = answers[-1].immediate_response
    assert refusal.status.code == 429 and b"waited" in refusal.body
    answers = await run(picker, [headers(subset=messages.address_of(free.url)), body()])
    assert destination(answers) == [messages.address_of(free.url)]
    answers = await run(picker, [headers(subset="10.9.9.9:1"), body()])  # no replica of the subset
    assert answers[-1].immediate_response.status.code == 503
    assert b"subset" in answers[-1].immediate_response.body


async def test_a_body_over_the_shared_budget_is_a_503_and_its_lease_is_given_back(fakes, start_router,
                                                                                 make_routes) -> None:
    (replica,) = await fakes(1)
    server = await start_router(make_routes([replica.url]))
    bodies = server.router.api.bodies
    bodies.used = bodies.limit - 10  # the proxy mode's requests hold all but 10 bytes
    answers = await run(picker_of(server), [headers(), body()])
    refusal = answers[-1].immediate_response
    assert refusal.status.code == 503 and b"too many request bodies" in refusal.body
    assert any(h.header.key.lower() == "retry-after" for h in refusal.headers.set_headers)
    assert bodies.used == bodies.limit - 10
    bodies.used = 0
    answers = await run(picker_of(server), [headers(), body()])
    assert destination(answers) and bodies.used == 0  # held until the decision, then let go


async def test_a_lean_stream_ends_its_attempt_when_it_ends(fakes, start_router, make_routes) -> None:
    """Lean mode: the answer's headers carry its status; the stream's end is its end."""
    (replica,) = await fakes(1)
    server = await start_router(make_routes([replica.url]))
    (target,) = server.router.fleet
    picker = picker_of(server)
    sent = [headers(), body(), response_headers(200)]

    async def stream() -> AsyncIterator[Any]:
        for message in sent:
            yield message
        assert target.in_flight == 1  # counted until the stream ends, not at the headers

    answers = [answer async for answer in picker.Process(stream(), None)]
    assert destination(answers) == [messages.address_of(replica.url)]
    assert target.in_flight == 0 and requests_counted(server, "200") == 1
    answers = await run(picker, [headers(), body(), response_headers(503)])  # a failed answer
    assert target.breaker.failures >= 1 and requests_counted(server, "503") == 1
