"""The router's own Prometheus metrics (`Telemetry`).

Metrics live in a `CollectorRegistry` that the app creates (no module globals, so two
routers in one process - as in the tests - never share counters).  Every name starts with
``router_``; the ``vllm:`` names belong to the engines and are never reused here.

With ``router --workers N`` (router/workers.py) every worker is a process of its own:
prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) keeps each worker's
values in files, and whichever worker answers /metrics reads them all, so counters and
histograms are sums over workers and each gauge says how it combines (``multiprocess_mode``:
a sum for in-flight counts, the most recent value for what a worker read off a replica).
Gauges computed at scrape time are set every second in that mode instead.

The access log is router/observability/access_log.py, the process's log setup logs.py,
Sentry sentry.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from enum import Enum
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

from router import __version__
from router.observability.metric_handles import handle

log = logging.getLogger("router")

# Latency buckets (seconds): sub-millisecond router overhead up to multi-minute generations.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0)
DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1)
BLOCK_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# Predicted minus actual cached tokens: symmetric, so over- and under-prediction both show.
PREDICTION_BUCKETS = (-4096, -1024, -256, -64, -16, -1, 0, 16, 64, 256, 1024, 4096)
MAX_CACHED_CHILDREN = 65536
NO_REPLICA = "none"  # replica label of requests answered by the router itself


_PD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
GaugeFunction = tuple[Gauge, Callable[[], float]]


class BreakerView(Protocol):
    """What the metrics read of a replica's circuit breaker (router/fleet/breaker.py).

    Protocols, not the fleet's classes: observability sits below the fleet in the layers
    (the fleet's monitor records its probes here), so it names only what it reads."""

    @property
    def state(self) -> Enum: ...


class LoadView(Protocol):
    """What the metrics read of a replica's scraped engine load (router/fleet/replicas.py)."""

    @property
    def running(self) -> float: ...
    @property
    def waiting(self) -> float: ...
    @property
    def kv_cache_usage(self) -> float: ...


class ReplicaView(Protocol):
    """What the metrics read of a replica (router/fleet/replicas.py: `Replica`)."""

    @property
    def id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def model_mismatch(self) -> frozenset[str]: ...
    @property
    def health(self) -> Enum: ...
    @property
    def breaker(self) -> BreakerView: ...
    @property
    def load(self) -> LoadView: ...


def multiprocess_dir() -> str | None:
    """The directory of prometheus-client's multiprocess mode, when this process is a worker
    of ``router --workers N`` (the supervisor sets it)."""
    return os.environ.get(MULTIPROC_ENV) or None


class _Collected:
    """Hands one metric of this process to another registry (the multiprocess page)."""

    def __init__(self, metric: Info) -> None:
        self.metric = metric

    def collect(self) -> Any:
        return self.metric.collect()


class Telemetry:
    """All router_ metrics, registered in a registry owned by this object."""

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 multiprocess: str | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess  # the directory, for a worker of `router --workers N`
        # Scrape-time gauges in multiprocess mode, set by refresh(): (name, labels) -> child, function
        self._functions: dict[tuple[str, tuple[str, ...]], GaugeFunction] = {}
        # Labelled children already looked up (labels() validates and locks on every call,
        # about a tenth of a request's own CPU): (metric id, labels) -> child.  Cleared when a
        # replica leaves (its children are removed) and when it passes MAX_CACHED_CHILDREN.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.build_info = Info("router_build", "Router version and active routing policy.",
                               registry=r)
        self.requests = Counter(
            "router_requests", "Requests answered, by model, replica (none: answered by the "
            "router) and HTTP status.", ["model", "replica", "status"], registry=r)
        self.duration = Histogram(
            "router_request_duration_seconds", "Time from request arrival to the last byte "
            "sent to the client, by model and the replica that answered (none: the router).",
            ["model", "replica"], buckets=LATENCY_BUCKETS, registry=r)
        self.prefix_tokens = Counter(
            "router_prefix_tokens", "Prompt tokens of the answered requests (kind=prompt, the "
            "router's estimate), those the router's index matched on the replica it chose "
            "(kind=matched: the predicted hit rate is matched / prompt) and on the replica of the "
            "fleet with the longest match (kind=best: the hit rate no placement could beat, as far "
            "as the index knows).", ["model", "kind"], registry=r)
        self.ttfb = Histogram(
            "router_time_to_first_byte_seconds", "Time from request arrival to the first "
            "response body byte from the replica (TTFT for streams).", ["model", "replica"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(
            "router_in_flight_requests", "Requests dispatched to a replica and not finished.",
            ["model", "replica"], registry=r,
            multiprocess_mode="livesum")
        self.health = Gauge(
            "router_replica_health", "Replica health state (1 for the current state).",
            ["model", "replica", "state"], registry=r,
            multiprocess_mode="livemostrecent")
        self.model_mismatch = Gauge(
            "router_replica_model_mismatch", "1 while the replica's /v1/models does not list the "
            "model it is configured under (it gets no traffic), else 0.", ["model", "replica"],
            registry=r, multiprocess_mode="livemostrecent")
        self.replicas_leaving = Gauge(
            "router_replicas_leaving", "Replicas a reload dropped that still serve until their "
            "successors pass a probe (make-before-break).", registry=r,
            multiprocess_mode="livemax")
        self.handovers = Counter(
            "router_reload_handovers", "Replicas a reload dropped that have left, by outcome: "
            "successors_healthy (the model had its healthy successors), timeout "
            "(health.handover_timeout passed first), unroutable (it was or turned "
            "unhealthy: it served nothing).", ["outcome"], registry=r)
        self.engine_load = Gauge(
            "router_replica_engine_load", "Load the replica last reported on /metrics: "
            "running and waiting requests, KV cache usage (0..1).",
            ["model", "replica", "kind"], registry=r,
            multiprocess_mode="livemostrecent")
        self.pd_requests = Counter(
            "router_pd_requests", "Requests of disaggregated models by path: disaggregated "
            "(prefill hop, then decode hop) or why the prefill hop was skipped.", ["model", "path"],
            registry=r)
        self.pd_prefill_seconds = Histogram(
            "router_pd_prefill_seconds", "The prefill hop of disaggregated requests, start to its "
            "whole answer.", ["model"], buckets=_PD_BUCKETS, registry=r)
        self.pd_no_transfer_params = Counter(
            "router_pd_no_transfer_params", "Prefill answers without kv_transfer_params (a "
            "shared-storage connector, or a prefill replica without --kv-transfer-config): the "
            "decode hop went without them.", ["model"], registry=r)
        self.retries = Counter(
            "router_retries", "Upstream attempts after the first one.", ["model"], registry=r)
        self.failovers = Counter(
            "router_failovers", "Requests that left a replica for the next one in the ranking "
            "before any byte reached the client.", ["model", "replica"], registry=r)
        self.upstream_errors = Counter(
            "router_upstream_errors", "Upstream failures by kind: connect, connect_timeout, "
            "first_byte_timeout, read_timeout, status_5xx, status_429, disconnect, stream_cut.",
            ["model", "replica", "kind"], registry=r)
        self.pool_timeouts = Counter(
            "router_upstream_pool_timeouts", "Requests answered 503 because no upstream "
            "connection came free within proxy.pool_timeout (or the deadline): every one of "
            "proxy.max_connections was in use.  No replica is blamed for these.", ["model"],
            registry=r)
        self.pool_wait = Histogram(
            "router_upstream_pool_wait_seconds", "Time attempts waited for an upstream "
            "connection slot, those that waited only (all proxy.max_connections in use), "
            "including waits that ran out.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.client_disconnects = Counter(
            "router_client_disconnects", "Requests whose client went away before the end.",
            ["model"], registry=r)
        self.decisions = Counter(
            "router_policy_decisions", "Routing decisions by policy and chosen replica.",
            ["policy", "model", "replica"], registry=r)
        self.decision_seconds = Histogram(
            "router_policy_decision_seconds", "Time the policy took to rank the replicas.",
            ["policy"], buckets=DECISION_BUCKETS, registry=r)
        self.matched_blocks = Histogram(
            "router_policy_matched_blocks", "Prefix blocks the chosen replica was believed to "
            "hold.", ["policy"], buckets=BLOCK_BUCKETS, registry=r)
        self.probes = Counter(
            "router_health_probes", "Replica health probes by result.",
            ["replica", "result"], registry=r)
        # -- the front door ---------------------------------------------------------
        self.rejections = Counter(
            "router_rejections", "Requests the router refused before routing, by reason: "
            "auth, forbidden_model, bad_path, rate_limit_requests, rate_limit_tokens, "
            "queue_full, wait_timeout, body_budget, ejected, response_not_found.", ["reason"], registry=r)
        self.queue_length = Gauge(
            "router_admission_queue_length", "Requests waiting for a saturated fleet.",
            ["model"], registry=r,
            multiprocess_mode="livesum")
        self.queue_wait = Histogram(
            "router_admission_wait_seconds", "Time requests waited in the admission queue "
            "(admitted ones).", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.breaker_state = Gauge(
            "router_replica_circuit_breaker", "Circuit breaker state of each replica (1 for "
            "the current state).", ["replica", "state"], registry=r,
            multiprocess_mode="livemostrecent")
        self.ejections = Counter(
            "router_replica_ejections", "Times a replica's circuit breaker opened.",
            ["replica"], registry=r)
        self.outlier_ejections = Counter(
            "router_outlier_ejections", "Times a replica that still answered was ejected for "
            "being an outlier, by reason: latency (time to first byte far above its peers', "
            "router/transport/outliers.py).", ["replica", "reason"], registry=r)
        self.hedges = Counter(
            "router_hedges", "Hedged requests (a second attempt for a first one without its "
            "first byte in time), by outcome: won (the hedge answered first), lost (the first "
            "attempt did), failed (neither answered: failover went on), skipped_budget (no "
            "retry token), skipped_no_replica (no other admissible replica).",
            ["model", "outcome"], registry=r)
        self.retry_budget_exhausted = Counter(
            "router_retry_budget_exhausted", "Retries not made because the retry budget was "
            "spent.", ["model"], registry=r)
        self.connections = Gauge(
            "router_client_connections", "Client connections open now.", registry=r,
            multiprocess_mode="livesum")
        self.loop_lag = Gauge(
            "router_event_loop_lag_seconds", "The longest stall of the router's event loop in "
            "the last 10 s (timeouts during one do not count against replicas).", registry=r,
            multiprocess_mode="livemax")
        self.connections_refused = Counter(
            "router_client_connections_refused", "Client connections closed at once for being "
            "over server.max_connections.", registry=r)
        self.slow_heads = Counter(
            "router_client_slow_heads", "Client connections closed with 408 because the "
            "request head did not arrive within server.header_timeout.", registry=r)
        # -- the exact prefix index (KV events) -------------------------------------
        self.prediction_error = Histogram(
            "router_prefix_prediction_error_tokens", "Per answered request: the prompt tokens the "
            "router predicted cached on the replica that answered, minus the replica's "
            "usage.prompt_tokens_details.cached_tokens (by the index that predicted: exact or "
            "approximate).", ["model", "index"], buckets=PREDICTION_BUCKETS, registry=r)
        self.predictions = Counter(
            "router_prefix_predictions", "Answered requests whose cached_tokens the router could "
            "compare with its prediction, by outcome: within_block (|error| <= one KV block), "
            "over, under.", ["model", "index", "outcome"], registry=r)
        self.kv_stream = Gauge(
            "router_kv_events_stream", "Each replica's KV-event stream, read at scrape time: "
            "connected (0/1), exact (1: routed by the exact index, 0: approximate), last_sequence, "
            "blocks (held in the exact index), and totals since the router started: events, "
            "gaps, gaps_replayed, gaps_lost, restarts, replays, bad_messages.",
            ["replica", "kind"], registry=r, multiprocess_mode="livemostrecent")
        self.tokenize_seconds = Histogram(
            "router_tokenize_seconds", "Time to tokenize a request for the exact prefix index "
            "(on or off the event loop).", ["model"], buckets=DECISION_BUCKETS, registry=r)
        self.body_bytes = Gauge(
            "router_request_body_bytes_held", "Bytes of request bodies held now (budget: "
            "server.max_inflight_body_bytes).", registry=r,
            multiprocess_mode="livesum")

    # -- helpers used by the proxy and the monitor -----------------------------------
    def set_info(self, policy: str) -> None:
        self.build_info.info({"version": __version__, "policy": policy})

    def init_replica(self, replica: ReplicaView) -> None:
        """Create every per-replica series at 0 so dashboards show replicas before traffic."""
        # In flight is read at scrape time: setting it on every dispatch and completion cost
        # two locked gauge writes per request.
        self.set_function(self.in_flight, (replica.model, replica.id), lambda: float(replica.in_flight))
        self.set_health(replica)
        self.set_breaker(replica.id, replica.breaker, "")
        self.set_function(self.model_mismatch, (replica.model, replica.id),
                          lambda: 1.0 if replica.model_mismatch else 0.0)

    def forget_replica(self, replica_id: str) -> None:
        """Remove every series labelled with a replica that left the fleet (bounded labels).

        prometheus_client has no removal by one label, so the label tuples are read from
        each of this object's metrics' children (`_metrics`, a private attribute)."""
        for metric in list(vars(self).values()):
            if not isinstance(metric, MetricWrapperBase):
                continue
            names = getattr(metric, "_labelnames", ())
            if "replica" not in names:
                continue
            at = names.index("replica")
            for labels in list(getattr(metric, "_metrics", {})):
                if labels[at] == replica_id:
                    metric.remove(*labels)
        for key in [k for k in self._functions if replica_id in k[1]]:
            del self._functions[key]
        self._children.clear()

    def set_breaker(self, replica_id: str, breaker: BreakerView, reason: str) -> None:
        for state in type(breaker.state):  # every state of the breaker's enum
            self.breaker_state.labels(replica_id, state.value).set(
                1 if breaker.state is state else 0)
        if breaker.state.value == "open" and reason:
            self.ejections.labels(replica_id).inc()

    def set_health(self, replica: ReplicaView) -> None:
        for state in type(replica.health):  # every state of the replica's Health enum
            self.health.labels(replica.model, replica.id, state.value).set(
                1 if replica.health is state else 0)

    def watch_kv_stream(self, replica_id: str, read: Callable[[], dict[str, Any] | None]) -> None:
        """Export a replica's KV-event stream figures, read from `read()` at each scrape."""
        def reader(kind: str) -> Callable[[], float]:
            def value() -> float:
                stats = read()
                if stats is None:
                    return 0.0
                if kind == "exact":
                    return 1.0 if stats.get("mode") == "exact" else 0.0
                raw = stats.get(kind)
                return float(raw) if isinstance(raw, (int, float)) else -1.0
            return value
        for kind in ("connected", "exact", "last_sequence", "blocks", "events", "gaps", "gaps_replayed",
                     "gaps_lost", "restarts", "replays", "bad_messages"):
            self.set_function(self.kv_stream, (replica_id, kind), reader(kind))

    def set_function(self, gauge: Gauge, labels: tuple[str, ...], read: Callable[[], float]) -> None:
        """A gauge child read at scrape time; in multiprocess mode set by refresh() instead
        (a worker cannot call another's function)."""
        child = gauge.labels(*labels) if labels else gauge
        if self.multiprocess is None:
            child.set_function(read)
        else:
            self._functions[(gauge._name, labels)] = (child, read)

    def refresh(self) -> None:
        """Multiprocess mode: write every scrape-time gauge's value now (every second, and
        before this worker renders /metrics)."""
        for child, read in list(self._functions.values()):
            try:
                child.set(read())
            except Exception:  # noqa: BLE001 - a broken reader must not break /metrics
                log.exception("metric function failed")

    def child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: a counter's or histogram's as a fast handle
        (router/observability/metric_handles.py), any other as it is."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            if len(self._children) >= MAX_CACHED_CHILDREN:
                self._children.clear()
            found = self._children[key] = handle(metric.labels(*labels))
        return found

    def set_engine_load(self, replica: ReplicaView) -> None:
        load = replica.load
        self.engine_load.labels(replica.model, replica.id, "running").set(load.running)
        self.engine_load.labels(replica.model, replica.id, "waiting").set(load.waiting)
        self.engine_load.labels(replica.model, replica.id, "kv_cache_usage").set(load.kv_cache_usage)

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        self.refresh()
        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker, path=self.multiprocess)  # type: ignore[no-untyped-call]
        every_worker.register(_Collected(self.build_info))  # Info has no multiprocess mode
        return generate_latest(every_worker), CONTENT_TYPE_LATEST
