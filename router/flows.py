"""Request flows: what happens to one request between the API's checks and the transport.

A flow owns a request's routing: it asks the scheduling profile (router/scheduling/) for
a ranking once, then hands it to the transport (`Proxy.forward`), which attempts down it,
fails over before the first byte and relays; the attempt hooks (router/hooks.py) hear
every attempt.  `SingleHop` is the flow of every request today.  A prefill-then-decode
flow (issue "LoRA and prefill/decode") will be a second one: rank the prefill pool, call
the transport for the prefill hop, rank the decode pool, call it again, with the same
hooks around each hop and no change to the transport.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from router.lora import AdapterLoader
from router.scheduling import Decision
from router.scheduling.candidates import health_order

if TYPE_CHECKING:
    from aiohttp import web

    from router.config import LoraConfig
    from router.fleet import Replica
    from router.prefix.exact import ExactIndex
    from router.prefix.index import PrefixIndex
    from router.proxy import Proxy
    from router.requests import RouteRequest
    from router.scheduling import Profile
    from router.telemetry import RequestRecord, Telemetry

log = logging.getLogger("router.flows")


class SingleHop:
    """Rank once, then the transport's attempts down the ranking on one replica at a time."""

    def __init__(self, *, proxy: Proxy, profile: Callable[[], Profile], index: PrefixIndex,
                 telemetry: Telemetry, exact: ExactIndex | None = None,
                 loader: AdapterLoader | None = None) -> None:
        self.proxy = proxy
        self.loader = loader or AdapterLoader(proxy.session)
        self.profile = profile  # a getter: a reload may swap the profile
        self.index = index
        self.exact = exact
        self.telemetry = telemetry

    def rank(self, route: RouteRequest, candidates: Sequence[Replica], record: RequestRecord) -> Decision:
        profile = self.profile()
        started = time.perf_counter()
        try:
            decision = profile.rank(route, candidates, self.index, self.exact)
        except Exception:  # noqa: BLE001 - a profile bug must not fail the request
            log.exception("policy %s failed; falling back to configuration order", profile.name)
            decision = Decision(ranked=health_order(candidates), why={"fallback": "policy error"})
        self.telemetry.decision_seconds.labels(profile.name).observe(time.perf_counter() - started)
        record.policy = profile.name
        record.why = decision.why
        return decision

    async def forward(self, request: web.Request, route: RouteRequest, candidates: Sequence[Replica],
                      record: RequestRecord, lora: LoraConfig | None = None) -> web.StreamResponse:
        decision = self.rank(route, candidates, record)
        if not decision.ranked:
            raise self.proxy.unavailable(route.model)
        if route.adapter_path is not None and route.lora is not None and lora is not None:
            decision = await self.load_adapter(route, decision, record, lora)
        return await self.proxy.forward(request, route, decision, record)

    async def load_adapter(self, route: RouteRequest, decision: Decision, record: RequestRecord,
                           lora: LoraConfig) -> Decision:
        """No replica serves the request's adapter: load it on the best-ranked admissible one
        (router/lora.py), then rank only the replicas that serve it by now."""
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
