"""Request flows: what happens to one request between the API's checks and the transport.

A flow owns a request's routing: it asks the scheduling profile (router/core/scheduling/) for
a ranking once, then hands it to the transport (`Proxy.forward`), which attempts down it,
fails over before the first byte and relays; the attempt hooks (router/transport/hooks.py) hear
every attempt.  `SingleHop` is the flow of most requests; `Disaggregated` that of a model
with prefill and decode pools: rank the decode pool, maybe skip the prefill hop, else rank
the prefill pool, send the prefill hop (the transport's ``relay=False``), then the decode
hop with the transfer params, the same hooks around each hop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from router.core.disaggregation import (
    DISAGGREGATED,
    prefill_body,
    prefill_path,
    transfer_params_of,
)
from router.core.scheduling import Decision
from router.core.scheduling.candidates import health_order
from router.errors import RouterError
from router.fleet.lora import AdapterLoader
from router.http_errors import error_response

if TYPE_CHECKING:
    from router.config import DisaggregationConfig, LoraConfig
    from router.core.requests import RouteRequest
    from router.core.scheduling import Profile
    from router.fleet.replicas import Replica
    from router.observability.access_log import RequestRecord
    from router.observability.telemetry import Telemetry
    from router.prefix.exact import ExactIndex
    from router.prefix.index import PrefixIndex
    from router.transport.proxy import Proxy

log = logging.getLogger("router.flows")


class SingleHop:
    """Rank once, then the transport's attempts down the ranking on one replica at a time."""

    def __init__(self, *, proxy: Proxy, profile: Callable[[], Profile], index: PrefixIndex,
                 telemetry: Telemetry, exact: ExactIndex | None = None,
                 loader: AdapterLoader, explain: bool = True) -> None:
        self.proxy = proxy
        self.explain = explain  # the full why of each decision (server.access_log: who reads it)
        self.loader = loader  # dynamic adapter loads (the router's own aiohttp session)
        self.profile = profile  # a getter: a reload may swap the profile
        self.index = index
        self.exact = exact
        self.telemetry = telemetry

    def rank(self, route: RouteRequest, candidates: Sequence[Replica], record: RequestRecord,
             profile: Profile | None = None) -> Decision:
        """The profile's ranking (the model's policy unless another is given)."""
        profile = profile or self.profile()
        started = time.perf_counter()
        try:
            decision = profile.rank(route, candidates, self.index, self.exact, explain=self.explain)
        except Exception:  # noqa: BLE001 - a profile bug must not fail the request
            log.exception("policy %s failed; falling back to configuration order", profile.name)
            decision = Decision(ranked=health_order(candidates), why={"fallback": "policy error"})
        self.telemetry.child(self.telemetry.decision_seconds, profile.name).observe(time.perf_counter() - started)
        record.policy = profile.name
        record.why = decision.why
        return decision

    async def forward(self, request: web.Request, route: RouteRequest, candidates: Sequence[Replica],
                      record: RequestRecord, lora: LoraConfig | None = None) -> web.StreamResponse:
        decision = await self.decide(route, candidates, record, lora)
        return await self.proxy.forward(request, route, decision, record)

    async def decide(self, route: RouteRequest, candidates: Sequence[Replica], record: RequestRecord,
                     lora: LoraConfig | None = None) -> Decision:
        """The ranking a single hop goes down (any data plane's): the profile's, with the
        request's adapter loaded first when no replica serves it (dynamic loading)."""
        decision = self.rank(route, candidates, record)
        if not decision.ranked:
            raise self.proxy.unavailable(route.model)
        if route.adapter_path is not None and route.lora is not None and lora is not None:
            decision = await self.load_adapter(route, decision, record, lora)
        return decision

    async def load_adapter(self, route: RouteRequest, decision: Decision, record: RequestRecord,
                           lora: LoraConfig) -> Decision:
        """No replica serves the request's adapter: load it on the best-ranked admissible one
        (router/fleet/lora.py), then rank only the replicas that serve it by now."""
        assert route.lora is not None and route.adapter_path is not None
        usable = [r for r in decision.ranked if self.proxy.admissible(r)]
        if not usable:
            raise self.proxy.unavailable(route.model)
        chosen = await self.loader.ensure(usable[0], route.lora, route.adapter_path, timeout=lora.load_timeout,
                                 max_in_flight=lora.max_loads_in_flight)
        if record.why is not None:
            record.why["adapter_loaded_on"] = chosen.id
        serving = [r for r in decision.ranked if route.lora in r.served_models]
        return replace(decision, ranked=[chosen] + [r for r in serving if r is not chosen])


