"""Discovery: a model's replicas from DNS or Kubernetes, kept current in the live fleet.

Each model with a ``discovery:`` section gets one task per source (``dns.py``,
``kubernetes.py``).  A source only answers "these are the endpoints now" (`Endpoint`s,
each a host, a port and labels); `Discovery.publish` turns each answer into membership
changes through the fleet's one mechanism (`Fleet.add` / `Fleet.remove`, heard by
membership.FleetWiring), the same way a reload or the admin API changes it:

* an endpoint that appears becomes a replica built from the section's ``backend:``
  template; it starts in health ``unknown`` and gets traffic after its first passing
  probe (monitor.py), like any new replica;
* an endpoint that disappears leaves the fleet: no new requests, the ones it serves
  finish on the Replica objects they hold (a drain), then its series and index entries go;
* a static backend (``backends:``) with the same URL wins: discovery never adds it twice
  nor removes it; a reload does not remove discovered replicas (they are not in the file);
* a source that fails (DNS timeout, API server unreachable) keeps the replicas it last
  published: an outage of the directory is not an outage of the fleet.  Only an
  authoritative answer ("no such name", an empty endpoint list) removes them.

Bounds: at most ``max_replicas`` endpoints per source are taken (the rest are logged and
left out), per model one task per source.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from router.config import BackendConfig, Config, DiscoveryConfig
from router.fleet.discovery.endpoints import Endpoint, Publish

if TYPE_CHECKING:
    from router.fleet.replicas import Fleet, Replica

log = logging.getLogger("router.discovery")


def endpoint_url(scheme: str, host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{scheme}://{host}:{port}"


def backend_for(discovery: DiscoveryConfig, endpoint: Endpoint) -> BackendConfig:
    """The section's backend template made concrete for one endpoint."""
    template = discovery.template
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    kv = f"tcp://{host}:{discovery.kv_events_port}" if discovery.kv_events_port else None
    replay = f"tcp://{host}:{discovery.kv_replay_port}" if discovery.kv_replay_port and kv else None
    return dataclasses.replace(
        template, url=endpoint_url(discovery.scheme, endpoint.host, endpoint.port),
        labels=MappingProxyType({**template.labels, **endpoint.labels}),
        kv_events_endpoint=kv, kv_replay_endpoint=replay,
        kv_events_topic=template.kv_events_topic if kv else None)


