"""Stored responses (OpenAI Responses API) on the replica that holds them: ``GET
/v1/responses/{id}`` (also resumed streams), ``POST .../cancel``, and the replica of a
``previous_response_id`` follow-up, found from the replica token the response id carries
(router/core/response_ids.py).  A response whose replica is gone is a 404 in vLLM's words.
"""

from __future__ import annotations

import re

from aiohttp import web

from router.core.admission import RateLimitExceeded
from router.core.body_budget import BodyLease
from router.core.requests import RouteRequest
from router.core.response_ids import ResponseIds, not_found
from router.core.scheduling import Decision
from router.errors import RouterError, bad_request
from router.frontdoor.api_state import ApiState
from router.observability.access_log import RequestRecord
from router.transport.headers import forwardable_request_headers

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


class StoredResponses:
    """The stored-response handlers of one `Api`."""

    def __init__(self, api: ApiState) -> None:
        self.api = api

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/responses/{id} (``stream``, ``starting_after``) and POST .../cancel: to the
        replica that holds the response (router/core/response_ids.py), never another."""
        return await self.api.serve(request, self._stored_response)

    async def _stored_response(self, request: web.Request, record: RequestRecord,
                               lease: BodyLease) -> web.StreamResponse:
        if self.api.draining:
            raise RouterError(503, "The router is shutting down", headers={
                "Retry-After": str(self.api.config.proxy.retry_after), "Connection": "close"})
        client = self.api.client_of(request)
        record.client, record.client_name = client.address, client.name
        response_id = request.match_info["response_id"]
        if ResponseIds.token_of(response_id) is None:
            raise not_found(response_id, "response_id")  # not an id the router issued
        replica = self.api.intake.holder(response_id, list(self.api.fleet), "response_id")[0]
        if not self.api.catalog.may_use(client, replica.model):
            raise not_found(response_id, "response_id")  # a model the key may not use: as if absent
        record.model = replica.model
        try:
            self.api.admission.limiter.check(client, 0)
        except RateLimitExceeded as exc:
            raise self.api.reject(f"rate_limit_{exc.kind}", exc.error) from None
        if not self.api.proxy.admissible(replica):
            raise RouterError(503, f"The replica that holds response '{response_id}' is unavailable "
                                   "right now; retry shortly",
                              headers={"Retry-After": str(self.api.config.proxy.retry_after)})
        path = request.path
        stream = False
        if request.method == "GET":
            query = _stored_response_query(request)
            stream = query.get("stream") == "true"
            if query:
                path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        route = RouteRequest(model=replica.model, path=path, body=b"", stream=stream,
                             request_id=record.request_id, method=request.method,
                             headers=forwardable_request_headers(request.headers, self.api.rid_header))
        decision = Decision(ranked=[replica], why={"stored_response": True})
        return await self.api.proxy.forward(request, route, decision, record)
