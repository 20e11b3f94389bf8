"""``envoy.service.ext_proc.v3.ExternalProcessor/Process``: one gRPC stream per HTTP request
that Envoy routes through the picker, answered the way the Gateway API Inference Extension's
endpoint picker answers (router/picker/messages.py).

Request phase: the headers, then the body (full-duplex streamed, as the GIE asks, or
buffered).  At the body's end (or its trailers) the picker checks the path as the front door
does (plain, one of ``server.forward_paths``), runs the core's intake (keys, body checks,
model and access, breakers, rate limits, admission: router/core/intake.py) and the single
hop's decision (the profile, an adapter loaded first: transport/flows.SingleHop.decide), and
answers the ranked ``ip:port`` list; in full-duplex mode it then streams the body back
(Envoy forwards only what the picker returns).  A request without a body is answered by the
picker itself: ``GET /v1/models`` (the models the key may use), else 404.  A refusal is an
immediate answer in the OpenAI error shape (400, 401, 404, 413, 429 with Retry-After, 503).

Response phase: the attempt hooks hear what the proxy's transport would tell them, so the
in-flight counts, breakers, prefix index, learned rates and admission stay as exact as in
proxy mode.  The endpoint that served is read from ``envoy.lb/…-served`` (Envoy's retries
may have walked the list: each endpoint ranked before it counts as a failed attempt); a 5xx
or 429 is a failure; the first body byte is the first byte; the body's end (or headers that
end the answer) completes the attempt and its last bytes give ``cached_tokens``.  A stream
that ends before that (the client left, Envoy gave up) completes it as abandoned, logged 499.

Lean mode (``router envoy-bootstrap --lean``: the body buffered, no response body): three
messages each way per request instead of one per chunk.  The status and the served endpoint
still come with the response headers; the stream's end, which Envoy sends when the answer
has ended, is the answer's first byte and end, as for a whole answer in proxy mode (a
stream's prompt is not counted pending on its replica, its timing teaches no prefill rate).
Lost: ``cached_tokens`` (the prediction-accuracy metric), and a client that leaves in the
middle of an answer reads as answered (Envoy ends the stream the same way).

The data plane's subset hint restricts the replicas before admission (a request never queues
for replicas it may not use); the body is held against ``server.max_inflight_body_bytes``
(shared with the proxy mode) until the decision.

Prefill/decode disaggregation (a model with prefill and decode pools): the core's flow
(transport/flows.Disaggregated.prefill) ranks the decode pool, decides whether the prefill
hop is worth it, and sends it from the picker's process (a whole answer of one token, with
failover, bounded by ``disaggregation.transfer_timeout``); the picker then routes the request
to the decode ranking with its body rewritten to carry the prefill's ``kv_transfer_params``
(a body mutation), and Envoy carries the decode hop and its stream.  A prefill answer other
than 200 goes to the client as it is.  Unlike the proxy, a decode replica's 5xx after a
prefill reaches the client as the replica's (no 502 rewrite: Envoy relays it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg
from multidict import CIMultiDict, CIMultiDictProxy

from router.config import Config
from router.core.auth import KeyRing
from router.core.body_budget import BodyBudget, BodyLease, too_large
from router.core.clients import Client
from router.core.intake import Arrival, Intake
from router.core.request_ids import RequestIds
from router.errors import CLIENT_CLOSED, RouterError, error_body
from router.fleet.replicas import Replica
from router.observability.access_log import RequestRecord
from router.paths import raw_path_problem
from router.picker import messages
from router.transport.failures import UpstreamFailure
from router.transport.flows import Disaggregated, SingleHop
from router.transport.headers import forwardable_request_headers
from router.transport.hooks import ABANDONED, FAILURE, SUCCESS, Attempt
from router.transport.proxy import Proxy
from router.transport.usage import cached_tokens_of

log = logging.getLogger("router.picker")

FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
NO_BODY = processing_mode_pb2.ProcessingMode.NONE
MODELS_PATH = "/v1/models"


@dataclass
class _Exchange:
    """One HTTP request's state over its ext_proc stream."""

    record: RequestRecord
    duplex: bool
    lean: bool = False  # Envoy sends no response body: the stream's end is the answer's
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytearray = field(default_factory=bytearray)
    decided: bool = False  # the request phase is answered (routed, or refused)
    attempt: Attempt | None = None
    first_byte: bool = False
    done: bool = False  # the attempt's hooks heard its end
    tail: bytes = b""  # the last bytes of the answer: its usage
    lease: BodyLease | None = None  # the body's share of server.max_inflight_body_bytes
    subset: Any = None  # the data plane's subset hint, from whichever message carried it


