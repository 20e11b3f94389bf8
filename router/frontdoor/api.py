"""HTTP handlers: the OpenAI-compatible surface of the router.

    POST server.forward_paths            routed by body `model` (default: vLLM's inference
                                         API, router/paths.py; nothing else is forwarded)
    GET  /v1/models, /v1/models/{id}    models of healthy replicas plus aliases
    GET  /health                        the router process is alive
    GET  /ready                         every configured model has a healthy replica (the
                                        per-model counts only for an admin, see handle_ready)
    GET  /metrics                       the router's own Prometheus metrics (router_*)
    GET  /admin/replicas                the fleet as the router sees it (JSON; admin only)
    POST /admin/replicas, DELETE ...    register / remove a replica at run time (admin only)
    POST /admin/reload                  re-read routes.yaml and apply it (admin only)
    OPTIONS *                           CORS preflight (router/frontdoor/cors.py)

A forwarded request goes through, in order: the raw path check (400), the client key
(401), the body (read once, capped, decoded: 413/408/415/503), JSON parsing and the
fields the router reads (400), the model and the key's model allowlist (404), the
candidates (503), the rate limits (429), the admission queue (429), then the proxy.  The
bytes forwarded are the client's own, except that an alias in `model` is rewritten to
the canonical name and a compressed body is forwarded decompressed.  Every answer carries
the request id (the client's ``X-Request-Id`` or a generated one).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from aiohttp import web

from router.core.admission import Admission
from router.core.auth import KeyRing
from router.core.body_budget import BodyBudget, BodyLease
from router.core.catalog import ModelCatalog
from router.core.clients import Client
from router.core.intake import Arrival, Intake
from router.core.request_ids import RequestIds
from router.core.requests import RouteRequest
from router.core.response_ids import ResponseIds
from router.errors import CLIENT_CLOSED, RouterError, bad_request
from router.fleet.replicas import Fleet, Replica
from router.frontdoor.admin import Admin
from router.frontdoor.api_state import FleetControl
from router.frontdoor.limits import expect_continue, read_body
from router.frontdoor.status import Status
from router.frontdoor.status_page import StatusPage
from router.frontdoor.stored_responses import StoredResponses
from router.http_errors import Handler, error_answer, error_message, response_of
from router.observability.access_log import RequestRecord
from router.observability.recent import RecentRequests
from router.observability.telemetry import Telemetry
from router.paths import raw_path_problem
from router.prefix.agentic import RESPONSES_PATH
from router.transport.headers import forwardable_request_headers
from router.transport.proxy import Proxy

if TYPE_CHECKING:
    from aiohttp.typedefs import Middleware

    from router.config import Config
    from router.fleet.discovery import Discovery
    from router.fleet.kv_events import KVEvents
    from router.frontdoor.cors import Cors
    from router.prefix.exact import ExactIndex
    from router.prefix.index import PrefixIndex
    from router.transport.flows import Disaggregated, SingleHop
    from router.transport.prompt_tokens import PromptTokens

REQUEST_ID_KEY = web.RequestKey("request_id", str)
# Scrapes, probes and the status page's polls, answered fine, are neither counted nor logged
# (each would be a line a second).
_PROBES = frozenset(("/health", "/ready", "/metrics", "/admin/status.json"))



class Api:
    """The handlers, bound to the objects the app created."""

    def __init__(self, *, config: Config, fleet: Fleet, proxy: Proxy, flow: SingleHop, telemetry: Telemetry,
                 pd_flow: Disaggregated | None = None,
                 index: PrefixIndex | None = None, keyring: KeyRing | None = None,
                 admission: Admission | None = None, bodies: BodyBudget | None = None,
                 exact: ExactIndex | None = None, kv_events: KVEvents | None = None,
                 prompt_tokens: PromptTokens | None = None) -> None:
        self.config = config
        self.fleet = fleet
        self.proxy = proxy
        self.flow = flow
        self.pd_flow = pd_flow  # models with prefill and decode pools (flows.Disaggregated)
        # Which process answers (/admin/replicas): with `router --workers N`, the worker's index.
        self.worker: dict[str, int | None] = {"index": None, "pid": os.getpid()}
        self.discovery: Discovery | None = None  # set by the Router
        self.telemetry = telemetry
        self.index = index
        self.exact = exact
        self.kv_events = kv_events
        self.prompt_tokens = prompt_tokens
        self.keyring = keyring or KeyRing(config.auth, config.server.trusted_proxies)
        self.admission = admission or Admission(
            config.admission, retry_after=config.proxy.retry_after,
            on_queue=lambda model, n: telemetry.queue_length.labels(model).set(n))
        self.bodies = bodies or BodyBudget(config.server.max_inflight_body_bytes,
                                           config.proxy.retry_after)
        telemetry.set_function(telemetry.body_bytes, (), lambda: float(self.bodies.used))  # read at scrape
        self.reloader: FleetControl | None = None  # set by the Router: reload and registration
        self.catalog = ModelCatalog(config, fleet, on_forbidden=lambda: telemetry.rejections.labels(
            "forbidden_model").inc())
        self.draining = False
        self.rid_header = config.server.request_id_header
        self._new_ids = RequestIds()
        self.response_ids = ResponseIds(config.routing.response_id_secret)
        # The checks of a forwarded request, shared with the Envoy endpoint picker (core/intake.py).
        self.recent = RecentRequests()  # the status page's last requests and traffic shares
        self.intake = Intake(config=config, catalog=self.catalog, admission=self.admission,
                             rotation=proxy.rotation, telemetry=telemetry, response_ids=self.response_ids,
                             wants_exact=self._wants_exact_tokens, exact_tokens=self._exact_tokens,
                             recent=self.recent)
        # The handlers apart from forwarding, each reading this object's state (api_state.py).
        self.status = Status(self)
        self.admin = Admin(self)
        self.status_page = StatusPage(self, self.admin)
        self.stored = StoredResponses(self)

    def apply_config(self, config: Config) -> None:
        """A reload: new models, aliases, keys, the Retry-After of refusals; the server
        settings stay (router/reload.py says which sections apply)."""
        if config.auth != self.config.auth:
            self.keyring = KeyRing(config.auth, config.server.trusted_proxies)
        if config.routing.response_id_secret != self.config.routing.response_id_secret:
            self.response_ids = ResponseIds(config.routing.response_id_secret)
        self.config = config
        self.catalog.apply_config(config)
        self.intake.apply_config(config)
        self.intake.response_ids = self.response_ids
        self.admission.retry_after = self.bodies.retry_after = config.proxy.retry_after

    def routes(self) -> list[web.RouteDef]:
        post = [web.post(path, self.handle_inference, expect_handler=expect_continue)
                for path in self.config.server.forward_paths]
        if RESPONSES_PATH in self.config.server.forward_paths:  # stored responses, on their replica
            post += [web.get(RESPONSES_PATH + "/{response_id}", self.stored.handle),
                     web.post(RESPONSES_PATH + "/{response_id}/cancel", self.stored.handle)]
        return [
            *post,
            web.get("/v1/models", self.status.handle_models),
            web.get("/v1/models/{model:.+}", self.status.handle_model),
            web.get("/health", self.status.handle_health),
            web.get("/ready", self.status.handle_ready),
            web.get("/metrics", self.status.handle_metrics),
            web.get("/admin/replicas", self.admin.handle_replicas),
            web.post("/admin/replicas", self.admin.handle_register),
            web.delete("/admin/replicas", self.admin.handle_deregister),
            web.post("/admin/reload", self.admin.handle_reload),
            web.get("/admin/status", self.status_page.handle_page),
            web.get("/admin/status.json", self.status_page.handle_data),
        ]

    def front_door(self, cors: Cors) -> Middleware:
        """The one middleware every request passes, outermost first:

        1. every answer carries a request id, including the ones aiohttp makes (404/405);
        2. every error is OpenAI-shaped JSON, never a traceback (errors.error_answer);
        3. a path that is not plain is a 400 before any routing (router/paths.py);
        4. an ``OPTIONS`` request is CORS's to answer (router/frontdoor/cors.py).

        One layer, not four: each layer was a coroutine per request."""

        @web.middleware
        async def front_door(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                self._guard_path(request)
                response = cors.preflight(request) if request.method == "OPTIONS" else await handler(request)
            except Exception as exc:  # noqa: BLE001 - error_answer re-raises what it must not answer
                response = error_answer(request, exc)
            served = REQUEST_ID_KEY in request  # by `serve`: counted and logged there
            if not response.prepared and self.rid_header not in response.headers:
                request[REQUEST_ID_KEY] = self._request_id(request)  # (not served: none yet)
                response.headers[self.rid_header] = request[REQUEST_ID_KEY]
            if not served and (response.status >= 400 or request.path not in _PROBES):
                self._finish_own(request, response)
            return response

        return front_door

    def _guard_path(self, request: web.Request) -> None:
        """RouterError 400 for a path that is not plain (router/paths.py)."""
        raw = request.raw_path
        problem = raw_path_problem(raw)
        # Model ids may hold characters a client percent-encodes; that path is never forwarded.
        if problem is not None and not (request.method in ("GET", "HEAD")
                                        and raw.startswith("/v1/models/")
                                        and problem.startswith("percent")):
            self.telemetry.rejections.labels("bad_path").inc()
            raise bad_request(f"Invalid request path: {problem}")

    # -- POST: inference and pass-through --------------------------------------------
    def _request_id(self, request: web.Request) -> str:
        return self._new_ids.accept(request.headers.get(self.rid_header))

    async def handle_inference(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self._route)

    async def serve(self, request: web.Request, route: Callable[
            [web.Request, RequestRecord, BodyLease], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """One forwarded request's bookkeeping around `route`: its record, the drain's count,
        its body lease and admission slot given back, its request id, metrics and log line."""
        record = RequestRecord(request_id=self._request_id(request), method=request.method,
                               path=request.path, client=request.remote)
        request[REQUEST_ID_KEY] = record.request_id
        key = self.proxy.begin(record)
        lease = self.bodies.lease()
        response: web.StreamResponse | None = None
        try:
            try:
                response = await route(request, record, lease)
            except RouterError as exc:
                response = response_of(exc)
                record.error = record.error or exc.message  # the router's own refusal: why
            return response
        except asyncio.CancelledError:
            record.client_gone = True
            raise
        finally:
            lease.release()
            self.proxy.end(key)
            if response is not None and not response.prepared:
                response.headers[self.rid_header] = record.request_id
            status = CLIENT_CLOSED if record.client_gone else (
                response.status if response is not None else 500)
            self._finish(record, status)

    def reject(self, reason: str, error: RouterError) -> RouterError:
        return self.intake.reject(reason, error)

    async def _route(self, request: web.Request, record: RequestRecord,
                     lease: BodyLease) -> web.StreamResponse:
        resource = request.match_info.route.resource
        assert resource is not None  # only routed paths reach this handler
        path = resource.canonical  # the allowlist's own string
        if self.draining:
            raise RouterError(503, "The router is shutting down", headers={
                "Retry-After": str(self.config.proxy.retry_after), "Connection": "close"})
        try:
            client = self.keyring.client(request.headers, request.remote)
        except RouterError as exc:
            raise self.reject("auth", exc) from None
        record.client = client.address
        record.client_name = client.name
        server = self.config.server
        try:
            body = await read_body(request, server.max_body_bytes, timeout=server.body_timeout,
                                   lease=lease)
        except RouterError as exc:
            if exc.status == 503:
                self.telemetry.rejections.labels("body_budget").inc()
            raise
        arrival = Arrival(path=path, headers=request.headers, client=client, body=body,
                          forward_headers=forwardable_request_headers(request.headers, self.rid_header))
        admitted = await self.intake.admit(arrival, record, deadline_left=lambda: (
            self.config.proxy.deadline - record.elapsed()))
        route, admissible, model = admitted.route, admitted.candidates, admitted.model
        if model is not None and self.pd_flow is not None and admitted.disaggregated():
            return await self.pd_flow.forward(request, route, admissible, record, model.disaggregation)
        return await self.flow.forward(request, route, admissible, record,
                                       lora=model.lora if model is not None else None)

    def _wants_exact_tokens(self, candidates: list[Replica]) -> bool:
        """Would the prompt's exact token ids be read?  Only when a candidate is in exact
        mode (asked before `_exact_tokens`, so that the others pay for no coroutine)."""
        exact = self.exact
        return exact is not None and self.prompt_tokens is not None and exact.any_exact(r.id for r in candidates)

    async def _exact_tokens(self, route: RouteRequest, data: dict[str, Any],
                            candidates: list[Replica]) -> RouteRequest:
        """`route` with the prompt's exact token ids (prefix/prompt_tokens.py); any failure
        leaves the request to the approximate index."""
        assert self.prompt_tokens is not None  # _wants_exact_tokens said so
        tokens = await self.prompt_tokens.tokens(route, data, candidates)
        return route if tokens is None else replace(route, prompt_token_ids=tokens)

    def on_load(self, replica: Replica) -> None:
        """A replica's fresh load report: the admission queue may admit more."""
        model = replica.model
        if self.admission.queued(model):
            replicas = [r for r in self.fleet.for_model(model) if r.routable]
            self.admission.on_load(model, replicas)

    def _finish(self, record: RequestRecord, status: int) -> None:
        self.intake.finish(record, status)

    def _finish_own(self, request: web.Request, response: web.StreamResponse) -> None:
        """An answer the router made itself, not through `serve` (a 404 or 405 from aiohttp's
        routing, a path refused, the model list, an admin call): counted and logged as well,
        an error with its reason."""
        record = RequestRecord(request_id=request.get(REQUEST_ID_KEY) or "", method=request.method,
                               path=request.path, client=request.remote)
        body = getattr(response, "body", None)
        if response.status >= 400 and isinstance(body, bytes):
            record.error = error_message(body)
        self._finish(record, response.status)

    # -- GET endpoints --------------------------------------------------------------
    def client_of(self, request: web.Request) -> Client:
        try:
            return self.keyring.client(request.headers, request.remote)
        except RouterError as exc:
            raise self.reject("auth", exc) from None
