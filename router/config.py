"""routes.yaml: the router's configuration, validated into frozen dataclasses.

    server:   {host, port, max_body_bytes, drain_timeout, request_id_header, access_log,
               log_format, log_level, sentry_dsn, backlog, max_connections, header_timeout,
               body_timeout, keepalive_timeout, max_inflight_body_bytes, trusted_proxies,
               forward_paths}
    auth:     {keys: [{name, key | key_env | key_file, models, priority, rate_limit}],
               keys_file, admin_key | admin_key_env | admin_key_file, protect_metrics,
               admin_replica_networks}
    cors:     {allow_origins, allow_methods, allow_headers, expose_headers,
               allow_credentials, max_age}
    admission: {enabled, queue_size, max_wait, max_waiting_per_replica, max_queue_time,
               max_kv_usage, priority_header, rate_limit, max_clients}
    models:   - {name, aliases: [..], backends: [{url, tensor_parallel_size, weight,
                 labels, api_key | api_key_env | api_key_file}]}
    routing:  {policy, params: {...}, terms: {...}, session_header}
    prefix:   {block_chars, block_tokens, capacity_blocks, max_blocks_per_request}
    health:   {interval, timeout, failure_threshold, success_threshold, handover_timeout}
    metrics:  {scrape_interval, timeout, models_interval}
    proxy:    {connect_timeout, first_byte_timeout, read_timeout, unhealthy_grace,
               max_attempts, backoff_initial, backoff_max, deadline, retry_after,
               max_connections, pool_timeout, retry_budget_ratio, retry_budget_min_per_s,
               buffer_bytes, hedge: {enabled, min_delay, multiplier, max_delay, paths}}
    circuit_breaker: {failure_threshold, ejection_time, max_ejection_time, max_retry_after,
               latency_factor, latency_min_requests, max_ejection_percent}
    launch:   {config: engines.yaml, only: [..], ...}   (optional: local engines to start)

Every error names the file, the key path (``models[0].backends[1].url``), what was found
and what was expected; unknown keys get a "did you mean" hint (yamlcheck).  The
whole file is read with ``yaml.safe_load``; nothing in it is executed.

Secrets (client keys, the admin key, backend API keys) come from the file itself, an
environment variable (``*_env``) or a file of their own (``*_file``, e.g. a Kubernetes or
Docker secret).  They are fields with ``repr=False``, and no error message ever quotes one.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from router.core.scheduling.presets import DEFAULT_PRESET, PRESET_NAMES, build_profile
from router.paths import DEFAULT_FORWARD_PATHS, forward_path_problem
from yamlcheck import ConfigError, Node, describe, load_yaml

if TYPE_CHECKING:
    from router.core.scheduling.profile import Profile

LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "routes.yaml"


# --------------------------------------------------------------------------- dataclasses
@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 32 * 1024 * 1024  # request bodies above this get 413
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests
    request_id_header: str = "X-Request-Id"
    access_log: bool = True
    log_format: str = "json"  # json | text
    log_level: str = "info"
    sentry_dsn: str | None = field(default=None, repr=False)  # or SENTRY_DSN in the environment
    backlog: int = 4096  # listen backlog (the kernel caps it at net.core.somaxconn)
    max_connections: int | None = None  # client connections at once (None: from the fd limit)
    header_timeout: float = 10.0  # seconds for a request's line and headers to arrive
    body_timeout: float = 60.0  # seconds for its body to arrive
    keepalive_timeout: float = 75.0  # an idle keep-alive connection is closed after this
    max_inflight_body_bytes: int = 256 * 1024 * 1024  # request bodies held at once, all together
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    forward_paths: tuple[str, ...] = DEFAULT_FORWARD_PATHS  # POST paths forwarded to replicas


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Token buckets of one client: requests per second (with a burst) and tokens per minute."""

    requests_per_s: float | None = None
    burst: float | None = None  # requests the bucket holds (default: one second's worth, >= 1)
    tokens_per_min: float | None = None  # prompt tokens (estimated) + requested max_tokens


@dataclass(frozen=True, slots=True)
class ClientKeyConfig:
    name: str  # shown in logs and metrics instead of the key
    key: str = field(repr=False)
    models: tuple[str, ...] = ()  # models (or aliases) this key may use; empty: all
    priority: int = 0  # admission priority class (higher first)
    rate_limit: RateLimitConfig | None = None  # overrides admission.rate_limit


@dataclass(frozen=True, slots=True)
class AuthConfig:
    keys: tuple[ClientKeyConfig, ...] = ()  # empty: no client authentication
    admin_key: str | None = field(default=None, repr=False)  # None: /admin only from loopback
    protect_metrics: bool = False  # /metrics needs the admin key too
    # Where POST /admin/replicas may point the router (router/fleet/replica_networks.py); None:
    # loopback and the hosts the router already serves from.
    admin_replica_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


@dataclass(frozen=True, slots=True)
class CorsConfig:
    allow_origins: tuple[str, ...] = ()  # empty: no CORS headers at all; "*": any origin
    allow_methods: tuple[str, ...] = ("GET", "POST", "OPTIONS")
    allow_headers: tuple[str, ...] = ("Authorization", "Content-Type", "X-Request-Id",
                                      "X-Session-Id", "X-Priority", "OpenAI-Organization",
                                      "OpenAI-Project", "X-Stainless-*")
    expose_headers: tuple[str, ...] = ("X-Request-Id", "Retry-After")
    allow_credentials: bool = False
    max_age: int = 600  # seconds a browser may cache a preflight answer


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    enabled: bool = True
    queue_size: int = 1024  # requests waiting at once for a saturated fleet (0: 429 at once)
    max_wait: float = 30.0  # seconds a request may wait; then 429
    max_waiting_per_replica: float = 16  # a replica with this many waiting requests is saturated
    # ... unless it is draining them: at the rate it took requests into its batch since the
    # last scrape, its queue would be empty within this many seconds; 0: the count alone
    max_queue_time: float = 1.0
    max_kv_usage: float = 0.98  # ... or with this much of its KV cache in use
    priority_header: str = "X-Priority"  # may lower a request's priority, never raise it
    rate_limit: RateLimitConfig | None = None  # per client (its key, else its address)
    max_clients: int = 10_000  # bound on per-client state (rate-limit buckets, queues)


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    failure_threshold: int = 5  # consecutive request-path failures that eject a replica
    ejection_time: float = 5.0  # seconds out for the first ejection; doubles each time
    max_ejection_time: float = 60.0
    max_retry_after: float = 60.0  # cap on how long an upstream Retry-After keeps it out
    # Latency outliers (router/transport/outliers.py): a replica whose time to first byte runs this many
    # times its peers' median (same model, same request size) is ejected; 0: off.
    latency_factor: float = 2.5
    latency_min_requests: int = 10  # compared samples a replica needs before it is judged
    max_ejection_percent: float = 50.0  # of a model's replicas out at once by latency (at least one)


