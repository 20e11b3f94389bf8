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
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web

from router.core.admission import Admission, QueueRejection, RateLimitExceeded
from router.core.catalog import ModelCatalog
from router.core.clients import Client
from router.core.requests import BodyError, RouteRequest, build_route_request, rewrite_model, validate_body
from router.core.response_ids import ID_LIMIT, ResponseIds, with_request_id
from router.core.scheduling import Decision
from router.errors import RouterError, bad_request
from router.fleet.handover import Handover
from router.fleet.membership import NoSuchReplica
from router.fleet.replicas import Fleet, Health, Replica
from router.frontdoor.auth import KeyRing
from router.frontdoor.limits import BodyBudget, BodyLease, read_body
from router.frontdoor.request_ids import RequestIds
from router.http_errors import Handler, error_answer, response_of
from router.observability.telemetry import NO_REPLICA, RequestRecord, Telemetry, write_access_log
from router.paths import raw_path_problem
from router.prefix.agentic import RESPONSES_PATH
from router.transport.failures import CLIENT_CLOSED
from router.transport.headers import forwardable_request_headers
from router.transport.proxy import Proxy
from yamlcheck import ConfigError

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

class FleetControl(Protocol):
    """What the admin handlers ask of the live fleet (router/reload.py: `Reloader`), named
    here because that wiring sits above the front door in the layers."""

    registered: dict[tuple[str, str], Replica]
    handover: Handover

    async def reload(self, path: str | None = None) -> dict[str, Any]: ...
    async def register(self, body: Any) -> Replica: ...
    async def deregister(self, body: Any) -> Replica: ...


INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")  # what a P/D flow splits
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,200}$")  # visible ASCII, bounded
REQUEST_ID_KEY = web.RequestKey("request_id", str)
_PRIORITY_RE = re.compile(r"^[+-]?\d{1,6}$")