class Disaggregated:
    """Prefill on one replica, decode on another (vLLM's disaggregated serving).

    Per request of a model with prefill and decode pools (config roles):
    1. rank the decode pool (decode + both) with the decode profile: load and KV room;
    2. skip the prefill hop - the whole request goes to that decode ranking - when the
       prompt is short (``disaggregation.min_prompt_tokens``), when the top decode replica
       already holds ``skip_cached_fraction`` of it, or when no prefill replica is left;
    3. otherwise rank the prefill pool (prefill + both) with the model's profile (prefix
       match and prefill queue: where prefix awareness pays) and send the prefill hop
       (`prefill_body`, ``relay=False``: failover before its answer like any request, its
       whole answer read, nothing to the client), bounded by ``transfer_timeout``;
    4. a prefill answer other than 200 goes to the client as it is (a 4xx is the request's
       own error, a 5xx came after failover); otherwise the decode hop is the client's
       request plus the answer's ``kv_transfer_params``, relayed verbatim (streamed or not),
       with failover before its first byte.
    The attempt hooks run around each hop; a client that leaves cancels the handler, which
    closes the hop under way (vLLM aborts it).  Both hops are in the access log
    (``prefill_replica``, ``prefill_ms``; ``why.prefill`` / ``why.decode``).
    """

    def __init__(self, single: SingleHop, decode_profile: Callable[[], Profile]) -> None:
        self.single = single
        self.proxy = single.proxy
        self.telemetry = single.telemetry
        self.decode_profile = decode_profile

    async def forward(self, request: web.Request, route: RouteRequest, candidates: Sequence[Replica],
                      record: RequestRecord, settings: DisaggregationConfig) -> web.StreamResponse:
        handoff = await self.prefill(request, route, candidates, record, settings)
        if isinstance(handoff, web.StreamResponse):
            return handoff  # the prefill hop's own answer (not 200)
        decode_route, decode = handoff
        prefilled = decode_route is not route
        # Never hedged after a prefill: the prefill replica hands its KV blocks to one reader.
        out = await self.proxy.forward(request, decode_route, decode, record, hedge=not prefilled)
        if prefilled and out.status >= 500 and not out.prepared:
            record.error = f"decode hop: upstream {out.status} after the prefill on {record.prefill_replica}"
            return error_response(502, "The decode replica could not complete this request after its "
                                       f"prefill (it answered {out.status}: a KV transfer it could not "
                                       "read, or an engine error)")
        return out

    async def prefill(self, request: web.Request | None, route: RouteRequest, candidates: Sequence[Replica],
                      record: RequestRecord, settings: DisaggregationConfig
                      ) -> tuple[RouteRequest, Decision] | web.StreamResponse:
        """Steps 1-3 and the decode hop's request: (its route, the decode ranking), or the
        prefill hop's answer when it was not a 200.  The decode route is `route` itself when
        the prefill hop is skipped.  Any data plane carries the decode hop from here: the
        proxy (`forward`) or Envoy (the endpoint picker, which passes ``request=None``)."""
        proxy, telemetry = self.proxy, self.telemetry
        decode_pool = [r for r in candidates if r.role != "prefill"]
        prefill_pool = [r for r in candidates if r.role != "decode" and proxy.admissible(r)]
        if not decode_pool:
            raise proxy.unavailable(route.model, "no decode replica is available")
        decode = self.single.rank(route, decode_pool, record, self.decode_profile())
        if not decode.ranked:
            raise proxy.unavailable(route.model, "no decode replica is available")
        decode_why = record.why
        reason = prefill_path(route, decode, prefill_pool, settings)
        telemetry.pd_requests.labels(route.model, reason).inc()
        if reason != DISAGGREGATED:
            record.why = {"disaggregation": reason, "decode": decode_why}
            return route, decode

        prefill = self.single.rank(route, prefill_pool, record)
        record.why = {"disaggregation": reason, "prefill": record.why, "decode": decode_why}
        # A whole answer of one token: its first byte comes when the prefill ends.
        hop = replace(route, body=prefill_body(orjson.loads(route.body)), stream=False, max_tokens=1)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(settings.transfer_timeout):
                answer = await proxy.forward(request, hop, prefill, record, relay=False, hedge=False)
        except TimeoutError:
            record.error = f"prefill hop: no whole answer within {settings.transfer_timeout:g}s"
            raise RouterError(504, f"The prefill of this request did not finish within "
                                   f"{settings.transfer_timeout:g}s", headers={"Retry-After": "1"}) from None
        finally:
            record.prefill_s = time.perf_counter() - started
            record.prefill_replica, record.prefill_attempts = record.replica, record.attempts
            telemetry.pd_prefill_seconds.labels(route.model).observe(record.prefill_s)
        if answer.status != 200 or not isinstance(answer, web.Response):
            return answer
        params = transfer_params_of(answer.body if isinstance(answer.body, bytes) else b"")
        if params is None:
            telemetry.pd_no_transfer_params.labels(route.model).inc()
        record.replica, record.attempts, record.ttfb = None, 0, None
        data = orjson.loads(route.body)
        if params is not None:
            data["kv_transfer_params"] = params
        return replace(route, body=orjson.dumps(data), prefilled_elsewhere=params is not None), decode