@dataclass(frozen=True, slots=True)
class BackendConfig:
    url: str  # normalized: scheme://host:port[/path] without trailing slash
    tensor_parallel_size: int = 1
    weight: float = 1.0
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    api_key: str | None = field(default=None, repr=False)
    kv_events_endpoint: str | None = None  # tcp://host:port of the replica's KV-event publisher
    kv_replay_endpoint: str | None = None
    kv_events_topic: str | None = None
    role: str = "both"  # prefill / decode / both: its pools in disaggregated serving (flows.py)


ROLES = ("prefill", "decode", "both")


@dataclass(frozen=True, slots=True)
class LoraConfig:
    """A model's LoRA adapters the router may load itself (router/fleet/lora.py)."""

    adapters: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # name -> path
    dynamic_loading: bool = False  # POST /v1/load_lora_adapter when no replica serves one
    load_timeout: float = 30.0  # seconds one load may take
    max_loads_in_flight: int = 4  # distinct (adapter, replica) loads at a time; more wait for none: 503


@dataclass(frozen=True, slots=True)
class DisaggregationConfig:
    """When a model with prefill and decode pools skips the prefill hop (router/core/flows.py)."""

    min_prompt_tokens: int = 256  # shorter prompts go to a decode replica whole
    skip_cached_fraction: float = 0.8  # ... as do prompts the decode replica mostly holds
    transfer_timeout: float = 60.0  # the prefill hop's whole answer (it carries the transfer params)


DNS_RECORDS = ("A", "AAAA", "SRV")


@dataclass(frozen=True, slots=True)
class DnsDiscoveryConfig:
    """Replicas are the addresses a DNS name resolves to (router/fleet/discovery/dns.py)."""

    name: str
    record: str = "A"  # A | AAAA | SRV (SRV records carry each replica's port)
    port: int | None = None  # A / AAAA: the replicas' port
    nameservers: tuple[tuple[str, int], ...] = ()  # (host, port); empty: the system's resolver
    interval: float = 10.0  # longest wait between resolutions (a shorter record TTL wins)
    min_interval: float = 1.0  # shortest (a TTL of 0 must not make it spin)
    timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class KubernetesDiscoveryConfig:
    """Replicas are the ready endpoints of EndpointSlices (router/fleet/discovery/kubernetes.py)."""

    namespace: str
    service: str | None = None  # the Service's slices (label kubernetes.io/service-name)
    selector: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # or these labels
    port: int | None = None  # the replicas' port; None: the slice's port named `port_name` (or its only one)
    port_name: str | None = None
    kubeconfig: str | None = None  # None: the in-cluster service account
    context: str | None = None  # a kubeconfig context (None: its current one)
    resync: float = 300.0  # seconds between full re-lists (a watch also restarts on any error)


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Where a model's replicas come from besides `backends:` (router/fleet/discovery/)."""

    dns: DnsDiscoveryConfig | None = None
    kubernetes: KubernetesDiscoveryConfig | None = None
    scheme: str = "http"
    max_replicas: int = 1024  # bound on the replicas one source may add
    template: BackendConfig = field(default_factory=lambda: BackendConfig(url=""))  # url unused
    kv_events_port: int | None = None  # per replica: tcp://ITS_ADDRESS:port
    kv_replay_port: int | None = None


REPLICA_TOKENIZER = "replica"  # `tokenizer: replica`: the replica's own POST /tokenize


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    aliases: tuple[str, ...] = ()
    backends: tuple[BackendConfig, ...] = ()
    tokenizer: str | None = None  # the model's tokenizer.json (or its directory): exact prefix index
    lora: LoraConfig = field(default_factory=LoraConfig)
    disaggregation: DisaggregationConfig = field(default_factory=DisaggregationConfig)
    discovery: DiscoveryConfig | None = None
    # Served prefill-then-decode: it has a prefill pool and a decode pool.  Derived once
    # here (every request of the model asks).
    disaggregated: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        roles = {b.role for b in self.backends}
        if self.discovery is not None:
            roles.add(self.discovery.template.role)
        object.__setattr__(self, "disaggregated", "prefill" in roles and "decode" in roles)


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    policy: str = DEFAULT_PRESET  # a preset of router/core/scheduling/presets.py
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    terms: Mapping[str, Any] | None = None  # cost term -> weight; None: the preset's own
    session_header: str = "X-Session-Id"  # session key header (else the body's `user`)
    # Keys the replica token in the Responses ids the router issues (router/core/response_ids.py);
    # None: an unkeyed hash.  The same on every router process in front of one fleet.
    response_id_secret: str | None = field(default=None, repr=False)
    file: str | None = None  # for params_node() error messages

    def params_node(self) -> Node:
        """The policy's parameters as a Node, so `build()` can report key paths."""
        return Node(dict(self.params), "routing.params", self.file)

    def terms_node(self) -> Node | None:
        """routing.terms as a Node (None when not set)."""
        return None if self.terms is None else Node(dict(self.terms), "routing.terms", self.file)

    def build_profile(self) -> Profile:
        """The scheduling profile this section describes (ConfigError on bad params/terms)."""
        return build_profile(self.policy, self.params_node(), self.terms_node())


@dataclass(frozen=True, slots=True)
class PrefixConfig:
    block_chars: int = 64  # bytes of routing text per hashed block
    block_tokens: int = 16  # token ids per hashed block when the client sent tokens
    capacity_blocks: int | None = None  # global prefix-index bound (None: the index's default)
    max_blocks_per_request: int = 8192  # blocks hashed per request (one huge prompt cannot flush the index)
    exact: ExactConfig = field(default_factory=lambda: ExactConfig())


