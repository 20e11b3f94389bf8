"""Replicas and the fleet they form.

A `Replica` is one vLLM server (possibly tensor-parallel over several GPUs) as the router
sees it: where it is, what it serves, whether it is healthy, how much work the router has
sent it that has not finished (`in_flight`), and what the replica itself last reported on
its /metrics page (`EngineLoad`).  The monitor writes health and load, the proxy writes
`in_flight`, and policies only read.  Nothing here does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from router.fleet.adapter_slots import AdapterSlots
from router.fleet.breaker import Breaker
from router.fleet.endpoint import Endpoint
from router.fleet.engine_load import EngineLoad


class Health(enum.Enum):
    """Health state machine of a replica.

    UNKNOWN   never probed yet (gets no traffic: a replica that starts late must not eat
              requests before it answers /health).
    HEALTHY   probes pass; full traffic.
    SUSPECT   a request-path connect failure or one failed probe; ranked after every
              healthy replica so it only gets traffic when nothing better exists.
    UNHEALTHY `failure_threshold` consecutive probe failures; no traffic until
              `success_threshold` consecutive probes pass again.
    """

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    SUSPECT = "suspect"
    UNHEALTHY = "unhealthy"


@dataclass(eq=False, slots=True)
class Replica:
    """One vLLM server behind the router.  Identity is the object (and `id`, its URL)."""

    url: str  # base URL without trailing slash, e.g. http://127.0.0.1:8101
    model: str  # the configured model name this replica serves
    tensor_parallel_size: int = 1
    weight: float = 1.0  # relative capacity hint from config (default 1)
    labels: Mapping[str, str] = field(default_factory=dict)
    api_key: str | None = field(default=None, repr=False)  # sent upstream as Authorization: Bearer
    served_models: frozenset[str] = frozenset()  # discovered from /v1/models
    # What its /v1/models listed when that did not include `model` (nor an adapter of it):
    # it serves another model than the one it is configured under, so it gets no traffic and
    # none of those names is listed (router/fleet/monitor.py); empty while it serves `model`.
    model_mismatch: frozenset[str] = frozenset()
    max_model_len: int | None = None  # discovered from /v1/models
    health: Health = Health.UNKNOWN
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    in_flight: int = 0  # requests the router has dispatched and not yet finished
    # Uncached prompt tokens of the router's requests there not yet answered (hooks.InFlight).
    pending_prefill_tokens: int = 0
    load: EngineLoad = field(default_factory=EngineLoad)
    breaker: Breaker = field(default_factory=Breaker)  # request-path outlier ejection (breaker.py)
    # Where the replica publishes vLLM KV-cache events (ZMQ), when it does (None: it does not).
    kv_events_endpoint: str | None = None
    kv_replay_endpoint: str | None = None
    kv_events_topic: str | None = None
    role: str = "both"  # prefill / decode / both (config.ROLES): its pools when disaggregated
    adapters: frozenset[str] = frozenset()  # of served_models, the LoRA adapters (with a parent)
    # The adapters likely in its GPU slots (router/fleet/lora.py): dispatches and scrapes.
    lora_slots: AdapterSlots = field(default_factory=lambda: AdapterSlots())
    # The URL parsed once for the request path's connection pool (router/transport/upstream.py).
    endpoint: Endpoint = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The URL is the replica's id in logs, metrics and /admin: it must hold no secret.
        # (routes.yaml refuses such URLs with a path-precise message; this guards the rest.)
        if "@" in urlsplit(self.url).netloc:
            raise ValueError("a replica URL must not hold credentials; use api_key")
        self.endpoint = Endpoint.parse(self.url)

    @property
    def id(self) -> str:
        return self.url

    @property
    def reachable(self) -> bool:
        """Do its probes say it answers?  (What the monitor polls /metrics and /v1/models of.)"""
        return self.health in (Health.HEALTHY, Health.SUSPECT)

    @property
    def routable(self) -> bool:
        """May this replica get traffic at all?  Reachable and serving its configured model.
        (SUSPECT ones are ranked last.)"""
        return self.health in (Health.HEALTHY, Health.SUSPECT) and not self.model_mismatch

    @property
    def kv_capacity_tokens(self) -> int | None:
        """KV cache size in tokens, if the replica reported it."""
        if self.load.block_size and self.load.num_gpu_blocks:
            return self.load.block_size * self.load.num_gpu_blocks
        return None

    @property
    def queued(self) -> float:
        """Work ahead of a new request: router in-flight, or the engine's own count if larger.

        The router's count is fresh (updated at dispatch) but blind to other clients; the
        scraped count sees everyone but lags by one scrape interval.  The max of the two
        is the best cheap estimate.
        """
        return max(float(self.in_flight), self.load.running + self.load.waiting)


class FleetListener(Protocol):
    """Told of every membership change (monitor polling, prefix index, metric series...)."""

    def replica_added(self, replica: Replica) -> None: ...

    def replica_removed(self, replica: Replica) -> None: ...


class Fleet:
    """All replicas, grouped by the configured model they serve.

    The fleet is created by the app from the config and passed explicitly to the monitor,
    the proxy and the API handlers.  Membership changes only through `add` and `remove`
    (from a reload or the admin API, router/fleet/membership.py), and every listener hears of
    each one.  A removed replica keeps serving the requests it already has: they hold
    the Replica object; it just is no longer a candidate for new ones.
    """

    def __init__(self, replicas: Iterable[Replica] = ()) -> None:
        self._by_model: dict[str, list[Replica]] = {}
        self.listeners: list[FleetListener] = []
        for replica in replicas:
            self.add(replica)

    def add(self, replica: Replica) -> None:
        if self.find(replica.model, replica.url) is not None:
            raise ValueError(f"{replica.url} is already a replica of {replica.model}")
        self._by_model.setdefault(replica.model, []).append(replica)
        for listener in self.listeners:
            listener.replica_added(replica)

    def remove(self, replica: Replica) -> None:
        group = self._by_model.get(replica.model, [])
        if replica not in group:
            return
        group.remove(replica)
        if not group:
            del self._by_model[replica.model]
        for listener in self.listeners:
            listener.replica_removed(replica)

    def find(self, model: str, url: str) -> Replica | None:
        for replica in self._by_model.get(model, ()):
            if replica.url == url:
                return replica
        return None

    def __iter__(self) -> Iterator[Replica]:
        for group in self._by_model.values():
            yield from group

    def __len__(self) -> int:
        return sum(len(group) for group in self._by_model.values())

    def models(self) -> list[str]:
        return list(self._by_model)

    def for_model(self, model: str) -> list[Replica]:
        """Every configured replica of `model`, healthy or not."""
        return list(self._by_model.get(model, ()))
