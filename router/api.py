"""HTTP handlers: the OpenAI-compatible surface of the router.

    POST /v1/chat/completions, /v1/completions, /v1/embeddings      routed by body `model`
    POST /v1/* (any other), /tokenize, /detokenize                   passed through the same way
    GET  /v1/models, /v1/models/{id}    models of healthy replicas plus aliases
    GET  /health                        the router process is alive
    GET  /ready                         every configured model has a healthy replica
    GET  /metrics                       the router's own Prometheus metrics (router_*)
    GET  /admin/replicas                the fleet as the router sees it (JSON)

Each POST body is read once (capped at ``server.max_body_bytes``: 413) and parsed once
with orjson; the bytes forwarded are the client's own, except that an alias in `model`
is rewritten to the canonical name.  Every answer carries the request id (the client's
``X-Request-Id`` or a generated one).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from router.errors import RouterError, bad_request
from router.fleet import Fleet, Health, Replica
from router.limits import read_body
from router.proxy import CLIENT_CLOSED, Proxy, forwardable_request_headers
from router.requests import BodyError, build_route_request, rewrite_model, validate_body
from router.telemetry import NO_REPLICA, RequestRecord, Telemetry, write_access_log

if TYPE_CHECKING:
    from router.config import Config
    from router.prefix.index import PrefixIndex

INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
PASS_THROUGH_PATHS = ("/tokenize", "/detokenize")
GET_ONLY_PATHS = frozenset({"/v1/models"})
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,200}$")  # visible ASCII, bounded
REQUEST_ID_KEY = web.RequestKey("request_id", str)


class Api:
    """The handlers, bound to the objects the app created."""

    def __init__(self, *, config: "Config", fleet: Fleet, proxy: Proxy, telemetry: Telemetry,
                 index: "PrefixIndex | None" = None) -> None:
        self.config = config
        self.fleet = fleet
        self.proxy = proxy
        self.telemetry = telemetry
        self.index = index
        self.aliases = config.aliases()
        self.model_names = [m.name for m in config.models] or fleet.models()
        self.draining = False
        self.started = int(time.time())
        self._rid_header = config.server.request_id_header
        self._session_header = config.routing.session_header

    def routes(self) -> list[web.RouteDef]:
        post = [web.post(path, self.handle_inference) for path in INFERENCE_PATHS]
        post += [web.post(path, self.handle_inference) for path in PASS_THROUGH_PATHS]
        return [
            *post,
            web.get("/v1/models", self.handle_models),
            web.get("/v1/models/{model:.+}", self.handle_model),
            web.get("/health", self.handle_health),
            web.get("/ready", self.handle_ready),
            web.get("/metrics", self.handle_metrics),
            web.get("/admin/replicas", self.handle_replicas),
            web.post("/v1/{tail:.*}", self.handle_inference),
        ]

    @web.middleware
    async def request_id_middleware(self, request: web.Request, handler) -> web.StreamResponse:  # type: ignore[no-untyped-def]
        """Every answer carries a request id, including the ones aiohttp makes (404/405)."""
        response = await handler(request)
        if not response.prepared and self._rid_header not in response.headers:
            response.headers[self._rid_header] = request.get(REQUEST_ID_KEY) or self._request_id(request)
        return response

    # -- model names ----------------------------------------------------------------
    def known_models(self) -> list[str]:
        """Every name a client may use: configured models, aliases, discovered names."""
        names = list(self.model_names) + list(self.aliases)
        for replica in self.fleet:
            names.extend(sorted(replica.served_models - set(names)))
        return list(dict.fromkeys(names))

    def resolve(self, name: str) -> tuple[str, list[Replica]]:
        """(canonical name, its replicas) for a requested model name or alias; 404 if none."""
        canonical = self.aliases.get(name, name)
        replicas = self.fleet.for_model(canonical)
        if replicas:
            return canonical, replicas
        served = [r for r in self.fleet if name in r.served_models]
        if served:  # e.g. a LoRA adapter or extra served name a replica reported
            return name, served
        valid = ", ".join(self.known_models()) or "(none)"
        raise RouterError(404, f"The model `{name}` does not exist. Valid models: {valid}.",
                          param="model")

    # -- POST: inference and pass-through --------------------------------------------
    def _request_id(self, request: web.Request) -> str:
        given = request.headers.get(self._rid_header)
        if given and _REQUEST_ID_RE.match(given):
            return given
        return uuid.uuid4().hex

    async def handle_inference(self, request: web.Request) -> web.StreamResponse:
        record = RequestRecord(request_id=self._request_id(request), method=request.method,
                               path=request.path, client=request.remote)
        request[REQUEST_ID_KEY] = record.request_id
        key = self.proxy.begin(record)
        response: web.StreamResponse | None = None
        try:
            try:
                response = await self._route(request, record)
            except RouterError as exc:
                response = exc.response()
            return response
        except asyncio.CancelledError:
            record.client_gone = True
            raise
        finally:
            self.proxy.end(key)
            if response is not None and not response.prepared:
                response.headers[self._rid_header] = record.request_id
            status = CLIENT_CLOSED if record.client_gone else (
                response.status if response is not None else 500)
            self._finish(record, status)

    async def _route(self, request: web.Request, record: RequestRecord) -> web.StreamResponse:
        path = request.path
        if path in GET_ONLY_PATHS:
            raise RouterError(405, f"Method {request.method} is not allowed on {path}; allowed: GET",
                              headers={"Allow": "GET, HEAD"})
        if self.draining:
            raise RouterError(503, "The router is shutting down", headers={
                "Retry-After": str(self.config.proxy.retry_after), "Connection": "close"})
        body = await read_body(request, self.config.server.max_body_bytes)
        if not body.strip():
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
            if path in INFERENCE_PATHS or len(self.model_names) != 1:
                raise bad_request("'model' is required", "model")
            requested = self.model_names[0]  # e.g. /tokenize without a model: the only one
        record.model = requested
        canonical, replicas = self.resolve(requested)
        record.model = canonical
        record.stream = data.get("stream") is True
        if canonical != requested and "model" in data:
            body = rewrite_model(body, data, canonical)
        candidates = [r for r in replicas if r.routable]
        if not candidates:
            raise self.proxy.unavailable(canonical)
        session_key = request.headers.get(self._session_header) or None
        route = build_route_request(
            model=canonical, path=path, data=data, body=body, request_id=record.request_id,
            headers=forwardable_request_headers(request.headers, self._rid_header),
            session_key=session_key, block_chars=self.config.prefix.block_chars,
            block_tokens=self.config.prefix.block_tokens)
        return await self.proxy.forward(request, route, candidates, record)

    def _finish(self, record: RequestRecord, status: int) -> None:
        record.status = status
        duration = record.elapsed()
        # Only names the fleet knows become label values (a client's typo must not mint series).
        model = record.model if record.model and (record.model in self.model_names or any(
            record.model in r.served_models for r in self.fleet)) else NO_REPLICA
        t = self.telemetry
        t.requests.labels(model, record.replica or NO_REPLICA, str(status)).inc()
        t.duration.labels(model).observe(duration)
        if record.client_gone:
            t.client_disconnects.labels(model).inc()
        if self.config.server.access_log:
            write_access_log(record, duration, self.config.server.log_format)

    # -- GET endpoints --------------------------------------------------------------
    def _model_entry(self, name: str, replicas: list[Replica], parent: str | None) -> dict[str, Any]:
        lengths = [r.max_model_len for r in replicas if r.max_model_len]
        return {
            "id": name,
            "object": "model",
            "created": self.started,
            "owned_by": "vllm",
            "root": parent or name,
            "parent": parent,
            "max_model_len": min(lengths) if lengths else None,
            "permission": [],
        }

    def model_list(self) -> list[dict[str, Any]]:
        entries: dict[str, dict[str, Any]] = {}
        healthy_by_model: dict[str, list[Replica]] = {}
        for replica in self.fleet:
            if replica.health is Health.HEALTHY:
                healthy_by_model.setdefault(replica.model, []).append(replica)
        for model, replicas in healthy_by_model.items():
            entries.setdefault(model, self._model_entry(model, replicas, None))
            for replica in replicas:
                for served in sorted(replica.served_models):
                    if served not in entries:
                        holders = [r for r in replicas if served in r.served_models]
                        parent = None if served == model else model
                        entries[served] = self._model_entry(served, holders, parent)
        for alias, model in self.aliases.items():
            if model in healthy_by_model and alias not in entries:
                entries[alias] = self._model_entry(alias, healthy_by_model[model], model)
        return list(entries.values())

    async def handle_models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": self.model_list()})

    async def handle_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for entry in self.model_list():
            if entry["id"] == name:
                return _json(entry)
        self.resolve(name)  # 404 with the valid names if it is unknown altogether
        raise self.proxy.unavailable(name)

    async def handle_health(self, request: web.Request) -> web.Response:
        return _json({"status": "draining" if self.draining else "ok"})

    async def handle_ready(self, request: web.Request) -> web.Response:
        models = {}
        for name in self.model_names:
            replicas = self.fleet.for_model(name)
            models[name] = {
                "healthy": sum(1 for r in replicas if r.health is Health.HEALTHY),
                "total": len(replicas),
            }
        ready = not self.draining and bool(models) and all(m["healthy"] > 0 for m in models.values())
        payload = {"ready": ready, "draining": self.draining, "models": models}
        return _json(payload, status=200 if ready else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.telemetry.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def handle_replicas(self, request: web.Request) -> web.Response:
        replicas = []
        for r in self.fleet:
            replicas.append({
                "url": r.url, "model": r.model, "health": r.health.value,
                "tensor_parallel_size": r.tensor_parallel_size, "weight": r.weight,
                "labels": dict(r.labels), "served_models": sorted(r.served_models),
                "max_model_len": r.max_model_len, "in_flight": r.in_flight,
                "consecutive_failures": r.consecutive_failures,
                "load": {"running": r.load.running, "waiting": r.load.waiting,
                         "kv_cache_usage": r.load.kv_cache_usage,
                         "prefix_cache_queries": r.load.prefix_cache_queries,
                         "prefix_cache_hits": r.load.prefix_cache_hits,
                         "block_size": r.load.block_size, "num_gpu_blocks": r.load.num_gpu_blocks},
            })
        payload: dict[str, Any] = {"policy": self.proxy.policy.name, "replicas": replicas,
                                   "active_requests": len(self.proxy.active)}
        if self.index is not None and hasattr(self.index, "stats"):
            stats = self.index.stats()
            payload["prefix_index"] = {k: v for k, v in stats.items() if k != "replicas"}
        return _json(payload)


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")
