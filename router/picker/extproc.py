"""``envoy.service.ext_proc.v3.ExternalProcessor/Process``: one gRPC stream per HTTP request
that Envoy routes through the picker, answered the way the Gateway API Inference Extension's
endpoint picker answers (router/picker/messages.py).

Request phase: the headers, then the body (full-duplex streamed, as the GIE asks, or
buffered).  At the body's end the picker runs the core's intake (keys, body checks, model
and access, breakers, rate limits, admission: router/core/intake.py) and the scheduling
profile, and answers the ranked ``ip:port`` list; in full-duplex mode it then streams the
body back (Envoy forwards only what the picker returns).  A refusal is an immediate answer
in the OpenAI error shape (400, 401, 404, 429 with Retry-After, 503...).

Response phase: the attempt hooks hear what the proxy's transport would tell them, so the
in-flight counts, breakers, prefix index, learned rates and admission stay as exact as in
proxy mode.  The endpoint that served is read from ``envoy.lb/…-served`` (Envoy's retries
may have walked the list: each endpoint before it counts as a failed attempt); a 5xx or 429
is a failure; the first body byte is the first byte; the body's end completes the attempt
and its last bytes give ``cached_tokens``.  A stream that ends before that (the client left,
Envoy gave up) completes it as abandoned.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg
from multidict import CIMultiDict

from router.core.auth import KeyRing
from router.core.intake import Arrival, Intake
from router.core.scheduling import Decision
from router.core.scheduling.candidates import capacity_of
from router.errors import RouterError, error_body
from router.fleet.replicas import Fleet, Replica
from router.observability.access_log import RequestRecord
from router.picker import messages
from router.transport.failures import CLIENT_CLOSED, UpstreamFailure
from router.transport.flows import SingleHop
from router.transport.hooks import ABANDONED, FAILURE, SUCCESS, Attempt
from router.transport.proxy import Proxy
from router.transport.usage import cached_tokens_of

log = logging.getLogger("router.picker")

FULL_DUPLEX = 4  # ProcessingMode.BodySendMode.FULL_DUPLEX_STREAMED
_CREDENTIALS = frozenset(messages.CLIENT_CREDENTIALS)
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade", "host", "content-length"})


@dataclass
class _Exchange:
    """One HTTP request's state over its ext_proc stream."""

    record: RequestRecord
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytearray = field(default_factory=bytearray)
    duplex: bool = True
    attempt: Attempt | None = None
    decision: Decision | None = None
    first_byte: bool = False
    done: bool = False
    tail: bytes = b""  # the last bytes of the answer: its usage
    drain_key: int | None = None


