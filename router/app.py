"""The router application: every long-lived object, created once from a Config.

`Router` owns the telemetry registry, the fleet, the prefix index, the policy, the
upstream HTTP session, the monitor, the proxy and the API handlers, and optionally the
locally launched engines (`launch:`).  Nothing is global: two routers in one process (as
in the tests) share nothing.

    router = await Router.create(config)      # launches engines, opens the session
    app = router.app                          # aiohttp Application with every route
    server = await serve(router, host, port)  # listening (handler cancellation on)
    ...
    await server.drain_and_close(timeout)     # SIGTERM path: stop accepting, drain, clean up
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from router.config import BackendConfig, Config, LaunchConfig
from router.core.disaggregation import DECODE_TERMS
from router.core.scheduling.presets import build_profile, profile_of
from router.fleet.discovery import Discovery
from router.fleet.engine_load import EngineLoad
from router.fleet.kv_events import KVEvents
from router.fleet.lora import AdapterLoader
from router.fleet.membership import build_fleet, merge_backends
from router.fleet.monitor import Monitor
from router.fleet.replicas import Health, Replica
from router.frontdoor.api import Api
from router.frontdoor.connections import ConnectionLimits, FrontDoorRunner, default_connection_cap, raise_fd_limit
from router.frontdoor.cors import Cors
from router.observability.loop_lag import LoopLag
from router.observability.sentry import init_sentry
from router.observability.telemetry import Telemetry, multiprocess_dir
from router.prefix.exact import ExactIndex
from router.prefix.index import DEFAULT_CAPACITY_BLOCKS, PrefixIndex
from router.reload import FleetWiring, Reloader
from router.transport.flows import Disaggregated, SingleHop
from router.transport.hooks import AdmissionRelease
from router.transport.prompt_tokens import PromptTokens
from router.transport.proxy import Proxy
from router.transport.upstream import UpstreamPool
from tokenization import ModelTokenizer
from yamlcheck import Node

METRICS_REFRESH_S = 1.0  # multiprocess mode: how stale another worker's scrape-time gauges may be
log = logging.getLogger("router.app")

ROUTER_KEY: web.AppKey[Router] = web.AppKey("router", object)  # type: ignore[arg-type]


def launch_plan(launch: LaunchConfig) -> tuple[Any, Any]:
    """The `launch:` block resolved: (the engines config, the replicas it would start).

    Validates the engines file (or the inline `models:`) and `only:`; `router check-config`
    calls it without starting anything."""
    from engines import launcher

    if launch.config is not None:
        engines_config = launcher.load_config(launch.config)
    else:
        engines_config = launcher.parse_config(dict(launch.inline or {}), launch.file)
    return engines_config, launcher.plan(engines_config, only=launch.only or None)


async def launch_engines(launch: LaunchConfig) -> tuple[Any, list[tuple[str, BackendConfig]]]:
    """Start the `launch:` engines (engines.launcher) and wait until they are healthy.

    Returns the running fleet handle (to stop later) and (served model name, backend) pairs.
    """
    from engines import launcher

    engines_config, plans = launch_plan(launch)
    runner = launcher.Launcher(state_dir=engines_config.state_dir)
    running = await asyncio.to_thread(runner.start, plans)
    try:
        await running.wait_healthy_async(timeout=launch.ready_timeout)
    except BaseException:
        await running.stop_async()
        raise
    backends = [
        (p.served_model_name, BackendConfig(
            url=p.url, tensor_parallel_size=p.tensor_parallel_size * p.pipeline_parallel_size,
            kv_events_endpoint=p.kv_events_endpoint, kv_replay_endpoint=p.kv_replay_endpoint,
            kv_events_topic=p.kv_events_topic))
        for p in plans
    ]
    log.info("launched %d replica(s): %s", len(plans), ", ".join(p.url for p in plans))
    return running, backends


class Router:
    """One running router: the objects the request path and the background tasks share."""

    def __init__(self, config: Config, *, registry: CollectorRegistry | None = None,
                 worker_index: int | None = None) -> None:
        self.config = config
        self.worker_index = worker_index  # which of `router --workers N` this is (router/workers.py)
        self.telemetry = Telemetry(registry, multiprocess=multiprocess_dir() if worker_index is not None else None)
        self._metrics_refresher: asyncio.Task[None] | None = None
        self.fleet = build_fleet(config)
        prefix = config.prefix
        self.index = PrefixIndex(prefix.capacity_blocks or DEFAULT_CAPACITY_BLOCKS,
                                 tokens_per_block=max(1, prefix.block_chars // 4))
        exact = prefix.exact
        self.exact = ExactIndex(exact.capacity_blocks or DEFAULT_CAPACITY_BLOCKS,
                                max_blocks_per_request=prefix.max_blocks_per_request,
                                relearn_s=exact.relearn_s, confirm_s=exact.confirm_s)
        self.kv_events = KVEvents(self.exact, replay_timeout=exact.replay_timeout,
                                  on_subscribed=self.watch_kv_stream)
        self.prompt_tokens: PromptTokens | None = None  # set by _build (it needs the session)
        self.policy = profile_of(config.routing)
        self.telemetry.set_info(self.policy.name)
        self.upstream: UpstreamPool | None = None  # the clients' requests to replicas
        self.session: aiohttp.ClientSession | None = None  # the router's own requests to replicas
        self.flow: SingleHop | None = None
        self.probe_session: aiohttp.ClientSession | None = None  # the monitor's own pool
        self.cors = Cors(config.cors)
        self.monitor: Monitor | None = None
        self.proxy: Proxy | None = None
        self.api: Api | None = None
        self.app: web.Application | None = None
        self.engines: Any = None  # engines.launcher.RunningFleet when `launch:` started some
        self.connection_limits: ConnectionLimits | None = None  # set by serve()
        self.launched: list[tuple[str, BackendConfig]] = []  # backends `launch:` started
        self.reloader = Reloader(self)
        self.fleet.listeners.append(FleetWiring(self))
        self.discovery = Discovery(self.fleet)  # models' discovery: sections (DNS, Kubernetes)

    @classmethod
    async def create(cls, config: Config, *, registry: CollectorRegistry | None = None,
                     launch: bool = True, launched: list[tuple[str, BackendConfig]] | None = None,
                     worker_index: int | None = None) -> Router:
        """Launch engines if asked, then build everything (inside a running event loop).
        `launched`: backends someone else launched (the supervisor of `--workers`)."""
        engines = None
        launched = list(launched or [])
        if launch and config.launch is not None:
            engines, launched = await launch_engines(config.launch)
        if launched:
            config = merge_backends(config, launched)
        try:
            router = cls(config, registry=registry, worker_index=worker_index)
            router.engines = engines
            router.launched = launched
            router._build()
        except BaseException:
            if engines is not None:
                await engines.stop_async()
            raise
        return router

    def _build(self) -> None:
        cfg = self.config
        # The clients' requests go through the lean pool (router/transport/upstream.py); the session
        # carries the router's own requests to replicas (adapter loads, /tokenize).
        self.upstream = UpstreamPool(limit=cfg.proxy.max_connections)
        connector = aiohttp.TCPConnector(limit=cfg.proxy.max_connections, limit_per_host=0,
                                         enable_cleanup_closed=True, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             timeout=aiohttp.ClientTimeout(total=None))
        # Probes get their own pool, so long streams filling `proxy.max_connections` can
        # never make a replica look dead.
        self.probe_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True,
                                           ttl_dns_cache=300),
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        self.loop_lag = LoopLag()
        self.telemetry.set_function(self.telemetry.loop_lag, (), self.loop_lag.recent_max)
        self.monitor = Monitor(self.fleet, self.probe_session, cfg.health, cfg.metrics,
                               self.telemetry, on_load=self._on_load, on_health=self._on_health,
                               loop_lag=self.loop_lag)
        self.proxy = Proxy(upstream=self.upstream, feedback_to=lambda: self.policy, index=self.index,
                           config=cfg.proxy, telemetry=self.telemetry, monitor=self.monitor,
                           request_id_header=cfg.server.request_id_header,
                           breaker_config=cfg.circuit_breaker, loop_lag=self.loop_lag, exact=self.exact,
                           fleet=self.fleet)
        flow = self.flow = SingleHop(proxy=self.proxy, profile=lambda: self.policy, index=self.index,
                                     telemetry=self.telemetry, exact=self.exact,
                                     loader=AdapterLoader(self.session), explain=cfg.server.access_log)
        # The decode hop of disaggregated models: load and KV room (and the adapter), no prefix.
        self.decode_profile = build_profile("cache_aware", Node({}, "decode profile"),
                                            Node(dict(DECODE_TERMS), "decode profile terms"))
        pd_flow = Disaggregated(flow, lambda: self.decode_profile)
        self.prompt_tokens = PromptTokens(cfg, self.session, self.telemetry)  # loads tokenizer files
        self.api = Api(config=cfg, fleet=self.fleet, proxy=self.proxy, flow=flow, pd_flow=pd_flow,
                       telemetry=self.telemetry,
                       index=self.index, exact=self.exact, kv_events=self.kv_events,
                       prompt_tokens=self.prompt_tokens)
        self.api.reloader = self.reloader
        self.proxy.hooks.add(AdmissionRelease(self.api.admission.on_request_end))
        self.api.discovery = self.discovery
        self.api.worker["index"] = self.worker_index
        app = web.Application(client_max_size=cfg.server.max_body_bytes,
                              middlewares=[self.api.front_door(self.cors)],
                              handler_args={"lingering_time": 1.0})
        app[ROUTER_KEY] = self
        app.add_routes(self.api.routes())
        if self.cors.enabled:  # (cors needs a restart: routes.yaml's reload keeps the old one)
            app.on_response_prepare.append(self.cors.on_response_prepare)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        self.app = app

    # -- fleet feedback ------------------------------------------------------------------
    def _on_load(self, replica: Replica, old: EngineLoad, new: EngineLoad) -> None:
        """Keep the prefix index honest about what a replica can hold."""
        if old.scraped_at and (new.prefix_cache_queries < old.prefix_cache_queries):
            # Counters went backwards: the replica restarted with an empty cache.
            log.info("replica %s restarted (prefix-cache counters reset): forgetting its prefixes",
                     replica.id)
            self.index.remove_replica(replica.id)
            subscription = self.kv_events.subscriptions.get(replica.id)
            if subscription is not None:
                subscription.restart_hint()
        if (not old.scraped_at or new.block_size != old.block_size
                or new.num_gpu_blocks != old.num_gpu_blocks):
            self.index.set_replica_capacity_tokens(replica.id, replica.kv_capacity_tokens)
            self.exact.set_capacity(replica.id, new.num_gpu_blocks, new.block_size)
        if self.api is not None:
            self.api.on_load(replica)

    def apply_config(self, config: Config, *, rebuild_policy: bool,
                     tokenizers: dict[str, ModelTokenizer] | None = None) -> None:
        """Make `config` the running one (router/reload.py decides what may change);
        `tokenizers`: its tokenizer files, loaded beforehand (prompt_tokens.load)."""
        assert self.monitor is not None and self.proxy is not None and self.api is not None
        assert self.prompt_tokens is not None
        if rebuild_policy:
            policy = profile_of(config.routing)
            policy.adopt(self.policy)  # what it learned about the replicas stays (rates, shares)
            self.policy = policy  # the flow and the feedback hook read it through getters
            self.telemetry.set_info(policy.name)
        self.prompt_tokens.apply(config, self.prompt_tokens.files if tokenizers is None else tokenizers)
        self.monitor.health_cfg, self.monitor.metrics_cfg = config.health, config.metrics
        self.proxy.apply_config(config.proxy, config.circuit_breaker)
        self.api.apply_config(config)
        self.config = config

    def _on_health(self, replica: Replica, old: Health, new: Health) -> None:
        if self.proxy is not None:
            self.proxy.on_health(replica, old, new)
        self.reloader.handover.on_health(replica, old, new)  # a successor is up, or a leaver down

    # -- lifecycle -------------------------------------------------------------------------
    async def _on_startup(self, app: web.Application) -> None:
        init_sentry(self.config.server.sentry_dsn)
        assert self.monitor is not None
        self.loop_lag.start()
        await self.monitor.start()
        self.kv_events.start(self.fleet, session=self.probe_session)
        self.discovery.apply_config(self.config)
        if self.telemetry.multiprocess is not None:
            self._metrics_refresher = asyncio.create_task(self._refresh_metrics(), name="metrics refresh")

    async def _refresh_metrics(self) -> None:
        """Multiprocess mode: scrape-time gauges written every second, for the other workers."""
        while True:
            self.telemetry.refresh()
            await asyncio.sleep(METRICS_REFRESH_S)

    def watch_kv_stream(self, replica_id: str) -> None:
        self.telemetry.watch_kv_stream(replica_id, lambda: self.kv_events.stats(replica_id))

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop background tasks, close the upstream session, stop launched engines."""
        if self._metrics_refresher is not None:
            self._metrics_refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._metrics_refresher
        self.reloader.handover.close()
        await self.discovery.close()
        if self.monitor is not None:
            await self.monitor.stop()
            await self.loop_lag.stop()
        await self.kv_events.close()
        if self.flow is not None:
            await self.flow.loader.close()
        if self.upstream is not None:
            await self.upstream.close()
        for session in (self.session, self.probe_session):
            if session is not None and not session.closed:
                await session.close()
        if self.engines is not None:
            engines, self.engines = self.engines, None
            with contextlib.suppress(Exception):
                await engines.stop_async(grace=5.0)


