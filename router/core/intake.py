"""Intake: from one inference request, as any data plane hands it over, to what is sent
where — the model and the key's access, the candidates the breakers let through, the
RouteRequest, the rate limits and the admission queue.

The front door's handler (router/frontdoor/api.py) and the Envoy endpoint picker both call
`Intake.admit` with a plain `Arrival` (path, headers as a mapping, the client, the body's
bytes), so the order of the checks and every answer they give live here once.  No aiohttp:
the two waits (admission, a half-open trial's verdict) are the core's own, and reading the
prompt's exact token ids, which may ask a replica, is a function the caller passes in.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from router.config import Config, ModelConfig
from router.core.admission import Admission, QueueRejection, RateLimitExceeded, token_cost
from router.core.catalog import ModelCatalog
from router.core.clients import Client
from router.core.requests import BodyError, RouteRequest, build_route_request, rewrite_model, validate_body
from router.core.response_ids import ResponseIds, with_request_id
from router.errors import RouterError, bad_request
from router.fleet.replicas import Replica
from router.fleet.rotation import Rotation
from router.observability.access_log import RequestRecord, write_access_log
from router.observability.recent import RecentRequests
from router.observability.telemetry import NO_REPLICA, Telemetry
from router.prefix.agentic import RESPONSES_PATH

INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")  # what a P/D flow splits
_PRIORITY_RE = re.compile(r"^[+-]?\d{1,6}$")

# Reads the prompt's exact token ids for `route` (None: the approximate index decides).
ExactTokens = Callable[[RouteRequest, dict[str, Any], list[Replica]], Awaitable[RouteRequest]]


@dataclass(slots=True)
class Arrival:
    """One inference request as a data plane received it."""

    path: str  # the allowlisted path it came on
    headers: Mapping[str, str]  # the client's headers (a case-insensitive mapping)
    client: Client  # who sent it (the data plane's key check)
    body: bytes | bytearray  # the whole body, decoded
    forward_headers: tuple[tuple[str, str], ...]  # the client's headers a replica may see
    # The data plane's own restriction of the replicas (an Envoy subset hint), applied before
    # admission so a request never queues for replicas it may not use; None: every replica.
    allowed: Callable[[Replica], bool] | None = None


@dataclass(slots=True)
class Admitted:
    """What the flow gets: the request and the replicas it may go to, admitted."""

    route: RouteRequest
    candidates: list[Replica]
    model: ModelConfig | None  # the model's settings (lora, disaggregation)

    def disaggregated(self) -> bool:
        """Does this request take the prefill/decode flow?"""
        model, route = self.model, self.route
        return model is not None and model.disaggregated and route.adapter_path is None \
            and route.path in GENERATION_PATHS


class Intake:
    """The checks of every forwarded request, in order (see the module docstring)."""

    def __init__(self, *, config: Config, catalog: ModelCatalog, admission: Admission,
                 rotation: Rotation, telemetry: Telemetry, response_ids: ResponseIds,
                 wants_exact: Callable[[list[Replica]], bool] | None = None,
                 exact_tokens: ExactTokens | None = None, recent: RecentRequests | None = None) -> None:
        self.catalog = catalog
        self.recent = recent  # the last requests, for the status page
        self.admission = admission
        self.rotation = rotation
        self.telemetry = telemetry
        self.response_ids = response_ids  # replaced on a reload that changes its secret
        self.wants_exact = wants_exact
        self.exact_tokens = exact_tokens
        self.apply_config(config)

    def apply_config(self, config: Config) -> None:
        self.config = config
        self.models = {m.name: m for m in config.models}
        self._session_header = config.routing.session_header
        self._priority_header = config.admission.priority_header

    def finish(self, record: RequestRecord, status: int) -> None:
        """A request's end, whichever data plane carried it: its admission slot handed on (if
        its first byte has not done so already), its metrics and access-log line."""
        if record.admitted and record.model is not None and not record.slot_released:
            self.admission.on_request_end(record.model)
        record.status = status
        duration = record.elapsed()
        # Only names the fleet knows become label values (a client's typo must not mint series).
        model = record.model if record.model and self.catalog.knows(record.model) else NO_REPLICA
        t = self.telemetry
        t.child(t.requests, model, record.replica or NO_REPLICA, str(status)).inc()
        t.child(t.duration, model, record.replica or NO_REPLICA).observe(duration)
        if record.client_gone:
            t.client_disconnects.labels(model).inc()
        if self.recent is not None and record.model is not None:  # (a request for a model)
            self.recent.add(record, duration)
        server = self.config.server
        if server.access_log:
            write_access_log(record, duration, server.log_format)

    def reject(self, reason: str, error: RouterError) -> RouterError:
        """`error`, counted as a rejection for `reason`."""
        self.telemetry.rejections.labels(reason).inc()
        return error

    def priority(self, headers: Mapping[str, str], client: Client) -> int:
        """The key's priority, or lower if the request's priority header asks for it."""
        given = headers.get(self._priority_header)
        if given is None:
            return client.priority
        if not _PRIORITY_RE.match(given.strip()):
            raise bad_request(f"'{self._priority_header}' must be an integer")
        return min(int(given), client.priority)

    def holder(self, response_id: str, replicas: Sequence[Replica], param: str) -> list[Replica]:
        """`ResponseIds.holder`, its 404 counted as a rejection."""
        try:
            return self.response_ids.holder(response_id, replicas, param)
        except RouterError as exc:
            raise self.reject("response_not_found", exc) from None

    async def admit(self, arrival: Arrival, record: RequestRecord, *,
                    deadline_left: Callable[[], float]) -> Admitted:
        """Parse, resolve, rank-ready, rate-limit and admit one request (RouterError with the
        client's answer otherwise).  `deadline_left`: seconds left of ``proxy.deadline``."""
        path, body, client = arrival.path, arrival.body, arrival.client
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
        catalog = self.catalog
        if requested is None:
            if path in INFERENCE_PATHS or len(catalog.model_names) != 1:
                raise bad_request("'model' is required", "model")
            requested = catalog.model_names[0]  # e.g. /tokenize without a model: the only one
            if requested not in catalog.known_models(client):
                raise catalog.no_such_model(requested, client)
        record.model = requested
        canonical, replicas = catalog.resolve(requested, client)
        record.model = canonical
        record.stream = data.get("stream") is True
        if canonical != requested and "model" in data:
            body = rewrite_model(body, data, canonical)
        if path == RESPONSES_PATH and isinstance(data.get("previous_response_id"), str):
            replicas = self.holder(data["previous_response_id"], replicas, "previous_response_id")
        rotation = self.rotation
        if arrival.allowed is not None:
            replicas = [r for r in replicas if arrival.allowed(r)]
            if not replicas:
                raise rotation.unavailable(canonical, "none of its replicas is in the data plane's subset")
        candidates = [r for r in replicas if r.routable]
        if not candidates:
            raise rotation.unavailable(canonical)
        admissible = [r for r in candidates if rotation.admissible(r)]
        if not admissible:  # a half-open trial's verdict may be due: wait for it, not 503
            admissible = await rotation.admissible_or_wait(candidates, deadline_left())
            if not admissible:
                raise self.reject("ejected", rotation.ejected_error(canonical, candidates))
        prefix = self.config.prefix
        route = build_route_request(
            model=canonical, path=path, data=data, body=body, request_id=record.request_id,
            headers=arrival.forward_headers,
            session_key=arrival.headers.get(self._session_header) or None,
            block_chars=prefix.block_chars, block_tokens=prefix.block_tokens,
            max_blocks=prefix.max_blocks_per_request)
        if path == RESPONSES_PATH and "request_id" not in data:
            ids, sent = self.response_ids, route.body
            route = replace(route, replica_body=lambda replica: with_request_id(sent, ids.new_id(replica)))
        adapter = catalog.adapter_of(canonical, replicas)
        if adapter is not None:
            route = replace(route, lora=canonical, base_model=adapter[0], adapter_path=adapter[1])
        admission = self.admission
        try:
            admission.limiter.check(client, token_cost(route.estimated_prompt_tokens, data))
        except RateLimitExceeded as exc:
            raise self.reject(f"rate_limit_{exc.kind}", exc.error) from None
        priority = self.priority(arrival.headers, client)
        try:
            waited = 0.0 if admission.passes(canonical, admissible) else \
                await admission.admit(canonical, admissible, client, priority, restricted=arrival.allowed is not None)
        except QueueRejection as exc:
            raise self.reject(exc.reason, exc.error) from None
        record.admitted = True
        if waited:
            record.queued_s = waited
            self.telemetry.queue_wait.labels(canonical).observe(waited)
            # The fleet may have changed while the request waited.
            admissible = [r for r in replicas if r.routable and rotation.admissible(r)]
            if not admissible:
                admissible = await rotation.admissible_or_wait(
                    [r for r in replicas if r.routable], deadline_left())
            if not admissible:
                raise rotation.unavailable(canonical)
        if self.exact_tokens is not None and self.wants_exact is not None and self.wants_exact(admissible):
            route = await self.exact_tokens(route, data, admissible)
        return Admitted(route, admissible, self.models.get(route.index_model))