@dataclass(frozen=True, slots=True)
class ExactConfig:
    """prefix.exact: the index fed by the replicas' KV events (router/prefix/exact.py)."""

    capacity_blocks: int | None = None  # global bound (None: the index's default)
    relearn_s: float = 10.0  # after lost events: approximate routing for this long
    confirm_s: float = 2.0  # a finished request's blocks stay pending this long
    replay_timeout: float = 2.0  # wait for each replayed batch


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval: float = 1.0
    timeout: float = 2.0
    failure_threshold: int = 3  # consecutive failed probes: SUSPECT -> UNHEALTHY
    success_threshold: int = 2  # consecutive passed probes: UNHEALTHY -> HEALTHY
    # A reload's dropped replicas keep serving until their successors pass a probe, at most
    # this long (router/fleet/handover.py); 0: they leave at once.
    handover_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    scrape_interval: float = 1.0  # replica /metrics polling
    timeout: float = 2.0
    models_interval: float = 10.0  # replica /v1/models discovery


# Paths a hedge may duplicate by default: generations and embeddings have no side effects
# (vLLM keeps nothing of them but its prefix cache).  Not /v1/responses (``store`` keeps the
# answer), nor anything an operator adds to ``server.forward_paths`` without saying so here.
DEFAULT_HEDGE_PATHS: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@dataclass(frozen=True, slots=True)
class HedgeConfig:
    """Hedged requests (router/transport/proxy.py): a second attempt for a first one without its first
    byte after a delay derived from the replica's expected time to first byte."""

    enabled: bool = False  # off by default: a hedge is a second copy of the request's work
    min_delay: float = 0.01  # seconds: never hedge sooner (the delay is mostly multiplier x the expected TTFT)
    multiplier: float = 2.0  # hedge after this many times the expected time to first byte ...
    max_delay: float = 30.0  # ... but no later than this (also the delay while nothing is known)
    paths: tuple[str, ...] = DEFAULT_HEDGE_PATHS  # requests without side effects


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    connect_timeout: float = 2.0
    first_byte_timeout: float = 60.0  # a stream's wait for its first byte (its TTFT)
    read_timeout: float = 600.0  # max silence between upstream bytes (and a non-stream answer's wait)
    unhealthy_grace: float = 2.0  # max silence while the replica is unhealthy
    max_attempts: int = 3  # upstream attempts per request, first one included
    backoff_initial: float = 0.02  # seconds; full-jitter exponential backoff between attempts
    backoff_max: float = 0.5
    deadline: float = 30.0  # no new attempt starts this long after the request arrived
    retry_after: int = 1  # Retry-After seconds on 503
    max_connections: int = 0  # upstream connection pool size (0: unlimited)
    pool_timeout: float = 5.0  # most seconds a request waits for a pool slot (capped by `deadline`; 0: none)
    retry_budget_ratio: float = 0.2  # retries may add at most this share of the requests ...
    retry_budget_min_per_s: float = 5.0  # ... plus this many per second
    buffer_bytes: int = 1024 * 1024  # non-stream answers up to this size are buffered whole
    hedge: HedgeConfig = field(default_factory=HedgeConfig)


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """Local engines to start before serving (engines.launcher); see the engines README."""

    config: str | None = None  # path to an engines.yaml (relative to routes.yaml)
    inline: Mapping[str, Any] | None = None  # or an engines.yaml body inline (`models:`)
    only: tuple[str, ...] = ()  # start only these registry entries
    ready_timeout: float = 300.0
    file: str | None = None  # the routes.yaml this came from


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    models: tuple[ModelConfig, ...] = ()
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    launch: LaunchConfig | None = None
    file: str | None = None

    def aliases(self) -> dict[str, str]:
        """alias -> canonical model name."""
        return {alias: m.name for m in self.models for alias in m.aliases}


# --------------------------------------------------------------------------- parsing
_TOP_KEYS = ("server", "auth", "cors", "admission", "models", "routing", "prefix", "health",
             "metrics", "proxy", "circuit_breaker", "launch")
_SERVER_KEYS = ("host", "port", "max_body_bytes", "drain_timeout", "request_id_header",
                "access_log", "log_format", "log_level", "sentry_dsn", "backlog",
                "max_connections", "header_timeout", "body_timeout", "keepalive_timeout",
                "max_inflight_body_bytes", "trusted_proxies", "forward_paths")
_AUTH_KEYS = ("keys", "keys_file", "admin_key", "admin_key_env", "admin_key_file",
              "protect_metrics", "admin_replica_networks")
_CLIENT_KEY_KEYS = ("name", "key", "key_env", "key_file", "models", "priority", "rate_limit")
_RATE_LIMIT_KEYS = ("requests_per_s", "burst", "tokens_per_min")
_CORS_KEYS = ("allow_origins", "allow_methods", "allow_headers", "expose_headers",
              "allow_credentials", "max_age")
_ADMISSION_KEYS = ("enabled", "queue_size", "max_wait", "max_waiting_per_replica", "max_queue_time",
                   "max_kv_usage", "priority_header", "rate_limit", "max_clients")
_BREAKER_KEYS = ("failure_threshold", "ejection_time", "max_ejection_time", "max_retry_after",
                 "latency_factor", "latency_min_requests", "max_ejection_percent")
_MODEL_KEYS = ("name", "aliases", "backends", "tokenizer", "lora", "disaggregation", "discovery")
_DISCOVERY_KEYS = ("dns", "kubernetes", "scheme", "max_replicas", "backend")
_DNS_KEYS = ("name", "record", "port", "nameservers", "interval", "min_interval", "timeout")
_K8S_KEYS = ("namespace", "service", "selector", "port", "port_name", "kubeconfig", "context", "resync")
_TEMPLATE_KEYS = ("tensor_parallel_size", "weight", "labels", "api_key", "api_key_env", "api_key_file",
                  "kv_events", "role")
_TEMPLATE_KV_KEYS = ("port", "replay_port", "topic")
_LORA_KEYS = ("adapters", "dynamic_loading", "load_timeout", "max_loads_in_flight")
_DISAGG_KEYS = ("min_prompt_tokens", "skip_cached_fraction", "transfer_timeout")
_BACKEND_KEYS = ("url", "tensor_parallel_size", "weight", "labels", "api_key", "api_key_env",
                 "api_key_file", "kv_events", "role")
_KV_EVENTS_KEYS = ("endpoint", "replay_endpoint", "topic")
_ROUTING_KEYS = ("policy", "params", "terms", "session_header", "response_id_secret",
                 "response_id_secret_env", "response_id_secret_file")
