"""The live fleet: hot reload of routes.yaml and replicas registered through the admin API.

Wiring, beside app.py: it changes the fleet (router/fleet/membership.py) and every part that
knows of a replica (monitor, prefix indexes, policy, proxy, metrics, KV-event streams).

Every membership change goes through `Fleet.add` / `Fleet.remove`, whose listeners (the
`FleetWiring` below) start and stop the replica's polling, drop what the prefix index and
the policy learned about a removed replica, and remove its metric series.  On top of that:

* `Reloader.reload()` (SIGHUP, `POST /admin/reload`) reads the config file again.  An
  invalid file changes nothing and says why.  A valid one is applied as a difference:
  - backends: new ones join (as `unknown`: probed at once, they get traffic after their
    first passing probe); removed ones *leave* (router/fleet/handover.py, make-before-break):
    they keep serving until their model's successors are healthy (or
    `health.handover_timeout` passed, or they turn unhealthy), then stop getting new
    requests while their in-flight requests finish; ones that stay keep their health,
    breaker, learned rate and prefix-index records; changed `tensor_parallel_size`,
    `weight`, `labels`, `api_key`, `role` apply in place.  A leaving replica that a later
    file lists again stays;
  - `models` (names, aliases), `routing` (policy, params: a new policy of the same kind
    keeps what the old one learned about the replicas that stay), `auth`, `health`,
    `metrics`, `proxy` (all but `max_connections`) and `circuit_breaker` take effect;
  - `server`, `cors`, `admission`, `prefix`, `launch` and `proxy.max_connections` need a
    restart: a change there is reported (`restart_required`) and not applied.
* `register()` / `deregister()` (`POST` / `DELETE /admin/replicas`) change membership at
  run time, validated like a `backends:` entry.  A registration's URL and KV-event
  endpoints must lie in the allowed networks (router/fleet/replica_networks.py,
  ``auth.admin_replica_networks``) before anything is added or probed.  Registered
  replicas survive reloads (a reload manages the file's backends only) until they are
  deregistered.  Deregistering takes a replica out at once (no handover: the caller asked
  for exactly that one; its in-flight requests finish); registering a leaving replica
  keeps it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from router.config import BackendConfig, Config, ModelConfig, load_config, parse_backend
from router.core.scheduling import validate_policy_params
from router.fleet.handover import Handover
from router.fleet.membership import NoSuchReplica, merge_backends, replica_from, update_in_place
from router.fleet.replica_networks import ReplicaNetworks, Resolver, registration_hosts, system_resolver
from router.fleet.replicas import Fleet, Replica
from router.transport import prompt_tokens
from yamlcheck import ConfigError, Node

if TYPE_CHECKING:
    from router.core.scheduling import Profile
    from router.fleet.discovery import Discovery
    from router.fleet.kv_events import KVEvents
    from router.fleet.monitor import Monitor
    from router.observability.telemetry import Telemetry
    from router.prefix.index import PrefixIndex
    from router.transport.prompt_tokens import PromptTokens
    from router.transport.proxy import Proxy
    from tokenization import ModelTokenizer

log = logging.getLogger("router.membership")

class Router(Protocol):
    """The parts of the running router (router/app.py: `Router`) a reload and a membership
    change touch.  A protocol, because app.py builds a `Reloader` and imports this module."""

    config: Config
    fleet: Fleet
    index: PrefixIndex
    kv_events: KVEvents
    telemetry: Telemetry
    prompt_tokens: PromptTokens | None
    policy: Profile
    monitor: Monitor | None
    proxy: Proxy | None
    launched: list[tuple[str, BackendConfig]]
    discovery: Discovery

    def apply_config(self, config: Config, *, rebuild_policy: bool,
                     tokenizers: dict[str, ModelTokenizer] | None = None) -> None: ...


# Sections a reload applies; the others need a restart.
LIVE_SECTIONS = ("models", "routing", "auth", "health", "metrics", "proxy", "circuit_breaker")
RESTART_SECTIONS = ("server", "cors", "admission", "prefix", "launch")
_RETIRE_POLL_S = 0.5


class FleetWiring:
    """The fleet's listener: what joining and leaving mean for the router's other parts."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._stopping: set[asyncio.Task[None]] = set()

    def replica_added(self, replica: Replica) -> None:
        if self.router.monitor is not None and self.router.monitor.started:
            self.router.monitor.watch(replica)
        self.router.kv_events.add(replica)  # (nothing before startup; may ask the replica where)

    def replica_removed(self, replica: Replica) -> None:
        router = self.router
        router.index.remove_replica(replica.id)
        if router.proxy is not None:
            router.proxy.forget_replica(replica.id)  # its latency record
        router.kv_events.remove(replica.id)
        task = asyncio.get_running_loop().create_task(self._retire(replica))
        self._stopping.add(task)  # kept until done (asyncio holds tasks weakly)
        task.add_done_callback(self._stopping.discard)

    async def _retire(self, replica: Replica) -> None:
        """Stop polling it; once its last in-flight request ended, drop its metric series
        (the requests it still serves count under it until then)."""
        if self.router.monitor is not None:
            await self.router.monitor.unwatch(replica)
        while replica.in_flight > 0:
            await asyncio.sleep(_RETIRE_POLL_S)
        await asyncio.sleep(_RETIRE_POLL_S)  # the last request's metrics are written after it
        if self.router.fleet.find(replica.model, replica.url) is None:  # not re-added since
            self.router.telemetry.forget_replica(replica.id)