class EndpointPicker(epg.ExternalProcessorServicer):  # type: ignore[misc]
    """Decides each request Envoy asks about; one per router process."""

    def __init__(self, *, intake: Intake, keyring: Callable[[], KeyRing], flow: SingleHop,
                 proxy: Proxy, fleet: Fleet, max_body_bytes: Callable[[], int],
                 default_duplex: bool = True) -> None:
        self.intake = intake
        self.keyring = keyring  # the current keys (a reload may replace them)
        self.flow = flow
        self.proxy = proxy
        self.fleet = fleet
        self.max_body_bytes = max_body_bytes
        self.default_duplex = default_duplex
        self._ids = 0

    async def Process(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        self._ids += 1
        peer = _peer_of(context)
        record = RequestRecord(request_id=f"picker-{self._ids}", method="POST", path="", client=peer)
        x = _Exchange(record, duplex=self.default_duplex)
        x.drain_key = self.proxy.begin(record)
        status = 0
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("request")
                if request.HasField("protocol_config"):
                    x.duplex = request.protocol_config.request_body_mode == FULL_DUPLEX
                if kind == "request_headers":
                    x.headers = messages.headers_of(request.request_headers)
                    record.method = x.headers.get(":method", "GET")
                    record.path = x.headers.get(":path", "/").split("?", 1)[0]
                    record.request_id = x.headers.get("x-request-id") or record.request_id
                    if request.request_headers.end_of_stream:
                        for out in await self._decide(x, request):  # no body: a GET
                            yield out
                    elif not x.duplex:
                        yield messages.empty_headers(request=True)
                elif kind == "request_body":
                    chunk = request.request_body
                    x.body += chunk.body
                    if len(x.body) > self.max_body_bytes():
                        status = 413
                        yield self._refuse(x, RouterError(
                            413, f"Request body too large: the limit is {self.max_body_bytes()} bytes"))
                        return
                    if chunk.end_of_stream:
                        answers = await self._decide(x, request)
                        if answers and answers[0].HasField("immediate_response"):
                            status = answers[0].immediate_response.status.code
                            yield answers[0]
                            return
                        for out in answers:
                            yield out
                elif kind == "request_trailers":
                    yield messages.empty_trailers(request=True)
                elif kind == "response_headers":
                    status = self._response_headers(x, request)
                    yield messages.empty_headers(request=False)
                elif kind == "response_body":
                    chunk = request.response_body
                    self._response_body(x, chunk.body, chunk.end_of_stream, status)
                    for out in messages.streamed_body(chunk.body, request=False, end=chunk.end_of_stream):
                        yield out
                elif kind == "response_trailers":
                    self._complete(x, SUCCESS if status < 500 else FAILURE)
                    yield messages.empty_trailers(request=False)
        finally:
            if not x.done and x.attempt is not None:
                record.client_gone = True
                self._complete(x, ABANDONED)
            self._finish(x, status)

    # -- the request phase ---------------------------------------------------------------
    async def _decide(self, x: _Exchange, request: Any) -> list[Any]:
        """The answer to a request whose body (if any) has arrived: where it goes, or why not."""
        record = x.record
        try:
            if not x.body:
                return self._route_bodiless(x)
            try:
                client = self.keyring().client(x.headers, record.client)
            except RouterError as exc:
                raise self.intake.reject("auth", exc) from None
            record.client, record.client_name = client.address, client.name
            arrival = Arrival(path=record.path, headers=x.headers, client=client, body=bytes(x.body),
                              forward_headers=forwardable(x.headers))
            admitted = await self.intake.admit(arrival, record, deadline_left=lambda: (
                self.proxy.config.deadline - record.elapsed()))
            candidates = _in_subset(admitted.candidates, messages.metadata_value(
                request, messages.SUBSET_NAMESPACE, messages.SUBSET))
            if not candidates:
                raise self.proxy.unavailable(admitted.route.model, "no endpoint of the subset hint")
        except RouterError as exc:
            return [self._refuse(x, exc)]
        route = admitted.route
        decision = self.flow.rank(route, candidates, record)
        ranked = decision.ranked[:max(1, self.proxy.config.max_attempts)]
        endpoints = ",".join(messages.address_of(r.url) for r in ranked)
        x.decision = decision
        x.attempt = Attempt(route, ranked[0], decision, record, 1)
        record.attempts, record.replica = 1, ranked[0].id
        self.proxy.hooks.dispatch(x.attempt)
        body = bytes(route.body_for(ranked[0]))
        # The replica's own key (the fleet's replicas of one model share it in practice: a
        # retry on the next endpoint of the list sends the same header).
        extra = [("authorization", f"Bearer {ranked[0].api_key}")] if ranked[0].api_key else []
        if x.duplex:
            return [messages.route_headers(endpoints, extra), *messages.streamed_body(body, request=True)]
        return [messages.route_body(endpoints, None if body == bytes(x.body) else body, extra)]

    def _route_bodiless(self, x: _Exchange) -> list[Any]:
        """A request without a body (``GET /v1/models``...): any replica that may take one,
        the least busy first; nothing is scheduled or recorded for it."""
        usable = sorted((r for r in self.fleet if self.proxy.admissible(r)),
                        key=lambda r: r.in_flight / capacity_of(r))
        if not usable:
            raise self.proxy.unavailable("any", "no replica is healthy")
        endpoints = ",".join(messages.address_of(r.url) for r in usable[:max(1, self.proxy.config.max_attempts)])
        if x.duplex:
            return [messages.route_headers(endpoints)]
        return [messages.route_body(endpoints, None)]

    def _refuse(self, x: _Exchange, error: RouterError) -> Any:
        x.record.status = error.status
        x.record.error = error.message
        return messages.immediate(error.status, error_body(error.status, error.message, param=error.param,
                                                           type=error.type), error.headers)

    # -- the response phase --------------------------------------------------------------
    def _replica_at(self, address: str, model: str) -> Replica | None:
        for replica in self.fleet.for_model(model):
            if messages.address_of(replica.url) == address:
                return replica
        return None

    def _response_headers(self, x: _Exchange, request: Any) -> int:
        headers = messages.headers_of(request.response_headers)
        try:
            status = int(headers.get(":status", "0"))
        except ValueError:
            status = 0
        attempt = x.attempt
        if attempt is None or x.decision is None:
            return status
        served = messages.metadata_value(request, messages.LB_NAMESPACE, messages.SERVED)
        if isinstance(served, str) and served and messages.address_of(attempt.replica.url) != served:
            # Envoy's retries walked the list: the replicas before the one that served failed.
            replica = self._replica_at(served, attempt.route.index_model) or self._replica_at(
                served, attempt.route.model)
            if replica is not None:
                hooks = self.proxy.hooks
                hooks.failure(attempt, UpstreamFailure(attempt.replica, "connect",
                                                       "Envoy retried on the next endpoint"))
                hooks.complete(attempt, FAILURE)
                x.attempt = attempt = Attempt(attempt.route, replica, x.decision, x.record, attempt.number + 1)
                x.record.attempts = attempt.number
                x.record.replica = replica.id
                hooks.dispatch(attempt)
        if status >= 500 or status == 429:
            failure = UpstreamFailure(attempt.replica, "status_429" if status == 429 else "status_5xx",
                                      f"replica answered {status}", status=status)
            self.proxy.hooks.failure(attempt, failure)
            self._complete(x, FAILURE)
        return status

    def _response_body(self, x: _Exchange, body: bytes, end: bool, status: int) -> None:
        attempt = x.attempt
        if attempt is None or x.done:
            return
        if body and not x.first_byte:
            x.first_byte = True
            x.record.ttfb = x.record.elapsed()
            self.proxy.hooks.first_byte(attempt, status or 200)
        if body:
            x.tail = (x.tail + body)[-8192:]
        if end:
            if status == 200:
                x.record.cached_tokens = cached_tokens_of(x.tail)
            if not x.first_byte:
                x.first_byte = True
                self.proxy.hooks.first_byte(attempt, status or 200)
            self._complete(x, SUCCESS)

    def _complete(self, x: _Exchange, outcome: str) -> None:
        if x.attempt is not None and not x.done:
            x.done = True
            self.proxy.hooks.complete(x.attempt, outcome)

    def _finish(self, x: _Exchange, status: int) -> None:
        record = x.record
        if x.drain_key is not None:
            self.proxy.end(x.drain_key)
        if record.admitted and record.model is not None and not record.slot_released:
            self.intake.admission.on_request_end(record.model)
        self.intake.finish(record, CLIENT_CLOSED if record.client_gone else (status or record.status or 500))


def _peer_of(context: Any) -> str | None:
    """The client's address as gRPC names Envoy (``ipv4:127.0.0.1:1234``): Envoy's own."""
    peer = context.peer() if context is not None else ""
    if peer.startswith(("ipv4:", "ipv6:")):
        host = peer.split(":", 1)[1].rsplit(":", 1)[0]
        return host.strip("[]")
    return None


def _in_subset(candidates: list[Replica], hint: Any) -> list[Replica]:
    """The candidates the data plane's subset hint allows (matched on the address; GIE matches
    on the IP alone, the port included here when the hint names one)."""
    if hint is None:
        return candidates
    wanted = hint if isinstance(hint, list) else [h.strip() for h in str(hint).split(",")]
    wanted = [w for w in wanted if w]
    out = []
    for replica in candidates:
        address = messages.address_of(replica.url)
        host = address.rsplit(":", 1)[0]
        if address in wanted or host in wanted or host.strip("[]") in wanted:
            out.append(replica)
    return out


def forwardable(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The client's headers a replica may see (pseudo-headers and hop-by-hop ones dropped)."""
    return tuple((k, v) for k, v in headers.items()
                 if not k.startswith(":") and k.lower() not in _HOP_BY_HOP and k.lower() not in _CREDENTIALS)