_PREFIX_KEYS = ("block_chars", "block_tokens", "capacity_blocks", "max_blocks_per_request", "exact")
_EXACT_KEYS = ("capacity_blocks", "relearn_s", "confirm_s", "replay_timeout")
_HEALTH_KEYS = ("interval", "timeout", "failure_threshold", "success_threshold", "handover_timeout")
_METRICS_KEYS = ("scrape_interval", "timeout", "models_interval")
_PROXY_KEYS = ("connect_timeout", "first_byte_timeout", "read_timeout", "unhealthy_grace",
               "max_attempts", "backoff_initial", "backoff_max", "deadline", "retry_after",
               "max_connections", "pool_timeout", "retry_budget_ratio", "retry_budget_min_per_s",
               "buffer_bytes", "hedge")
_HEDGE_KEYS = ("enabled", "min_delay", "multiplier", "max_delay", "paths")
_LAUNCH_KEYS = ("config", "models", "only", "ready_timeout")


def _num(parent: Node, key: str, default: float, *, minimum: float = 0.0,
         exclusive: bool = True, maximum: float | None = None) -> float:
    return parent.get(key, default).number(minimum=minimum, exclusive_minimum=exclusive,
                                           maximum=maximum)


def _int(parent: Node, key: str, default: int | None, *, minimum: int | None = None,
         maximum: int | None = None) -> int:
    return parent.get(key, default).integer(minimum=minimum, maximum=maximum)


def _header_name(node: Node) -> str:
    value = node.string()
    if any(c in value for c in " \t\r\n:"):
        node.fail(f"expected an HTTP header name, found {describe(value)}")
    return value