def _section_changes(old: Config, new: Config) -> tuple[list[str], list[str]]:
    live = [s for s in LIVE_SECTIONS if getattr(old, s) != getattr(new, s)]
    restart = [s for s in RESTART_SECTIONS if getattr(old, s) != getattr(new, s)]
    if old.proxy.max_connections != new.proxy.max_connections:
        restart.append("proxy.max_connections")
    return live, restart


class Reloader:
    """Applies a new Config to a running Router (see the module docstring)."""

    def __init__(self, router: Router, *, overrides: Callable[[Config], Config] | None = None) -> None:
        self.router = router
        self.overrides = overrides or (lambda config: config)  # e.g. the CLI's --port
        self.registered: dict[tuple[str, str], Replica] = {}  # (model, url) from the admin API
        self.resolve: Resolver = system_resolver  # how registration hosts are resolved
        self._lock = asyncio.Lock()
        # Dropped replicas that serve until their successors are healthy (make-before-break).
        self.handover = Handover(router.fleet, on_leave=lambda outcome: router.telemetry.handovers.labels(
            outcome).inc())
        router.fleet.listeners.append(self.handover)
        router.telemetry.set_function(router.telemetry.replicas_leaving, (), lambda: float(len(self.handover)))

    async def reload(self, path: str | None = None) -> dict[str, Any]:
        """Re-read the config file; raises ConfigError (nothing changed) if it is invalid."""
        router = self.router
        path = path or router.config.file
        if path is None:
            raise ConfigError(None, "", "this router was not started from a config file: nothing to reload")
        async with self._lock:
            try:
                config = await asyncio.to_thread(
                    load_config, path, then=lambda c: validate_policy_params(self.overrides(c)))
                config = self.overrides(config)
                loaded = router.prompt_tokens.files if router.prompt_tokens is not None else {}
                tokenizers = await asyncio.to_thread(prompt_tokens.load, config, loaded)
            except ConfigError as exc:
                log.warning("reload of %s refused, nothing changed: %s", path, exc)
                raise
            return self._apply(config, tokenizers)

    def _apply(self, config: Config, tokenizers: dict[str, ModelTokenizer]) -> dict[str, Any]:
        router = self.router
        old = router.config
        if router.launched:  # engines started by `launch:` stay what they were
            config = merge_backends(config, router.launched)
        live, restart = _section_changes(old, config)
        # Sections that need a restart keep their running values.
        config = dataclasses.replace(
            config, server=old.server, cors=old.cors, admission=old.admission,
            prefix=old.prefix, launch=old.launch,
            proxy=dataclasses.replace(config.proxy, max_connections=old.proxy.max_connections))
        before = self.handover.capacity()
        added, dropped, updated = self._apply_backends(config)
        # A new profile adopts what the old one learned, so any change to `routing` rebuilds.
        router.apply_config(config, rebuild_policy=old.routing != config.routing, tokenizers=tokenizers)
        router.discovery.apply_config(config)  # changed discovery: sections restart
        # With the new health settings: those with nothing to wait for go now.
        self.handover.leave(dropped, before, config.health.handover_timeout)
        summary = {"file": config.file, "applied": live, "restart_required": restart,
                   "replicas_added": added, "replicas_removed": [r.id for r in dropped],
                   "replicas_leaving": [r.id for r in self.handover.leaving()],
                   "replicas_updated": updated, **router.policy.describe()}
        log.info("reloaded %s: %s", config.file, summary)
        if restart:
            log.warning("reload: changes to %s need a restart and were not applied",
                        ", ".join(restart))
        return summary

    def _apply_backends(self, config: Config) -> tuple[list[str], list[Replica], list[str]]:
        """Add the file's new backends (probed at once) and update the ones that stay;
        returns (added URLs, the replicas this file drops, updated ids).  The dropped ones
        are still members: `Handover.leave` decides when they go."""
        fleet = self.router.fleet
        handover = self.handover
        wanted = {(m.name, b.url): b for m in config.models for b in m.backends}
        added: list[str] = []
        dropped: list[Replica] = []
        updated: list[str] = []
        for replica in list(fleet):
            key = (replica.model, replica.url)
            if key in self.registered or self.router.discovery.owns(*key):
                continue
            backend = wanted.get(key)
            if backend is None:
                if not handover.is_leaving(replica):  # (one an earlier reload dropped waits on)
                    dropped.append(replica)
                continue
            handover.keep(replica)  # listed again while it was leaving: it stays
            if update_in_place(replica, backend):
                updated.append(replica.id)
        for (model, url), backend in wanted.items():
            if fleet.find(model, url) is None:
                fleet.add(replica_from(model, backend))
                added.append(url)
        return added, dropped, updated

    # -- the admin API ---------------------------------------------------------------
    async def register(self, body: Any) -> Replica:
        """Add a replica from a JSON body {model, url, tensor_parallel_size?, weight?, ...}:
        ConfigError (400) for a bad body, RouterError 403 for a host outside the allowed
        networks; in both cases nothing was added or contacted."""
        node = Node(body, "body", "POST /admin/replicas")
        node.mapping(("model", "url", "tensor_parallel_size", "weight", "labels", "api_key", "kv_events"))
        model = node.get("model").string()
        if not model:
            node.get("model").fail("expected a model name")
        backend_doc = {k: v for k, v in body.items() if k != "model"}
        backend = parse_backend(Node(backend_doc, "body", "POST /admin/replicas"))
        fleet = self.router.fleet
        existing = fleet.find(model, backend.url)
        if existing is None or not self.handover.is_leaving(existing):
            self._check_new(node, model, backend)
        await self.networks().check(registration_hosts(backend))
        existing = fleet.find(model, backend.url)
        if existing is not None and self.handover.is_leaving(existing):
            # A reload dropped it and it still serves: registering keeps it, as registered.
            self.handover.keep(existing)
            update_in_place(existing, backend)
            self.registered[(model, backend.url)] = existing
            log.info("replica %s of %s (leaving) registered through the admin API: it stays",
                     existing.id, model)
            return existing
        self._check_new(node, model, backend)  # (another registration may have won meanwhile)
        replica = replica_from(model, backend)
        fleet.add(replica)
        self.registered[(model, backend.url)] = replica
        self._ensure_model(model)
        log.info("replica %s of %s registered through the admin API", replica.id, model)
        return replica

    def _check_new(self, node: Node, model: str, backend: BackendConfig) -> None:
        if self.router.fleet.find(model, backend.url) is not None:
            node.get("url").fail(f"{backend.url} is already a replica of {model}")

    def networks(self) -> ReplicaNetworks:
        """The networks a registration may point into now (`auth` is live on reload); the
        default's known hosts are those of the replicas not registered here."""
        fleet, registered = self.router.fleet, self.registered

        def known_hosts() -> list[str]:
            return [r.endpoint.host for r in fleet if (r.model, r.url) not in registered]

        return ReplicaNetworks(self.router.config.auth.admin_replica_networks, known_hosts,
                               resolve=self.resolve)

    async def deregister(self, body: Any) -> Replica:
        node = Node(body, "body", "DELETE /admin/replicas")
        node.mapping(("model", "url"))
        url = node.get("url").string().rstrip("/")
        model = node.get("model").string() if node.has("model") else None
        matches = [r for r in self.router.fleet if r.url == url and model in (None, r.model)]
        if not matches:
            raise NoSuchReplica(f"No replica {url}" + (f" of {model}" if model else ""))
        for replica in matches:
            self.router.fleet.remove(replica)
            self.registered.pop((replica.model, replica.url), None)
            log.info("replica %s of %s removed through the admin API", replica.id, replica.model)
        return matches[0]

    def _ensure_model(self, model: str) -> None:
        """A model first seen through registration becomes a model of the running config."""
        config = self.router.config
        if any(m.name == model for m in config.models):
            return
        self.router.apply_config(dataclasses.replace(
            config, models=config.models + (ModelConfig(name=model),)), rebuild_policy=False)