class EndpointPicker(epg.ExternalProcessorServicer):  # type: ignore[misc]
    """Decides each request Envoy asks about; one per router process."""

    def __init__(self, *, intake: Intake, keyring: Callable[[], KeyRing], flow: SingleHop,
                 proxy: Proxy, bodies: BodyBudget, pd_flow: Disaggregated | None = None,
                 default_duplex: bool = True) -> None:
        self.intake = intake
        self.pd_flow = pd_flow  # models with prefill and decode pools: the prefill hop's half
        self.bodies = bodies  # shared with the proxy mode's front door in this process
        self.keyring = keyring  # the current keys (a reload may replace them)
        self.flow = flow
        self.proxy = proxy
        self.default_duplex = default_duplex
        self.request_ids = RequestIds()

    @property
    def config(self) -> Config:
        return self.intake.config  # (a reload swaps it there)

    async def Process(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        record = RequestRecord(request_id="", method="POST", path="", client=_peer_of(context))
        x = _Exchange(record, duplex=self.default_duplex, lease=self.bodies.lease())
        key = self.proxy.begin(record)
        status = 0
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("request")
                if not x.decided and request.HasField("metadata_context"):
                    hint = messages.metadata_value(request, messages.SUBSET_NAMESPACE, messages.SUBSET)
                    x.subset = hint if hint is not None else x.subset
                if request.HasField("protocol_config"):  # (the stream's first message)
                    x.duplex = request.protocol_config.request_body_mode == FULL_DUPLEX
                    x.lean = request.protocol_config.response_body_mode == NO_BODY
                answers: list[Any] = []
                if kind == "request_headers":
                    self._read_headers(x, request.request_headers)
                    if request.request_headers.end_of_stream:
                        answers = await self._decide(x, request)  # no body
                    elif not x.duplex:
                        answers = [messages.empty_headers(request=True)]
                elif kind == "request_body":
                    chunk = request.request_body.body
                    x.body += chunk
                    limit = self.config.server.max_body_bytes
                    refused = self._lease(x, len(chunk))
                    if refused is not None:
                        answers = [refused]
                    elif len(x.body) > limit:
                        answers = [self._refuse(x, too_large(limit))]
                    elif request.request_body.end_of_stream:
                        answers = await self._decide(x, request)
                elif kind == "request_trailers":  # trailers end a body whose chunks did not
                    answers = [] if x.decided else await self._decide(x, request, body_ends=False)
                    answers.append(messages.empty_trailers(request=True))
                elif kind == "response_headers":
                    status = self._response_headers(x, request)
                    answers = [messages.empty_headers(request=False)]
                elif kind == "response_body":
                    chunk = request.response_body
                    self._response_body(x, chunk.body, chunk.end_of_stream, status)
                    answers = messages.streamed_body(chunk.body, request=False, end=chunk.end_of_stream)
                elif kind == "response_trailers":
                    self._complete(x, SUCCESS if status < 500 else FAILURE)
                    answers = [messages.empty_trailers(request=False)]
                for answer in answers:
                    yield answer
                    if answer.HasField("immediate_response"):
                        status = answer.immediate_response.status.code
                        return
        finally:  # the stream ended: half-closed, or reset (CancelledError) by Envoy, which
            # resets as often as it half-closes once the last message is answered: whether the
            # client left is told by whether the answer had ended, not by how the stream did
            if x.lease is not None:
                x.lease.release()
            if x.lean and status and not x.done:  # the answer has ended (or its client left:
                self._first_byte(x, status)        # Envoy does not say which)
                self._complete(x, SUCCESS)
            if not x.done and (x.attempt is not None or not x.decided):
                record.client_gone = True
            if not x.done and x.attempt is not None:
                self._complete(x, ABANDONED)
            self.proxy.end(key)
            self.intake.finish(record, CLIENT_CLOSED if record.client_gone else (status or record.status or 500))

    # -- the request phase ---------------------------------------------------------------
    def _read_headers(self, x: _Exchange, message: Any) -> None:
        x.headers = messages.headers_of(message)
        record = x.record
        record.method = x.headers.get(":method", "GET")
        record.path = x.headers.get(":path", "/").split("?", 1)[0]
        record.request_id = self.request_ids.accept(x.headers.get(self.config.server.request_id_header))

    async def _decide(self, x: _Exchange, request: Any, body_ends: bool = True) -> list[Any]:
        """The answer to a request whose body (if any) has arrived: where it goes, or why not."""
        x.decided = True
        sent, x.body = bytes(x.body), bytearray()  # held once, not for the whole answer
        try:
            return await self._route(x, request, sent, body_ends)
        finally:
            if x.lease is not None:
                x.lease.release()  # Envoy holds the body from here

    async def _route(self, x: _Exchange, request: Any, sent: bytes, body_ends: bool) -> list[Any]:
        record = x.record
        try:
            problem = raw_path_problem(x.headers.get(":path", "/"))
            if problem is not None:
                raise self.intake.reject("bad_path", RouterError(400, f"Invalid request path: {problem}"))
            client = self._client(x)
            record.client, record.client_name = client.address, client.name
            if not sent:
                return [self._bodiless(x, client)]
            if record.method != "POST" or record.path not in self.config.server.forward_paths:
                raise RouterError(404, f"Not found: {record.method} {record.path}")
            headers = CIMultiDictProxy(CIMultiDict((k, v) for k, v in x.headers.items() if not k.startswith(":")))
            hint = x.subset
            arrival = Arrival(path=record.path, headers=headers, client=client, body=sent,
                              forward_headers=forwardable_request_headers(
                                  headers, self.config.server.request_id_header),
                              allowed=None if hint is None else _subset(hint))
            admitted = await self.intake.admit(arrival, record, deadline_left=lambda: (
                self.proxy.config.deadline - record.elapsed()))
            model, route = admitted.model, admitted.route
            if model is not None and self.pd_flow is not None and admitted.disaggregated():
                # The picker sends the prefill hop itself (its answer is one token); Envoy
                # carries the decode hop, its body now with the prefill's kv_transfer_params.
                handoff = await self.pd_flow.prefill(None, route, admitted.candidates, record,
                                                     model.disaggregation)
                if isinstance(handoff, web.Response):
                    return [self._prefill_answer(x, handoff)]
                assert not isinstance(handoff, web.StreamResponse)  # (an inner hop's is whole)
                route, decision = handoff
            else:
                decision = await self.flow.decide(route, admitted.candidates, record,
                                                  model.lora if model is not None else None)
        except RouterError as exc:
            return [self._refuse(x, exc)]
        ranked = decision.ranked[:max(1, self.proxy.config.max_attempts)]
        # Lean: the first byte of a stream is not seen, only the end, so the hooks hear it as
        # a whole answer (its prompt is not counted pending, its timing teaches no rate).
        heard = replace(route, stream=False) if x.lean and route.stream else route
        x.attempt = Attempt(heard, ranked[0], decision, record, 1)
        record.attempts, record.replica = 1, ranked[0].id
        self.proxy.hooks.dispatch(x.attempt)
        endpoints = ",".join(messages.address_of(r.url) for r in ranked)
        body = route.body_for(ranked[0])
        # The replica's own key (the replicas of one model share it in practice: a retry on
        # the next endpoint of the list sends the same header).
        extra = [("authorization", f"Bearer {ranked[0].api_key}")] if ranked[0].api_key else []
        if x.duplex:
            return [messages.route_headers(endpoints, extra),
                    *messages.streamed_body(bytes(body), request=True, end=body_ends)]
        return [messages.route_body(endpoints, None if body is sent else bytes(body), extra)]

    def _lease(self, x: _Exchange, n: int) -> Any:
        """Hold `n` more body bytes, or the 503 that refuses the request (the budget is full)."""
        assert x.lease is not None
        try:
            x.lease.take(n)
        except RouterError as exc:
            return self._refuse(x, self.intake.reject("body_budget", exc))
        return None

    def _client(self, x: _Exchange) -> Client:
        try:
            return self.keyring().client(x.headers, x.record.client)
        except RouterError as exc:
            raise self.intake.reject("auth", exc) from None

    def _bodiless(self, x: _Exchange, client: Client) -> Any:
        """A request without a body goes to no replica: ``GET /v1/models`` is answered here
        (the models this key may use), anything else is a 404."""
        record = x.record
        if record.method in ("GET", "HEAD") and record.path == MODELS_PATH:
            catalog = self.intake.catalog
            listing = {"object": "list",
                       "data": [e for e in catalog.model_list() if catalog.may_use(client, e["id"])]}
            record.status = 200
            return messages.immediate(200, orjson.dumps(listing), {})
        raise RouterError(404, f"Not found: {record.method} {record.path} (the endpoint picker routes "
                               f"the inference API: {', '.join(self.config.server.forward_paths)})")

    def _prefill_answer(self, x: _Exchange, answer: web.Response) -> Any:
        """A disaggregated request's prefill hop answered other than 200 (a 4xx is the
        request's own error, a 5xx came after failover): the client gets it as it is."""
        x.decided = True
        x.record.status = answer.status
        body = answer.body if isinstance(answer.body, bytes) else b""
        kept = {k: v for k, v in answer.headers.items() if k.lower() == "retry-after"}
        return messages.immediate(answer.status, body, kept)

    def _refuse(self, x: _Exchange, error: RouterError) -> Any:
        x.decided = True
        x.record.status = error.status
        x.record.error = error.message
        return messages.immediate(error.status, error_body(error.status, error.message, param=error.param,
                                                           type=error.type), error.headers)

    # -- the response phase --------------------------------------------------------------
    def _response_headers(self, x: _Exchange, request: Any) -> int:
        headers = messages.headers_of(request.response_headers)
        try:
            status = int(headers.get(":status", "0"))
        except ValueError:
            status = 0
        attempt = x.attempt
        if attempt is None:
            return status
        served = messages.metadata_value(request, messages.LB_NAMESPACE, messages.SERVED)
        if isinstance(served, str) and served:
            attempt = self._served_by(x, attempt, served)
        if status >= 500 or status == 429:
            failure = UpstreamFailure(attempt.replica, "status_429" if status == 429 else "status_5xx",
                                      f"replica answered {status}", status=status)
            self.proxy.hooks.failure(attempt, failure)
            self._complete(x, FAILURE)
        elif request.response_headers.end_of_stream and not x.lean:  # an answer without a body
            self._first_byte(x, status)
            self._complete(x, SUCCESS)
        return status

    def _served_by(self, x: _Exchange, attempt: Attempt, served: str) -> Attempt:
        """Envoy's retries walked the list to `served`: each endpoint ranked before it failed
        (connect failures, resets, 5xx or 429: Envoy does not say which), the served one is
        the request's attempt from now on."""
        ranked = attempt.decision.ranked
        at = next((i for i, r in enumerate(ranked) if messages.address_of(r.url) == served), None)
        if at is None or ranked[at] is attempt.replica:
            return attempt
        hooks = self.proxy.hooks
        for number, replica in enumerate(ranked[:at], start=1):
            walked = attempt if replica is attempt.replica else Attempt(
                attempt.route, replica, attempt.decision, x.record, number)
            if walked is not attempt:
                hooks.dispatch(walked)
            hooks.failure(walked, UpstreamFailure(replica, "connect", "Envoy moved to the next endpoint"))
            hooks.complete(walked, FAILURE)
        x.attempt = Attempt(attempt.route, ranked[at], attempt.decision, x.record, at + 1)
        x.record.attempts, x.record.replica = at + 1, ranked[at].id
        hooks.dispatch(x.attempt)
        return x.attempt

    def _first_byte(self, x: _Exchange, status: int) -> None:
        if x.attempt is not None and not x.first_byte:
            x.first_byte = True
            x.record.ttfb = x.record.elapsed()
            self.proxy.hooks.first_byte(x.attempt, status or 200)

    def _response_body(self, x: _Exchange, body: bytes, end: bool, status: int) -> None:
        if x.attempt is None or x.done:
            return
        if body or end:
            self._first_byte(x, status)
        if body:
            x.tail = body[-8192:] if len(body) >= 8192 else (x.tail + body)[-8192:]
        if end:
            if status == 200:
                x.record.cached_tokens = cached_tokens_of(x.tail)
            self._complete(x, SUCCESS)

    def _complete(self, x: _Exchange, outcome: str) -> None:
        if x.attempt is not None and not x.done:
            x.done = True
            self.proxy.hooks.complete(x.attempt, outcome)


def _peer_of(context: Any) -> str | None:
    """The client's address as gRPC names Envoy (``ipv4:127.0.0.1:1234``): Envoy's own."""
    peer = context.peer() if context is not None else ""
    if peer.startswith(("ipv4:", "ipv6:")):
        host = peer.split(":", 1)[1].rsplit(":", 1)[0]
        return host.strip("[]")
    return None


def _subset(hint: Any) -> Callable[[Replica], bool]:
    """Whether a replica is in the data plane's subset hint (matched on the address; GIE
    matches on the IP alone, the port included here when the hint names one)."""
    wanted = hint if isinstance(hint, list) else [h.strip() for h in str(hint).split(",")]
    names = frozenset(w for w in wanted if w)

    def allowed(replica: Replica) -> bool:
        address = messages.address_of(replica.url)
        host = address.rsplit(":", 1)[0]
        return address in names or host in names or host.strip("[]") in names

    return allowed
