"""What the handlers apart from forwarding read of the `Api` (router/frontdoor/api.py).

The status, admin and stored-response handlers are classes of their own that hold the `Api`
they serve; `ApiState` names what they read, so their modules do not import api.py (which
builds them).  `FleetControl` is what the admin handlers ask of the live fleet
(router/reload.py: `Reloader`), which sits above the front door in the layers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web

from router.core.admission import Admission
from router.core.auth import KeyRing
from router.core.body_budget import BodyBudget, BodyLease
from router.core.catalog import ModelCatalog
from router.core.clients import Client
from router.core.intake import Intake
from router.core.response_ids import ResponseIds
from router.errors import RouterError
from router.fleet.handover import Handover
from router.fleet.replicas import Fleet, Replica
from router.observability.access_log import RequestRecord
from router.observability.recent import RecentRequests
from router.observability.telemetry import Telemetry
from router.transport.proxy import Proxy

if TYPE_CHECKING:
    from router.config import Config
    from router.fleet.discovery import Discovery
    from router.fleet.kv_events import KVEvents
    from router.prefix.exact import ExactIndex
    from router.prefix.index import PrefixIndex
    from router.transport.flows import SingleHop


class FleetControl(Protocol):
    """What the admin handlers ask of the live fleet (router/reload.py: `Reloader`), named
    here because that wiring sits above the front door in the layers."""

    registered: dict[tuple[str, str], Replica]
    handover: Handover

    async def reload(self, path: str | None = None) -> dict[str, Any]: ...
    async def register(self, body: Any) -> Replica: ...
    async def deregister(self, body: Any) -> Replica: ...


class ApiState(Protocol):
    """The state and helpers of an `Api` that its handler classes read."""

    config: Config
    fleet: Fleet
    proxy: Proxy
    flow: SingleHop
    telemetry: Telemetry
    discovery: Discovery | None
    index: PrefixIndex | None
    exact: ExactIndex | None
    kv_events: KVEvents | None
    keyring: KeyRing
    admission: Admission
    bodies: BodyBudget
    reloader: FleetControl | None
    catalog: ModelCatalog
    draining: bool
    worker: dict[str, int | None]
    response_ids: ResponseIds
    intake: Intake
    recent: RecentRequests
    rid_header: str

    def client_of(self, request: web.Request) -> Client: ...
    def reject(self, reason: str, error: RouterError) -> RouterError: ...
    async def serve(self, request: web.Request, route: Callable[
            [web.Request, RequestRecord, BodyLease], Awaitable[web.StreamResponse]]) -> web.StreamResponse: ...


def json_response(payload: Any, status: int = 200) -> web.Response:
    """A JSON answer the router makes itself."""
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


