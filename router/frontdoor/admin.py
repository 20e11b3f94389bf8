"""The admin API (admin key, or a loopback client when none is set): reload routes.yaml,
register and deregister replicas, and /admin/replicas, the fleet as the router sees it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from router.errors import RouterError, bad_request
from router.fleet.membership import NoSuchReplica
from router.fleet.replicas import Replica
from router.frontdoor.api_state import ApiState, json_response
from router.frontdoor.limits import read_body
from yamlcheck import ConfigError


class Admin:
    """The admin handlers of one `Api`."""

    def __init__(self, api: ApiState) -> None:
        self.api = api

    async def handle_reload(self, request: web.Request) -> web.Response:
        """Re-read routes.yaml and apply it; 400 naming the file and key if it is invalid."""
        self.api.keyring.check_admin(request.headers, request.remote)
        assert self.api.reloader is not None
        try:
            summary = await self.api.reloader.reload()
        except ConfigError as exc:
            raise RouterError(400, f"Reload refused, nothing changed: {exc}") from None
        return json_response({"reloaded": True, **summary})

    async def _admin_body(self, request: web.Request) -> Any:
        self.api.keyring.check_admin(request.headers, request.remote)
        lease = self.api.bodies.lease()
        try:
            raw = await read_body(request, 64 * 1024, timeout=self.api.config.server.body_timeout,
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
        assert self.api.reloader is not None
        replica = await self._membership(request, self.api.reloader.register)
        return json_response({"registered": {"model": replica.model, "url": replica.url,
                                     "health": replica.health.value}}, status=201)

    async def handle_deregister(self, request: web.Request) -> web.Response:
        """DELETE /admin/replicas {url, model?}: no new requests; in-flight ones finish."""
        assert self.api.reloader is not None
        replica = await self._membership(request, self.api.reloader.deregister)
        return json_response({"removed": {"model": replica.model, "url": replica.url,
                                  "in_flight": replica.in_flight}})

    def _source(self, replica: Replica) -> str:
        """Where a replica came from: the config, the admin API or discovery."""
        if self.api.discovery is not None and self.api.discovery.owns(replica.model, replica.url):
            return "discovery"
        if self.api.reloader is not None and (replica.model, replica.url) in self.api.reloader.registered:
            return "admin"
        return "config"

    async def handle_replicas(self, request: web.Request) -> web.Response:
        self.api.keyring.check_admin(request.headers, request.remote)
        return json_response(self.fleet_state())

    def fleet_state(self) -> dict[str, Any]:
        """What /admin/replicas answers (and the status page shows): each replica's health,
        breaker, load, KV-event stream; the profile, the queue and the prefix index."""
        replicas = []
        profile = self.api.flow.profile()
        for r in self.api.fleet:
            rate = profile.prefill_rate(r)
            replicas.append({
                "id": r.id, "url": r.url, "model": r.model, "health": r.health.value,
                "tensor_parallel_size": r.tensor_parallel_size, "weight": r.weight,
                "prefill_tokens_per_s": round(rate, 1) if rate is not None else None,
                "labels": dict(r.labels), "served_models": sorted(r.served_models),
                "role": r.role, "adapters": sorted(r.adapters),
                "adapter_slots": {"likely_loaded": r.lora_slots.names(),
                                  "max_loras": r.lora_slots.max_loras,
                                  "running": sorted(r.lora_slots.running)},
                "source": self._source(r),
                # a reload dropped it; it serves until its successors are healthy (handover.py)
                "leaving": self.api.reloader is not None and self.api.reloader.handover.is_leaving(r),
                # what it serves instead of its configured model (then it gets no traffic)
                "model_mismatch": sorted(r.model_mismatch) or None,
                "max_model_len": r.max_model_len, "in_flight": r.in_flight,
                # uncached prompt tokens of its unanswered streams: what the queue term charges
                "pending_prefill_tokens": r.pending_prefill_tokens,
                "consecutive_failures": r.consecutive_failures,
                "circuit_breaker": {"state": r.breaker.state.value,
                                    "consecutive_failures": r.breaker.failures,
                                    "retry_in_s": round(self.api.proxy.breakers.retry_in(r.breaker), 3),
                                    "last_failure": r.breaker.last_reason},
                "load": {"running": r.load.running, "waiting": r.load.waiting,
                         "kv_cache_usage": r.load.kv_cache_usage,
                         "prefix_cache_queries": r.load.prefix_cache_queries,
                         "prefix_cache_hits": r.load.prefix_cache_hits,
                         "block_size": r.load.block_size, "num_gpu_blocks": r.load.num_gpu_blocks},
                "kv_events": self.api.kv_events.stats(r.id) if self.api.kv_events is not None else None,
            })
        payload: dict[str, Any] = {**profile.describe(), "worker": self.api.worker, "replicas": replicas,
                                   "active_requests": len(self.api.proxy.active),
                                   "admission_queue": self.api.admission.waiting,
                                   "request_body_bytes_held": self.api.bodies.used}
        if self.api.discovery is not None and self.api.discovery.states:
            payload["discovery"] = self.api.discovery.stats()
        if self.api.index is not None and hasattr(self.api.index, "stats"):
            stats = self.api.index.stats()
            payload["prefix_index"] = {k: v for k, v in stats.items() if k != "replicas"}
        if self.api.exact is not None and self.api.exact.replicas:
            payload["exact_prefix_index"] = self.api.exact.stats()
        return payload