class Server:
    """A Router listening on a socket."""

    def __init__(self, router: Router, runner: web.AppRunner, site: web.BaseSite, port: int) -> None:
        self.router = router
        self.runner = runner
        self.site = site
        self.port = port

    @property
    def url(self) -> str:
        host = self.router.config.server.host
        host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        return f"http://{host}:{self.port}"

    async def drain_and_close(self, timeout: float | None = None) -> bool:
        """Stop accepting, let in-flight requests finish (up to `timeout`), then clean up.

        Returns True when every in-flight request finished within the timeout.
        """
        timeout = self.router.config.server.drain_timeout if timeout is None else timeout
        assert self.router.api is not None and self.router.proxy is not None
        self.router.api.draining = True
        for site in list(self.runner.sites):
            await site.stop()  # the listening socket closes: no new connections
        active = len(self.router.proxy.active)
        if active:
            log.info("draining %d in-flight request(s) for up to %gs", active, timeout)
        drained = await self.router.proxy.wait_idle(timeout)
        if not drained:
            log.warning("drain timeout: %d request(s) still in flight are cut (streams end "
                        "with an error event)", len(self.router.proxy.active))
            await self.router.proxy.cut_and_wait()
        await self.runner.cleanup()
        return drained

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve(router: Router, host: str | None = None, port: int | None = None, *,
                sock: socket.socket | None = None) -> Server:
    """Listen on host:port (port 0: a free one), or accept on `sock` (a worker of
    `router --workers N`: the supervisor's socket).  Handlers are cancelled when their
    client disconnects, which is what closes the upstream connection at once."""
    assert router.app is not None
    cfg = router.config.server
    host = cfg.host if host is None else host
    port = cfg.port if port is None else port
    fd_limit = raise_fd_limit()
    cap = cfg.max_connections or default_connection_cap(fd_limit)
    telemetry = router.telemetry
    limits = ConnectionLimits(cap, cfg.header_timeout,
                              on_refused=telemetry.connections_refused.inc,
                              on_head_timeout=telemetry.slow_heads.inc)
    router.connection_limits = limits
    router.telemetry.set_function(router.telemetry.connections, (), lambda: limits.open)
    log.info("accepting up to %d client connections (file-descriptor limit %d), backlog %d",
             cap, fd_limit, cfg.backlog)
    runner = FrontDoorRunner(router.app, limits=limits, handler_cancellation=True,
                             access_log=None, shutdown_timeout=1.0,
                             keepalive_timeout=cfg.keepalive_timeout, auto_decompress=False)
    await runner.setup()
    site: web.BaseSite
    if sock is not None:
        site = web.SockSite(runner, sock, backlog=cfg.backlog)
    else:
        site = web.TCPSite(runner, host, port, backlog=cfg.backlog, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        for sock in server.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                bound = sock.getsockname()[1]
                break
    return Server(router, runner, site, bound)