async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` is answered at once; any other expectation is a JSON 417.

    aiohttp's own handler answers the second in text/plain, outside the middlewares.
    """
    expect = request.headers.get("Expect", "")
    if expect.lower() == "100-continue":
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None
    return response_of(RouterError(417, "Only 'Expect: 100-continue' is supported", param="Expect"))

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
        self._rid_header = config.server.request_id_header
        self._new_ids = RequestIds()
        self._session_header = config.routing.session_header
        self._priority_header = config.admission.priority_header
        self._models = {m.name: m for m in config.models}  # per-model settings (lora, disaggregation)
        self.response_ids = ResponseIds(config.routing.response_id_secret)

    def apply_config(self, config: Config) -> None:
        """A reload: new models, aliases, keys; the server settings stay (router/fleet/membership.py)."""
        if config.auth != self.config.auth:
            self.keyring = KeyRing(config.auth, config.server.trusted_proxies)
        if config.routing.response_id_secret != self.config.routing.response_id_secret:
            self.response_ids = ResponseIds(config.routing.response_id_secret)
        self.config = config
        self.catalog.apply_config(config)
        self._models = {m.name: m for m in config.models}

    def routes(self) -> list[web.RouteDef]:
        post = [web.post(path, self.handle_inference, expect_handler=expect_continue)
                for path in self.config.server.forward_paths]
        if RESPONSES_PATH in self.config.server.forward_paths:  # stored responses, on their replica
            post += [web.get(RESPONSES_PATH + "/{response_id}", self.handle_stored_response),
                     web.post(RESPONSES_PATH + "/{response_id}/cancel", self.handle_stored_response)]
        return [
            *post,
            web.get("/v1/models", self.handle_models),
            web.get("/v1/models/{model:.+}", self.handle_model),
            web.get("/health", self.handle_health),
            web.get("/ready", self.handle_ready),
            web.get("/metrics", self.handle_metrics),
            web.get("/admin/replicas", self.handle_replicas),
            web.post("/admin/replicas", self.handle_register),
            web.delete("/admin/replicas", self.handle_deregister),
            web.post("/admin/reload", self.handle_reload),
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
            if not response.prepared and self._rid_header not in response.headers:
                response.headers[self._rid_header] = request.get(REQUEST_ID_KEY) or self._request_id(request)
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
        given = request.headers.get(self._rid_header)
        if given and _REQUEST_ID_RE.match(given):
            return given
        return self._new_ids.new()

    async def handle_inference(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._route)

    async def handle_stored_response(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/responses/{id} (``stream``, ``starting_after``) and POST .../cancel: to the
        replica that holds the response (router/core/response_ids.py), never another."""
        return await self._serve(request, self._stored_response)

    async def _serve(self, request: web.Request, route: Callable[
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
            return response
        except asyncio.CancelledError:
            record.client_gone = True
            raise
        finally:
            lease.release()
            self.proxy.end(key)
            if record.admitted and record.model is not None and not record.slot_released:
                self.admission.on_request_end(record.model)
            if response is not None and not response.prepared:
                response.headers[self._rid_header] = record.request_id
            status = CLIENT_CLOSED if record.client_gone else (
                response.status if response is not None else 500)
            self._finish(record, status)

    def _reject(self, reason: str, error: RouterError) -> RouterError:
        self.telemetry.rejections.labels(reason).inc()
        return error

    def _priority(self, request: web.Request, client: Client) -> int:
        """The key's priority, or lower if the request's priority header asks for it."""
        given = request.headers.get(self._priority_header)
        if given is None:
            return client.priority
        if not _PRIORITY_RE.match(given.strip()):
            raise bad_request(f"'{self._priority_header}' must be an integer")
        return min(int(given), client.priority)

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
            raise self._reject("auth", exc) from None
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
        if not body or body.isspace():  # (no strip(): a copy of a body up to 32 MiB)
            raise bad_request("The request body is empty; expected a JSON object")
        try:
            data: Any = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"Malformed JSON in the request body: {exc}") from None
        try:
            data = validate_body(path, data)
        except BodyError as exc:
            raise bad_request(exc.message, exc.param) from None
        requested = data.get("model")
        if requested is None:
            catalog = self.catalog
            if path in INFERENCE_PATHS or len(catalog.model_names) != 1:
                raise bad_request("'model' is required", "model")
            requested = catalog.model_names[0]  # e.g. /tokenize without a model: the only one
            if requested not in catalog.known_models(client):
                raise catalog.no_such_model(requested, client)
        record.model = requested
        canonical, replicas = self.catalog.resolve(requested, client)
        record.model = canonical
        record.stream = data.get("stream") is True
        if canonical != requested and "model" in data:
            body = rewrite_model(body, data, canonical)
        if path == RESPONSES_PATH and isinstance(data.get("previous_response_id"), str):
            replicas = self._holder(data["previous_response_id"], replicas, "previous_response_id")
        candidates = [r for r in replicas if r.routable]
        if not candidates:
            raise self.proxy.unavailable(canonical)
        admissible = [r for r in candidates if self.proxy.admissible(r)]
        if not admissible:  # a half-open trial's verdict may be due: wait for it, not 503
            admissible = await self.proxy.admissible_or_wait(candidates, record)
            if not admissible:
                raise self._reject("ejected", self.proxy.ejected_error(canonical, candidates))
        session_key = request.headers.get(self._session_header) or None
        prefix = self.config.prefix
        route = build_route_request(
            model=canonical, path=path, data=data, body=body, request_id=record.request_id,
            headers=forwardable_request_headers(request.headers, self._rid_header),
            session_key=session_key, block_chars=prefix.block_chars,
            block_tokens=prefix.block_tokens, max_blocks=prefix.max_blocks_per_request)
        if path == RESPONSES_PATH and "request_id" not in data:
            route = replace(route, replica_body=self._response_body(route.body))
        adapter = self.catalog.adapter_of(canonical, replicas)
        if adapter is not None:
            route = replace(route, lora=canonical, base_model=adapter[0], adapter_path=adapter[1])
        try:
            self.admission.limiter.check(client, _token_cost(route.estimated_prompt_tokens, data))
        except RateLimitExceeded as exc:
            raise self._reject(f"rate_limit_{exc.kind}", exc.error) from None
        priority = self._priority(request, client)
        try:
            waited = 0.0 if self.admission.passes(canonical, admissible) else \
                await self.admission.admit(canonical, admissible, client, priority)
        except QueueRejection as exc:
            raise self._reject(exc.reason, exc.error) from None
        record.admitted = True
        if waited:
            record.queued_s = waited
            self.telemetry.queue_wait.labels(canonical).observe(waited)
            # The fleet may have changed while the request waited.
            admissible = [r for r in replicas if r.routable and self.proxy.admissible(r)]
            if not admissible:
                admissible = await self.proxy.admissible_or_wait(
                    [r for r in replicas if r.routable], record)
            if not admissible:
                raise self.proxy.unavailable(canonical)
        if self._wants_exact_tokens(admissible):
            route = await self._exact_tokens(route, data, admissible)
        # The parsed body is not needed past the decision: let it go before the request
        # is forwarded, so an in-flight body is held once (its bytes), not twice.
        del data
        model = self._models.get(route.index_model)
        if model is not None and model.disaggregated and self.pd_flow is not None \
                and route.adapter_path is None and path in GENERATION_PATHS:
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

    # -- stored responses (router/core/response_ids.py) -------------------------------------
    def _response_body(self, body: bytes | bytearray) -> Callable[[Replica], bytes]:
        """The Responses body for an attempt on a replica: with a `request_id` naming it."""
        ids = self.response_ids
        return lambda replica: with_request_id(body, ids.new_id(replica))

    def _holder(self, response_id: str, replicas: Sequence[Replica], param: str) -> list[Replica]:
        """The one replica among `replicas` that holds `response_id`, when the id is one the
        router issued; 404 when none of them does; `replicas` unchanged for other ids."""
        if ResponseIds.token_of(response_id) is None:
            return list(replicas)
        holder = self.response_ids.replica_of(response_id, replicas)
        if holder is None:
            self.telemetry.rejections.labels("response_not_found").inc()
            raise _not_found(response_id, param)
        return [holder]

    async def _stored_response(self, request: web.Request, record: RequestRecord,
                               lease: BodyLease) -> web.StreamResponse:
        if self.draining:
            raise RouterError(503, "The router is shutting down", headers={
                "Retry-After": str(self.config.proxy.retry_after), "Connection": "close"})
        client = self._client(request)
        record.client, record.client_name = client.address, client.name
        response_id = request.match_info["response_id"]
        if ResponseIds.token_of(response_id) is None:
            raise _not_found(response_id, "response_id")  # not an id the router issued
        replica = self._holder(response_id, list(self.fleet), "response_id")[0]
        if not self.catalog.may_use(client, replica.model):
            raise _not_found(response_id, "response_id")  # a model the key may not use: as if absent
        record.model = replica.model
        try:
            self.admission.limiter.check(client, 0)
        except RateLimitExceeded as exc:
            raise self._reject(f"rate_limit_{exc.kind}", exc.error) from None
        if not self.proxy.admissible(replica):
            raise RouterError(503, f"The replica that holds response '{response_id}' is unavailable "
                                   "right now; retry shortly",
                              headers={"Retry-After": str(self.config.proxy.retry_after)})
        path = request.path
        stream = False
        if request.method == "GET":
            query = _stored_response_query(request)
            stream = query.get("stream") == "true"
            if query:
                path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        route = RouteRequest(model=replica.model, path=path, body=b"", stream=stream,
                             request_id=record.request_id, method=request.method,
                             headers=forwardable_request_headers(request.headers, self._rid_header))
        decision = Decision(ranked=[replica], why={"stored_response": True})
        return await self.proxy.forward(request, route, decision, record)

    def on_load(self, replica: Replica) -> None:
        """A replica's fresh load report: the admission queue may admit more."""
        model = replica.model
        if self.admission.queued(model):
            replicas = [r for r in self.fleet.for_model(model) if r.routable]
            self.admission.on_load(model, replicas)

    def _finish(self, record: RequestRecord, status: int) -> None:
        record.status = status
        duration = record.elapsed()
        # Only names the fleet knows become label values (a client's typo must not mint series).
        model = record.model if record.model and self.catalog.knows(record.model) else NO_REPLICA
        t = self.telemetry
        t.child(t.requests, model, record.replica or NO_REPLICA, str(status)).inc()
        t.child(t.duration, model).observe(duration)
        if record.client_gone:
            t.client_disconnects.labels(model).inc()
        if self.config.server.access_log:
            write_access_log(record, duration, self.config.server.log_format)

    # -- GET endpoints --------------------------------------------------------------
    def _client(self, request: web.Request) -> Client:
        try:
            return self.keyring.client(request.headers, request.remote)
        except RouterError as exc:
            raise self._reject("auth", exc) from None

    async def handle_models(self, request: web.Request) -> web.Response:
        client = self._client(request)
        catalog = self.catalog
        return _json({"object": "list",
                      "data": [e for e in catalog.model_list() if catalog.may_use(client, e["id"])]})

    async def handle_model(self, request: web.Request) -> web.Response:
        client = self._client(request)
        name = request.match_info["model"]
        catalog = self.catalog
        for entry in catalog.model_list():
            if entry["id"] == name and catalog.may_use(client, name):
                return _json(entry)
        catalog.resolve(name, client)  # 404 with the valid names if it is unknown altogether
        raise self.proxy.unavailable(name)

    async def handle_health(self, request: web.Request) -> web.Response:
        return _json({"status": "draining" if self.draining else "ok"})

    async def handle_ready(self, request: web.Request) -> web.Response:
        """200 ready / 503 not.  Anyone gets the bare status (load balancers and Kubernetes
        call it without keys); the per-model counts name every model, so only a client the
        admin endpoints would answer gets them (a key's 404 must not be undone here)."""
        models = {}
        for name in self.catalog.model_names:
            replicas = self.fleet.for_model(name)
            models[name] = {
                # (a replica serving another model than its configured one gets no traffic)
                "healthy": sum(1 for r in replicas if r.health is Health.HEALTHY and not r.model_mismatch),
                "total": len(replicas),
            }
        ready = not self.draining and bool(models) and all(m["healthy"] > 0 for m in models.values())
        payload: dict[str, Any] = {"ready": ready, "draining": self.draining}
        if self.keyring.is_admin(request.headers, request.remote):
            payload["models"] = models
        return _json(payload, status=200 if ready else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        if self.keyring.protect_metrics:
            self.keyring.check_admin(request.headers, request.remote)
        body, content_type = self.telemetry.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def handle_reload(self, request: web.Request) -> web.Response:
        """Re-read routes.yaml and apply it; 400 naming the file and key if it is invalid."""
        self.keyring.check_admin(request.headers, request.remote)
        assert self.reloader is not None
        try:
            summary = await self.reloader.reload()
        except ConfigError as exc:
            raise RouterError(400, f"Reload refused, nothing changed: {exc}") from None
        return _json({"reloaded": True, **summary})

    async def _admin_body(self, request: web.Request) -> Any:
        self.keyring.check_admin(request.headers, request.remote)
        lease = self.bodies.lease()
        try:
            raw = await read_body(request, 64 * 1024, timeout=self.config.server.body_timeout,
                                  lease=lease)
        finally:
            lease.release()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"Malformed JSON in the request body: {exc}") from None

    async def _membership(self, request: web.Request,
                          change: Callable[[Any], Awaitable[Replica]]) -> Replica:
        """Apply one admin membership change: 400 for a bad body, 404 for an unknown replica
        (403 for a registration outside auth.admin_replica_networks, raised as it is)."""
        body = await self._admin_body(request)
        try:
            return await change(body)
        except ConfigError as exc:
            raise bad_request(str(exc)) from None
        except NoSuchReplica as exc:
            raise RouterError(404, str(exc)) from None

    async def handle_register(self, request: web.Request) -> web.Response:
        """POST /admin/replicas {model, url, ...}: a new replica (traffic after its first probe)."""
        assert self.reloader is not None
        replica = await self._membership(request, self.reloader.register)
        return _json({"registered": {"model": replica.model, "url": replica.url,
                                     "health": replica.health.value}}, status=201)

    async def handle_deregister(self, request: web.Request) -> web.Response:
        """DELETE /admin/replicas {url, model?}: no new requests; in-flight ones finish."""
        assert self.reloader is not None
        replica = await self._membership(request, self.reloader.deregister)
        return _json({"removed": {"model": replica.model, "url": replica.url,
                                  "in_flight": replica.in_flight}})

    def _source(self, replica: Replica) -> str:
        """Where a replica came from: the config, the admin API or discovery."""
        if self.discovery is not None and self.discovery.owns(replica.model, replica.url):
            return "discovery"
        if self.reloader is not None and (replica.model, replica.url) in self.reloader.registered:
            return "admin"
        return "config"

    async def handle_replicas(self, request: web.Request) -> web.Response:
        self.keyring.check_admin(request.headers, request.remote)
        replicas = []
        profile = self.flow.profile()
        for r in self.fleet:
            rate = profile.prefill_rate(r)
            replicas.append({
                "url": r.url, "model": r.model, "health": r.health.value,
                "tensor_parallel_size": r.tensor_parallel_size, "weight": r.weight,
                "prefill_tokens_per_s": round(rate, 1) if rate is not None else None,
                "labels": dict(r.labels), "served_models": sorted(r.served_models),
                "role": r.role, "adapters": sorted(r.adapters),
                "adapter_slots": {"likely_loaded": r.lora_slots.names(),
                                  "max_loras": r.lora_slots.max_loras,
                                  "running": sorted(r.lora_slots.running)},
                "source": self._source(r),
                # a reload dropped it; it serves until its successors are healthy (handover.py)
                "leaving": self.reloader is not None and self.reloader.handover.is_leaving(r),
                # what it serves instead of its configured model (then it gets no traffic)
                "model_mismatch": sorted(r.model_mismatch) or None,
                "max_model_len": r.max_model_len, "in_flight": r.in_flight,
                # uncached prompt tokens of its unanswered streams: what the queue term charges
                "pending_prefill_tokens": r.pending_prefill_tokens,
                "consecutive_failures": r.consecutive_failures,
                "circuit_breaker": {"state": r.breaker.state.value,
                                    "consecutive_failures": r.breaker.failures,
                                    "retry_in_s": round(self.proxy.breakers.retry_in(r.breaker), 3),
                                    "last_failure": r.breaker.last_reason},
                "load": {"running": r.load.running, "waiting": r.load.waiting,
                         "kv_cache_usage": r.load.kv_cache_usage,
                         "prefix_cache_queries": r.load.prefix_cache_queries,
                         "prefix_cache_hits": r.load.prefix_cache_hits,
                         "block_size": r.load.block_size, "num_gpu_blocks": r.load.num_gpu_blocks},
                "kv_events": self.kv_events.stats(r.id) if self.kv_events is not None else None,
            })
        payload: dict[str, Any] = {**profile.describe(), "worker": self.worker, "replicas": replicas,
                                   "active_requests": len(self.proxy.active),
                                   "admission_queue": self.admission.waiting,
                                   "request_body_bytes_held": self.bodies.used}
        if self.discovery is not None and self.discovery.states:
            payload["discovery"] = self.discovery.stats()
        if self.index is not None and hasattr(self.index, "stats"):
            stats = self.index.stats()
            payload["prefix_index"] = {k: v for k, v in stats.items() if k != "replicas"}
        if self.exact is not None and self.exact.replicas:
            payload["exact_prefix_index"] = self.exact.stats()
        return _json(payload)


def _not_found(response_id: str, param: str) -> RouterError:
    """vLLM's own answer for a stored response it does not hold (404, its wording)."""
    shown = response_id if len(response_id) <= ID_LIMIT else response_id[:ID_LIMIT] + "..."
    return RouterError(404, f"Response with id '{shown}' not found.", param=param,
                       type="invalid_request_error")


_STORED_QUERY = {"stream": re.compile(r"^(true|false)$"), "starting_after": re.compile(r"^-?\d{1,9}$")}


def _stored_response_query(request: web.Request) -> dict[str, str]:
    """The query parameters vLLM reads on GET /v1/responses/{id}, checked (400 otherwise);
    nothing else of the client's query string is forwarded."""
    out: dict[str, str] = {}
    for name, value in request.query.items():
        pattern = _STORED_QUERY.get(name)
        if pattern is None:
            continue
        lowered = value.lower()
        if not pattern.match(lowered):
            raise bad_request(f"Invalid value for query parameter '{name}'", name)
        out[name] = lowered
    return out


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def _token_cost(prompt_tokens: int, data: dict[str, Any]) -> int:
    """What a request costs a tokens-per-minute bucket: its prompt plus its max output."""
    out = data.get("max_completion_tokens", data.get("max_tokens", data.get("max_output_tokens")))
    return prompt_tokens + (out if isinstance(out, int) and not isinstance(out, bool) and out > 0 else 0)