@dataclass
class SourceState:
    """What /admin/replicas shows of one source."""

    kind: str
    model: str
    endpoints: int = 0
    answers: int = 0
    errors: int = 0
    last_answer_at: float | None = None  # wall clock
    last_error: str | None = None
    truncated: int = 0  # endpoints left out by max_replicas in the last answer

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Discovery:
    """Runs every model's sources and applies their answers to the fleet."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._configs: dict[str, DiscoveryConfig] = {}
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}
        self._wanted: dict[tuple[str, str], set[str]] = {}  # (model, source kind) -> URLs
        self._owned: dict[tuple[str, str], Replica] = {}  # (model, url) -> the replica we added
        self._backends: dict[tuple[str, str], BackendConfig] = {}  # (model, url) listed now -> backend
        self.states: dict[tuple[str, str], SourceState] = {}
        self.static: set[tuple[str, str]] = set()  # (model, url) of backends: never ours

    # -- lifecycle ----------------------------------------------------------------------
    def apply_config(self, config: Config) -> None:
        """Start, restart or stop each model's sources to match `config` (start and reload)."""
        self.static = {(m.name, b.url) for m in config.models for b in m.backends}
        wanted = {m.name: m.discovery for m in config.models if m.discovery is not None}
        for model in list(self._configs):
            if wanted.get(model) != self._configs[model]:
                self._stop_model(model)
        for model, discovery in wanted.items():
            if model not in self._configs:
                self._start_model(model, discovery)
        # A backend that became static is the file's now.
        for key in [k for k in self._owned if k in self.static]:
            self._owned.pop(key)

    def _start_model(self, model: str, discovery: DiscoveryConfig) -> None:
        self._configs[model] = discovery
        tasks = []
        for kind, runner in self._runners(model, discovery):
            self.states[(model, kind)] = SourceState(kind=kind, model=model)
            tasks.append(asyncio.get_running_loop().create_task(
                self._guarded(model, kind, runner), name=f"discovery {kind} {model}"))
        self._tasks[model] = tasks

    def _runners(self, model: str, discovery: DiscoveryConfig) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        runners: list[tuple[str, Coroutine[Any, Any, None]]] = []
        if discovery.dns is not None:
            from router.fleet.discovery.dns import DnsSource

            source = DnsSource(discovery.dns, self._publisher(model, "dns"), self._failure(model, "dns"))
            runners.append(("dns", source.run()))
        if discovery.kubernetes is not None:
            from router.fleet.discovery.kubernetes import KubernetesSource

            k8s = KubernetesSource(discovery.kubernetes, self._publisher(model, "kubernetes"),
                                   self._failure(model, "kubernetes"))
            runners.append(("kubernetes", k8s.run()))
        return runners

    async def _guarded(self, model: str, kind: str, runner: Coroutine[Any, Any, None]) -> None:
        """A source's task: a bug that ends it is logged (its replicas stay), never silent."""
        try:
            await runner
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - keep the replicas it published; say so
            log.exception("discovery %s for %s stopped on an error; its replicas stay", kind, model)

    def _stop_model(self, model: str) -> None:
        """The model's sources stop; the replicas they added leave (a reload removed them)."""
        for task in self._tasks.pop(model, []):
            task.cancel()
        self._configs.pop(model, None)
        for kind in [k for (m, k) in list(self._wanted) if m == model]:
            self._apply(model, kind, set())
            self._wanted.pop((model, kind), None)
            self.states.pop((model, kind), None)

    async def close(self) -> None:
        tasks = [t for ts in self._tasks.values() for t in ts]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    # -- answers ------------------------------------------------------------------------
    def owns(self, model: str, url: str) -> bool:
        return (model, url) in self._owned

    def _failure(self, model: str, kind: str) -> Callable[[str], None]:
        def failed(reason: str) -> None:
            state = self.states.get((model, kind))
            if state is not None:
                state.errors += 1
                state.last_error = reason
        return failed

    def _publisher(self, model: str, kind: str) -> Publish:
        def publish(endpoints: list[Endpoint]) -> None:
            self.publish(model, kind, endpoints)
        return publish

    def publish(self, model: str, kind: str, endpoints: list[Endpoint]) -> None:
        """A source's whole current answer for `model`."""
        discovery = self._configs.get(model)
        if discovery is None:
            return
        state = self.states.setdefault((model, kind), SourceState(kind=kind, model=model))
        first: dict[tuple[str, int], Endpoint] = {}
        for endpoint in endpoints:  # one replica per address and port, as first listed
            first.setdefault((endpoint.host, endpoint.port), endpoint)
        unique = list(first.values())
        state.truncated = max(0, len(unique) - discovery.max_replicas)
        if state.truncated:
            log.warning("discovery %s for %s listed %d endpoints; only the first %d are used "
                        "(discovery.max_replicas)", kind, model, len(unique), discovery.max_replicas)
        kept = unique[:discovery.max_replicas]
        backends = {b.url: b for b in (backend_for(discovery, e) for e in kept)}
        state.answers += 1
        state.endpoints = len(backends)
        state.last_answer_at = time.time()
        state.last_error = None
        self._backends.update({(model, url): b for url, b in backends.items()})
        self._apply(model, kind, set(backends))

    def _apply(self, model: str, kind: str, urls: set[str]) -> None:
        from router.fleet.membership import replica_from

        self._wanted[(model, kind)] = urls
        wanted_now = set().union(*(u for (m, _), u in self._wanted.items() if m == model))
        for (owner, url), replica in list(self._owned.items()):
            if owner == model and url not in wanted_now:
                del self._owned[(owner, url)]
                if self.fleet.find(model, url) is replica:
                    self.fleet.remove(replica)
                    log.info("discovery: replica %s of %s left (%s)", url, model, kind)
        backends = self._backends
        for url in sorted(urls):
            key = (model, url)
            if key in self.static or key in self._owned or self.fleet.find(model, url) is not None:
                continue
            replica = replica_from(model, backends[key])
            self.fleet.add(replica)
            self._owned[key] = replica
            log.info("discovery: replica %s of %s joined (%s); traffic after its first passing probe",
                     url, model, kind)
        for key in [k for k in backends if k[0] == model and k[1] not in wanted_now]:
            del backends[key]  # bounded: only what some source lists now

    def stats(self) -> list[dict[str, Any]]:
        return [s.as_dict() for s in self.states.values()]
