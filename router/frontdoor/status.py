"""What anyone may ask the router about itself: the models a key may use, liveness (/health),
readiness (/ready: a bare status for anyone, per-model counts for the admin) and /metrics.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from router.fleet.replicas import Health
from router.frontdoor.api_state import ApiState, json_response


class Status:
    """The status handlers of one `Api`."""

    def __init__(self, api: ApiState) -> None:
        self.api = api

    async def handle_models(self, request: web.Request) -> web.Response:
        client = self.api.client_of(request)
        catalog = self.api.catalog
        return json_response({"object": "list",
                      "data": [e for e in catalog.model_list() if catalog.may_use(client, e["id"])]})

    async def handle_model(self, request: web.Request) -> web.Response:
        client = self.api.client_of(request)
        name = request.match_info["model"]
        catalog = self.api.catalog
        for entry in catalog.model_list():
            if entry["id"] == name and catalog.may_use(client, name):
                return json_response(entry)
        catalog.resolve(name, client)  # 404 with the valid names if it is unknown altogether
        raise self.api.proxy.unavailable(name)

    async def handle_health(self, request: web.Request) -> web.Response:
        return json_response({"status": "draining" if self.api.draining else "ok"})

    async def handle_ready(self, request: web.Request) -> web.Response:
        """200 ready / 503 not.  Anyone gets the bare status (load balancers and Kubernetes
        call it without keys); the per-model counts name every model, so only a client the
        admin endpoints would answer gets them (a key's 404 must not be undone here)."""
        models = {}
        for name in self.api.catalog.model_names:
            replicas = self.api.fleet.for_model(name)
            models[name] = {
                # (a replica serving another model than its configured one gets no traffic)
                "healthy": sum(1 for r in replicas if r.health is Health.HEALTHY and not r.model_mismatch),
                "total": len(replicas),
            }
        ready = not self.api.draining and bool(models) and all(m["healthy"] > 0 for m in models.values())
        payload: dict[str, Any] = {"ready": ready, "draining": self.api.draining}
        if self.api.keyring.is_admin(request.headers, request.remote):
            payload["models"] = models
        return json_response(payload, status=200 if ready else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        if self.api.keyring.protect_metrics:
            self.api.keyring.check_admin(request.headers, request.remote)
        body, content_type = self.api.telemetry.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response