def _url(node: Node) -> str:
    value = node.string().strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        node.fail(f"expected an http(s) URL like http://127.0.0.1:8101, found {describe(value)}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        node.fail(f"expected a valid port in the URL, found {describe(value)}")
    if parts.username is not None or parts.password is not None:
        # Never quote the value: it holds a credential.
        node.fail("credentials in the URL are not allowed (URLs are logged and shown in metrics); "
                  "put the replica's key in api_key, api_key_env or api_key_file")
    if parts.query or parts.fragment:
        node.fail(f"expected a base URL without query or fragment, found {describe(value)}")
    return value.rstrip("/")


def _resolve_path(value: str, base_dir: Path | None) -> Path:
    path = Path(value)
    return path if path.is_absolute() or base_dir is None else base_dir / path


def _secret(node: Node, name: str, env: Mapping[str, str], base_dir: Path | None, *,
            required: bool = False, min_length: int = 1) -> str | None:
    """The secret `name` of a mapping node, from `name`, `name_env` or `name_file`.

    At most one of the three may be given.  Error messages name the key, the variable or
    the file, never the secret itself.
    """
    given = [k for k in (name, f"{name}_env", f"{name}_file") if node.has(k)]
    if len(given) > 1:
        node.get(given[1]).fail(f"give only one of {name}, {name}_env, {name}_file")
    if not given:
        if required:
            node.get(name, None).fail(f"required: one of {name}, {name}_env, {name}_file")
        return None
    key = given[0]
    source = node.get(key)
    if key == name:
        if not isinstance(source.value, str):
            source.fail("expected a string (quote it in YAML)")
        value = source.value
    elif key.endswith("_env"):
        var = source.string()
        if var not in env:
            source.fail(f"environment variable '{var}' is not set")
        value = env[var]
    else:
        path = _resolve_path(source.string(), base_dir)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            source.fail(f"cannot read the secret file {path}: {exc.strerror or exc}")
    if len(value.strip()) < min_length:
        source.fail(f"expected a secret of at least {min_length} characters")
    if any(c.isspace() or ord(c) < 0x21 for c in value):
        source.fail("the secret must not contain whitespace or control characters")
    return value


def _zmq_endpoint(node: Node) -> str:
    value = node.string()
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        node.fail(f"expected a ZMQ endpoint like tcp://127.0.0.1:5557, found {describe(value)}")
    return value


def _network(node: Node) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    value = node.string()
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        node.fail(f"expected an IP address or CIDR like 10.0.0.0/8, found {describe(value)}")


def _forward_paths(node: Node) -> tuple[str, ...]:
    paths: list[str] = []
    for item in node.items():
        path = item.string()
        problem = forward_path_problem(path)
        if problem is not None:
            item.fail(f"{problem}; found {describe(path)}")
        paths.append(path)
    if not paths:
        node.fail("expected at least one path")
    return tuple(dict.fromkeys(paths))


def _server(node: Node) -> ServerConfig:
    node.mapping(_SERVER_KEYS)
    d = ServerConfig()
    dsn = node.get("sentry_dsn", None)
    max_conn = node.get("max_connections", None)
    max_body = _int(node, "max_body_bytes", d.max_body_bytes, minimum=1024)
    budget_node = node.get("max_inflight_body_bytes", max(d.max_inflight_body_bytes, max_body))
    budget = budget_node.integer(minimum=1024)
    if budget < max_body:
        budget_node.fail(f"expected a value >= max_body_bytes ({max_body}), found {budget}")
    return ServerConfig(
        backlog=_int(node, "backlog", d.backlog, minimum=1, maximum=1 << 20),
        max_connections=None if max_conn.value is None else max_conn.integer(minimum=1),
        header_timeout=_num(node, "header_timeout", d.header_timeout),
        body_timeout=_num(node, "body_timeout", d.body_timeout),
        keepalive_timeout=_num(node, "keepalive_timeout", d.keepalive_timeout),
        max_inflight_body_bytes=budget,
        trusted_proxies=tuple(_network(n) for n in node.get("trusted_proxies", []).items()),
        forward_paths=(_forward_paths(node.get("forward_paths"))
                       if node.has("forward_paths") else d.forward_paths),
        host=node.get("host", d.host).string(),
        port=_int(node, "port", d.port, minimum=0, maximum=65535),
        max_body_bytes=max_body,
        drain_timeout=_num(node, "drain_timeout", d.drain_timeout, exclusive=False),
        request_id_header=_header_name(node.get("request_id_header", d.request_id_header)),
        access_log=node.get("access_log", d.access_log).boolean(),
        log_format=node.get("log_format", d.log_format).choice(LOG_FORMATS),
        log_level=node.get("log_level", d.log_level).choice(LOG_LEVELS),
        sentry_dsn=dsn.optional_string(),
    )


def _rate_limit(node: Node) -> RateLimitConfig:
    node.mapping(_RATE_LIMIT_KEYS)
    if not any(node.has(k) for k in ("requests_per_s", "tokens_per_min")):
        node.fail("expected requests_per_s and/or tokens_per_min")
    rps = node.get("requests_per_s", None)
    burst = node.get("burst", None)
    tpm = node.get("tokens_per_min", None)
    if burst.value is not None and rps.value is None:
        burst.fail("burst needs requests_per_s")
    return RateLimitConfig(
        requests_per_s=None if rps.value is None else rps.number(minimum=0, exclusive_minimum=True),
        burst=None if burst.value is None else burst.number(minimum=1),
        tokens_per_min=None if tpm.value is None else tpm.number(minimum=0, exclusive_minimum=True),
    )


def _client_keys(node: Node, env: Mapping[str, str], base_dir: Path | None,
                 seen_names: dict[str, str], seen_keys: dict[str, str]) -> list[ClientKeyConfig]:
    keys: list[ClientKeyConfig] = []
    for item in node.items():
        item.mapping(_CLIENT_KEY_KEYS)
        name_node = item.get("name")
        name = name_node.string()
        if name in seen_names:
            name_node.fail(f"key name '{name}' is already used at {seen_names[name]}")
        seen_names[name] = name_node.path
        secret = _secret(item, "key", env, base_dir, required=True, min_length=8)
        assert secret is not None
        if secret in seen_keys:
            item.fail(f"this key is the same as the key at {seen_keys[secret]}")
        seen_keys[secret] = item.path
        keys.append(ClientKeyConfig(
            name=name, key=secret,
            models=tuple(item.get("models", []).string_list()),
            priority=_int(item, "priority", 0, minimum=-1000, maximum=1000),
            rate_limit=_rate_limit(item.get("rate_limit")) if item.has("rate_limit") else None,
        ))
    return keys


def _auth(node: Node, env: Mapping[str, str], base_dir: Path | None) -> AuthConfig:
    node.mapping(_AUTH_KEYS)
    names: dict[str, str] = {}
    secrets: dict[str, str] = {}
    keys = _client_keys(node.get("keys", []), env, base_dir, names, secrets)
    if node.has("keys_file"):
        file_node = node.get("keys_file")
        path = _resolve_path(file_node.string(), base_dir)
        root = load_yaml(path)
        items = root.value.get("keys") if isinstance(root.value, Mapping) else root.value
        keys += _client_keys(Node(items, "keys", path), env, path.parent, names, secrets)
    return AuthConfig(
        keys=tuple(keys),
        admin_key=_secret(node, "admin_key", env, base_dir, min_length=8),
        protect_metrics=node.get("protect_metrics", False).boolean(),
        admin_replica_networks=_networks_or_default(node.get("admin_replica_networks", None)),
    )


def _networks_or_default(node: Node) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
    """A list of CIDRs; null (or absent) keeps the default (None), [] allows nothing."""
    if node.value is None:
        return None
    return tuple(_network(item) for item in node.items())


def _cors(node: Node) -> CorsConfig:
    node.mapping(_CORS_KEYS)
    d = CorsConfig()
    origins = []
    for item in node.get("allow_origins", []).items():
        origin = item.string().rstrip("/")
        if origin != "*" and not (origin.startswith(("http://", "https://")) and
                                  urlsplit(origin).hostname and not urlsplit(origin).path):
            item.fail(f"expected \"*\" or an origin like https://app.example.com, found {describe(origin)}")
        origins.append(origin)
    credentials = node.get("allow_credentials", d.allow_credentials).boolean()
    if credentials and "*" in origins:
        node.get("allow_credentials").fail(
            "allow_credentials cannot be used with the origin \"*\" (browsers refuse it); list the origins")

    def names(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        if not node.has(key):
            return default
        return tuple(_header_name(n) if key != "allow_methods" else n.string().upper()
                     for n in node.get(key).items())

    return CorsConfig(
        allow_origins=tuple(origins),
        allow_methods=names("allow_methods", d.allow_methods),
        allow_headers=names("allow_headers", d.allow_headers),
        expose_headers=names("expose_headers", d.expose_headers),
        allow_credentials=credentials,
        max_age=_int(node, "max_age", d.max_age, minimum=0, maximum=86400),
    )


def _admission(node: Node) -> AdmissionConfig:
    node.mapping(_ADMISSION_KEYS)
    d = AdmissionConfig()
    return AdmissionConfig(
        enabled=node.get("enabled", d.enabled).boolean(),
        queue_size=_int(node, "queue_size", d.queue_size, minimum=0, maximum=1_000_000),
        max_wait=_num(node, "max_wait", d.max_wait),
        max_waiting_per_replica=_num(node, "max_waiting_per_replica", d.max_waiting_per_replica),
        max_queue_time=_num(node, "max_queue_time", d.max_queue_time, exclusive=False),
        max_kv_usage=_num(node, "max_kv_usage", d.max_kv_usage, maximum=1.0),
        priority_header=_header_name(node.get("priority_header", d.priority_header)),
        rate_limit=_rate_limit(node.get("rate_limit")) if node.has("rate_limit") else None,
        max_clients=_int(node, "max_clients", d.max_clients, minimum=1, maximum=10_000_000),
    )


def _circuit_breaker(node: Node) -> CircuitBreakerConfig:
    node.mapping(_BREAKER_KEYS)
    d = CircuitBreakerConfig()
    first = _num(node, "ejection_time", d.ejection_time)
    longest_node = node.get("max_ejection_time", d.max_ejection_time)
    longest = longest_node.number(minimum=0.0, exclusive_minimum=True)
    if longest < first:
        longest_node.fail(f"expected a value >= ejection_time ({first:g}), found {longest:g}")
    return CircuitBreakerConfig(
        failure_threshold=_int(node, "failure_threshold", d.failure_threshold, minimum=1),
        ejection_time=first,
        max_ejection_time=longest,
        max_retry_after=_num(node, "max_retry_after", d.max_retry_after, exclusive=False),
        latency_factor=_latency_factor(node.get("latency_factor", d.latency_factor)),
        latency_min_requests=_int(node, "latency_min_requests", d.latency_min_requests,
                                  minimum=1, maximum=1_000_000),
        max_ejection_percent=_num(node, "max_ejection_percent", d.max_ejection_percent,
                                  exclusive=False, maximum=100.0),
    )


def _latency_factor(node: Node) -> float:
    factor = node.number(minimum=0.0)
    if 0.0 < factor <= 1.0:
        node.fail(f"expected 0 (off) or a factor above 1, found {factor:g}")
    return factor


def _hedge(node: Node) -> HedgeConfig:
    node.mapping(_HEDGE_KEYS)
    d = HedgeConfig()
    shortest = _num(node, "min_delay", d.min_delay, exclusive=False)
    longest_node = node.get("max_delay", d.max_delay)
    longest = longest_node.number(minimum=0.0, exclusive_minimum=True)
    if longest < shortest:
        longest_node.fail(f"expected a value >= min_delay ({shortest:g}), found {longest:g}")
    paths: list[str] = []
    for item in node.get("paths", list(d.paths)).items():
        path = item.string()
        if not path.startswith("/"):
            item.fail(f"expected a path starting with '/', found {path!r}")
        paths.append(path)
    return HedgeConfig(
        enabled=node.get("enabled", d.enabled).boolean(),
        min_delay=shortest,
        multiplier=_num(node, "multiplier", d.multiplier, minimum=1.0, exclusive=False),
        max_delay=longest,
        paths=tuple(dict.fromkeys(paths)),
    )


def parse_backend(node: Node) -> BackendConfig:
    """One `backends:` entry from outside a file (the admin API): no env or file secrets."""
    return _backend(node, {}, None)


def _backend(node: Node, env: Mapping[str, str], base_dir: Path | None = None) -> BackendConfig:
    if isinstance(node.value, str):  # shorthand: just the URL
        return BackendConfig(url=_url(node))
    node.mapping(_BACKEND_KEYS)
    api_key = _secret(node, "api_key", env, base_dir)
    kv_endpoint = kv_replay = kv_topic = None
    if node.has("kv_events"):
        kv = node.get("kv_events").mapping(_KV_EVENTS_KEYS)
        kv_endpoint = _zmq_endpoint(kv.get("endpoint"))
        replay = kv.get("replay_endpoint", None)
        kv_replay = None if replay.value is None else _zmq_endpoint(replay)
        kv_topic = kv.get("topic", "").string(non_empty=False)
    return BackendConfig(
        kv_events_endpoint=kv_endpoint,
        kv_replay_endpoint=kv_replay,
        kv_events_topic=kv_topic,
        url=_url(node.get("url")),
        tensor_parallel_size=_int(node, "tensor_parallel_size", 1, minimum=1, maximum=1024),
        weight=_num(node, "weight", 1.0),
        labels=MappingProxyType(node.get("labels", {}).string_map()),
        api_key=api_key,
        role=node.get("role", "both").choice(ROLES),
    )


def _nameserver(node: Node) -> tuple[str, int]:
    value = node.string()
    host, port = value, 53
    if value.startswith("["):  # [v6]:port
        host, _, rest = value[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else 53
    elif value.count(":") == 1:
        host, _, tail = value.partition(":")
        if not tail.isdigit():
            node.fail(f"expected HOST or HOST:PORT, found {describe(value)}")
        port = int(tail)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        node.fail(f"expected a name server's IP address (optionally :PORT), found {describe(value)}")
    if not 0 < port < 65536:
        node.fail(f"expected a port from 1 to 65535, found {port}")
    return host, port


def _dns_discovery(node: Node) -> DnsDiscoveryConfig:
    node.mapping(_DNS_KEYS)
    record = node.get("record", "A").choice(DNS_RECORDS)
    port = None
    if record != "SRV":
        port = _int(node, "port", None, minimum=1, maximum=65535)
    elif node.has("port"):
        node.get("port").fail("SRV records carry each replica's port: remove port")
    interval = _num(node, "interval", 10.0)
    min_interval = _num(node, "min_interval", min(1.0, interval), maximum=interval)
    return DnsDiscoveryConfig(
        name=node.get("name").string().rstrip("."), record=record, port=port,
        nameservers=tuple(_nameserver(n) for n in node.get("nameservers", []).items()),
        interval=interval, min_interval=min_interval, timeout=_num(node, "timeout", 2.0))


def _kubernetes_discovery(node: Node, base_dir: Path | None) -> KubernetesDiscoveryConfig:
    node.mapping(_K8S_KEYS)
    if importlib.util.find_spec("kubernetes_asyncio") is None:
        node.fail("Kubernetes discovery needs the kubernetes_asyncio package: "
                  "pip install 'vllm-smart-router[kubernetes]'")
    service = node.get("service", None).optional_string()
    selector = node.get("selector", {}).string_map()
    if (service is None) == (not selector):
        node.fail("give exactly one of service (a Service's EndpointSlices) and selector "
                  "(EndpointSlices with these labels)")
    port = _int(node, "port", None, minimum=1, maximum=65535) if node.has("port") else None
    port_name = node.get("port_name", None).optional_string()
    if port is not None and port_name is not None:
        node.get("port_name").fail("give only one of port and port_name")
    kubeconfig = node.get("kubeconfig", None).optional_string()
    return KubernetesDiscoveryConfig(
        namespace=node.get("namespace").string(), service=service,
        selector=MappingProxyType(selector), port=port, port_name=port_name,
        kubeconfig=str(_resolve_path(kubeconfig, base_dir)) if kubeconfig else None,
        context=node.get("context", None).optional_string(), resync=_num(node, "resync", 300.0))


def _discovery(node: Node, env: Mapping[str, str], base_dir: Path | None) -> DiscoveryConfig | None:
    if node.value is None:
        return None
    node.mapping(_DISCOVERY_KEYS)
    if not node.has("dns") and not node.has("kubernetes"):
        node.fail("expected dns: or kubernetes: (where the replicas are listed)")
    dns = _dns_discovery(node.get("dns")) if node.has("dns") else None
    kubernetes = _kubernetes_discovery(node.get("kubernetes"), base_dir) if node.has("kubernetes") else None
    template = node.get("backend", {})
    template.mapping(_TEMPLATE_KEYS)
    kv_port = kv_replay = None
    kv_topic = None
    if template.has("kv_events"):
        kv = template.get("kv_events").mapping(_TEMPLATE_KV_KEYS)
        kv_port = _int(kv, "port", None, minimum=1, maximum=65535)
        kv_replay = _int(kv, "replay_port", None, minimum=1, maximum=65535) if kv.has("replay_port") else None
        kv_topic = kv.get("topic", "").string(non_empty=False)
    backend = BackendConfig(
        url="", tensor_parallel_size=_int(template, "tensor_parallel_size", 1, minimum=1, maximum=1024),
        weight=_num(template, "weight", 1.0), labels=MappingProxyType(template.get("labels", {}).string_map()),
        api_key=_secret(template, "api_key", env, base_dir), role=template.get("role", "both").choice(ROLES),
        kv_events_topic=kv_topic)
    return DiscoveryConfig(dns=dns, kubernetes=kubernetes,
                           scheme=node.get("scheme", "http").choice(("http", "https")),
                           max_replicas=_int(node, "max_replicas", 1024, minimum=1, maximum=65536),
                           template=backend, kv_events_port=kv_port, kv_replay_port=kv_replay)


def _lora(node: Node, names: dict[str, str]) -> LoraConfig:
    if node.value is None:
        return LoraConfig()
    node.mapping(_LORA_KEYS)
    adapters_node = node.get("adapters", {})
    adapters = adapters_node.string_map()
    for name in adapters:
        where = f"{adapters_node.path}.{name}"
        if name in names:
            adapters_node.get(name).fail(f"adapter name '{name}' is already used at {names[name]}")
        names[name] = where
    dynamic = node.get("dynamic_loading", False).boolean()
    if dynamic and not adapters:
        node.get("dynamic_loading").fail("dynamic loading needs the adapters' paths: set "
                                         f"{adapters_node.path} (name: path on the replicas)")
    return LoraConfig(adapters=MappingProxyType(adapters), dynamic_loading=dynamic,
                      load_timeout=_num(node, "load_timeout", 30.0),
                      max_loads_in_flight=_int(node, "max_loads_in_flight", 4, minimum=1, maximum=1024))


def _disaggregation(node: Node) -> DisaggregationConfig:
    if node.value is None:
        return DisaggregationConfig()
    node.mapping(_DISAGG_KEYS)
    return DisaggregationConfig(
        min_prompt_tokens=_int(node, "min_prompt_tokens", 256, minimum=0),
        skip_cached_fraction=node.get("skip_cached_fraction", 0.8).number(minimum=0.0, maximum=1.0),
        transfer_timeout=_num(node, "transfer_timeout", 60.0))


def _models(node: Node, env: Mapping[str, str],
            base_dir: Path | None = None) -> tuple[ModelConfig, ...]:
    models: list[ModelConfig] = []
    names: dict[str, str] = {}  # name or alias -> key path where it was defined
    urls: dict[str, str] = {}
    for item in node.items():
        item.mapping(_MODEL_KEYS)
        name_node = item.get("name")
        name = name_node.string()
        if name in names:
            name_node.fail(f"model name '{name}' is already used at {names[name]}")
        names[name] = name_node.path
        aliases: list[str] = []
        for alias_node in item.get("aliases", []).items():
            alias = alias_node.string()
            if alias in names:
                alias_node.fail(f"alias '{alias}' is already used at {names[alias]}")
            names[alias] = alias_node.path
            aliases.append(alias)
        backends: list[BackendConfig] = []
        for backend_node in item.get("backends", []).items():
            backend = _backend(backend_node, env, base_dir)
            if backend.url in urls:
                backend_node.fail(f"backend URL {backend.url} is already used at {urls[backend.url]}")
            urls[backend.url] = backend_node.path
            backends.append(backend)
        tokenizer = _tokenizer_path(item.get("tokenizer"), base_dir) if item.has("tokenizer") else None
        lora = _lora(item.get("lora", None), names)
        disaggregation = _disaggregation(item.get("disaggregation", None))
        discovery = _discovery(item.get("discovery", None), env, base_dir)
        roles = {b.role for b in backends} | ({discovery.template.role} if discovery else set())
        if ("prefill" in roles) != ("decode" in roles):
            have, lack = ("prefill", "decode") if "prefill" in roles else ("decode", "prefill")
            item.get("backends").fail(f"model '{name}' has {have} backends but no {lack} backend: "
                                      "disaggregated serving needs both pools (role: prefill and "
                                      "role: decode; 'both' serves whole requests)")
        models.append(ModelConfig(name=name, aliases=tuple(aliases), backends=tuple(backends),
                                  tokenizer=tokenizer, lora=lora, disaggregation=disaggregation,
                                  discovery=discovery))
    return tuple(models)


def _routing(node: Node, env: Mapping[str, str], base_dir: Path | None) -> RoutingConfig:
    node.mapping(_ROUTING_KEYS)
    params = node.get("params", {})
    if not isinstance(params.value, Mapping):
        params.fail(f"expected a mapping of policy parameters, found {describe(params.value)}")
    terms = node.get("terms", None)
    if terms.value is not None and not isinstance(terms.value, Mapping):
        terms.fail(f"expected a mapping of cost term names to weights, found {describe(terms.value)}")
    return RoutingConfig(
        policy=node.get("policy", DEFAULT_PRESET).choice(PRESET_NAMES),
        params=MappingProxyType(dict(params.value)),
        terms=None if terms.value is None else MappingProxyType(dict(terms.value)),
        session_header=_header_name(node.get("session_header", "X-Session-Id")),
        response_id_secret=_secret(node, "response_id_secret", env, base_dir, min_length=16),
        file=str(node.file) if node.file is not None else None,
    )


def _tokenizer_path(node: Node, base_dir: Path | None) -> str:
    """A model's `tokenizer:`: a tokenizer.json, or a directory holding one (relative paths
    from the config file's directory), or ``replica`` (ask the replica's /tokenize)."""
    if node.string() == REPLICA_TOKENIZER:
        return REPLICA_TOKENIZER
    raw = Path(node.string())
    path = raw if raw.is_absolute() or base_dir is None else base_dir / raw
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        node.fail(f"expected a tokenizer.json, a directory holding one, or '{REPLICA_TOKENIZER}'; "
                  f"{file} does not exist")
    return str(path)


def _prefix(node: Node) -> PrefixConfig:
    node.mapping(_PREFIX_KEYS)
    cap = node.get("capacity_blocks", None)
    exact = node.get("exact", {}).mapping(_EXACT_KEYS)
    exact_cap = exact.get("capacity_blocks", None)
    d = ExactConfig()
    return PrefixConfig(
        block_chars=_int(node, "block_chars", 64, minimum=1, maximum=1 << 20),
        block_tokens=_int(node, "block_tokens", 16, minimum=1, maximum=1 << 16),
        capacity_blocks=None if cap.value is None else cap.integer(minimum=1),
        max_blocks_per_request=_int(node, "max_blocks_per_request", 8192, minimum=1),
        exact=ExactConfig(
            capacity_blocks=None if exact_cap.value is None else exact_cap.integer(minimum=1),
            relearn_s=_num(exact, "relearn_s", d.relearn_s, exclusive=False),
            confirm_s=_num(exact, "confirm_s", d.confirm_s, exclusive=False),
            replay_timeout=_num(exact, "replay_timeout", d.replay_timeout),
        ),
    )


def _health(node: Node) -> HealthConfig:
    node.mapping(_HEALTH_KEYS)
    d = HealthConfig()
    return HealthConfig(
        interval=_num(node, "interval", d.interval),
        timeout=_num(node, "timeout", d.timeout),
        failure_threshold=_int(node, "failure_threshold", d.failure_threshold, minimum=1),
        success_threshold=_int(node, "success_threshold", d.success_threshold, minimum=1),
        handover_timeout=_num(node, "handover_timeout", d.handover_timeout, exclusive=False),
    )


def _metrics(node: Node) -> MetricsConfig:
    node.mapping(_METRICS_KEYS)
    d = MetricsConfig()
    return MetricsConfig(
        scrape_interval=_num(node, "scrape_interval", d.scrape_interval),
        timeout=_num(node, "timeout", d.timeout),
        models_interval=_num(node, "models_interval", d.models_interval),
    )


def _proxy(node: Node) -> ProxyConfig:
    node.mapping(_PROXY_KEYS)
    d = ProxyConfig()
    initial = _num(node, "backoff_initial", d.backoff_initial, exclusive=False)
    maximum_node = node.get("backoff_max", d.backoff_max)
    maximum = maximum_node.number(minimum=0.0)
    if maximum < initial:
        maximum_node.fail(f"expected a value >= backoff_initial ({initial:g}), found {maximum:g}")
    return ProxyConfig(
        connect_timeout=_num(node, "connect_timeout", d.connect_timeout),
        first_byte_timeout=_num(node, "first_byte_timeout", d.first_byte_timeout),
        read_timeout=_num(node, "read_timeout", d.read_timeout),
        unhealthy_grace=_num(node, "unhealthy_grace", d.unhealthy_grace),
        max_attempts=_int(node, "max_attempts", d.max_attempts, minimum=1, maximum=100),
        backoff_initial=initial,
        backoff_max=maximum,
        deadline=_num(node, "deadline", d.deadline),
        retry_after=_int(node, "retry_after", d.retry_after, minimum=0),
        max_connections=_int(node, "max_connections", d.max_connections, minimum=0),
        pool_timeout=_num(node, "pool_timeout", d.pool_timeout, exclusive=False),
        retry_budget_ratio=_num(node, "retry_budget_ratio", d.retry_budget_ratio, exclusive=False),
        retry_budget_min_per_s=_num(node, "retry_budget_min_per_s", d.retry_budget_min_per_s,
                                    exclusive=False),
        buffer_bytes=_int(node, "buffer_bytes", d.buffer_bytes, minimum=0),
        hedge=_hedge(node.get("hedge", {})),
    )


def _launch(node: Node, base_dir: Path | None) -> LaunchConfig:
    if isinstance(node.value, str):  # shorthand: `launch: engines.yaml`
        node = Node({"config": node.value}, node.path, node.file)
    node.mapping(_LAUNCH_KEYS)
    config_path: str | None = None
    inline: Mapping[str, Any] | None = None
    if node.has("config") and node.has("models"):
        node.get("models").fail("give either launch.config (a file) or launch.models (inline), not both")
    if node.has("config"):
        cfg_node = node.get("config")
        path = Path(cfg_node.string())
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            cfg_node.fail(f"expected an existing engines.yaml file, found no file at {path}")
        config_path = str(path)
    elif node.has("models"):
        models = node.get("models")
        models.items()  # a list; the engines registry validates the entries
        inline = MappingProxyType({"models": models.value})
    else:
        node.fail("expected `config: FILE` (an engines.yaml) or inline `models: [...]`")
    return LaunchConfig(
        config=config_path,
        inline=inline,
        only=tuple(node.get("only", []).string_list()),
        ready_timeout=_num(node, "ready_timeout", 300.0),
        file=str(node.file) if node.file is not None else None,
    )


def parse_config(data: Any, file: str | Path | None = None, *,
                 env: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed routes.yaml document into a Config (ConfigError on any problem)."""
    env = os.environ if env is None else env
    root = Node(data, "", file)
    root.mapping(_TOP_KEYS)
    base_dir = Path(file).resolve().parent if file is not None else None
    launch = _launch(root.get("launch"), base_dir) if root.has("launch") else None
    models = _models(root.get("models", []), env, base_dir)
    if not models and launch is None:
        root.get("models", None).fail(
            "expected at least one model with backends (or a `launch:` block that starts them)")
    for i, model in enumerate(models):
        if not model.backends and launch is None and model.discovery is None:
            Node(None, f"models[{i}].backends", file).fail(
                f"model '{model.name}' needs at least one backend (or a `discovery:` section, "
                "or a `launch:` block)")
    auth = _auth(root.get("auth", {}), env, base_dir)
    return Config(
        server=_server(root.get("server", {})),
        auth=auth,
        cors=_cors(root.get("cors", {})),
        admission=_admission(root.get("admission", {})),
        models=models,
        routing=_routing(root.get("routing", {}), env, base_dir),
        prefix=_prefix(root.get("prefix", {})),
        health=_health(root.get("health", {})),
        metrics=_metrics(root.get("metrics", {})),
        proxy=_proxy(root.get("proxy", {})),
        circuit_breaker=_circuit_breaker(root.get("circuit_breaker", {})),
        launch=launch,
        file=str(file) if file is not None else None,
    )


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate routes.yaml; ConfigError names file, key path, found and expected."""
    root = load_yaml(path)
    return parse_config(root.value, root.file, env=env)


def validate_policy_params(config: Config) -> None:
    """Build the profile once so bad `routing.params` / `routing.terms` are config errors,
    not a crash later."""
    config.routing.build_profile()


__all__ = [
    "AdmissionConfig", "AuthConfig", "BackendConfig", "CircuitBreakerConfig", "ClientKeyConfig",
    "Config", "ConfigError", "CorsConfig", "HealthConfig", "LaunchConfig", "MetricsConfig",
    "ModelConfig", "PrefixConfig", "ProxyConfig", "RateLimitConfig", "RoutingConfig",
    "ServerConfig",
    "load_config", "parse_config", "validate_policy_params", "DEFAULT_CONFIG_PATH",
]
