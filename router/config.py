"""routes.yaml: the router's configuration, validated into frozen dataclasses.

    server:   {host, port, max_body_bytes, drain_timeout, request_id_header, access_log,
               log_format, log_level, sentry_dsn}
    models:   - {name, aliases: [..], backends: [{url, tensor_parallel_size, weight,
                 labels, api_key | api_key_env}]}
    routing:  {policy, params: {...}, session_header}
    prefix:   {block_chars, block_tokens, capacity_blocks}
    health:   {interval, timeout, failure_threshold, success_threshold}
    metrics:  {scrape_interval, timeout, models_interval}
    proxy:    {connect_timeout, read_timeout, max_attempts, backoff_initial, backoff_max,
               deadline, retry_after, max_connections}
    launch:   {config: engines.yaml, only: [..], ...}   (optional: local engines to start)

Every error names the file, the key path (``models[0].backends[1].url``), what was found
and what was expected; unknown keys get a "did you mean" hint (router.validation).  The
whole file is read with ``yaml.safe_load``; nothing in it is executed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import urlsplit

from router.policies import DEFAULT_POLICY, POLICY_NAMES
from router.validation import ConfigError, Node, describe, load_yaml

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
    sentry_dsn: str | None = None  # SENTRY_DSN in the environment also enables Sentry


@dataclass(frozen=True, slots=True)
class BackendConfig:
    url: str  # normalized: scheme://host:port[/path] without trailing slash
    tensor_parallel_size: int = 1
    weight: float = 1.0
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    api_key: str | None = None
    kv_events_endpoint: str | None = None  # tcp://host:port of the replica's KV-event publisher
    kv_replay_endpoint: str | None = None
    kv_events_topic: str | None = None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    aliases: tuple[str, ...] = ()
    backends: tuple[BackendConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    policy: str = DEFAULT_POLICY
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    session_header: str = "X-Session-Id"  # session key header (else the body's `user`)
    file: str | None = None  # for params_node() error messages

    def params_node(self) -> Node:
        """The policy's parameters as a Node, so `build()` can report key paths."""
        return Node(dict(self.params), "routing.params", self.file)


@dataclass(frozen=True, slots=True)
class PrefixConfig:
    block_chars: int = 64  # bytes of routing text per hashed block
    block_tokens: int = 16  # token ids per hashed block when the client sent tokens
    capacity_blocks: int | None = None  # global prefix-index bound (None: the index's default)


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval: float = 1.0
    timeout: float = 2.0
    failure_threshold: int = 3  # consecutive failed probes: SUSPECT -> UNHEALTHY
    success_threshold: int = 2  # consecutive passed probes: UNHEALTHY -> HEALTHY


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    scrape_interval: float = 1.0  # replica /metrics polling
    timeout: float = 2.0
    models_interval: float = 10.0  # replica /v1/models discovery


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    connect_timeout: float = 2.0
    read_timeout: float = 600.0  # max silence between upstream bytes
    max_attempts: int = 3  # upstream attempts per request, first one included
    backoff_initial: float = 0.02  # seconds; full-jitter exponential backoff between attempts
    backoff_max: float = 0.5
    deadline: float = 30.0  # no new attempt starts this long after the request arrived
    retry_after: int = 1  # Retry-After seconds on 503
    max_connections: int = 0  # upstream connection pool size (0: unlimited)


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
    models: tuple[ModelConfig, ...] = ()
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    launch: LaunchConfig | None = None
    file: str | None = None

    def model(self, name: str) -> ModelConfig | None:
        for model in self.models:
            if model.name == name:
                return model
        return None

    def aliases(self) -> dict[str, str]:
        """alias -> canonical model name."""
        return {alias: m.name for m in self.models for alias in m.aliases}


# --------------------------------------------------------------------------- parsing
_TOP_KEYS = ("server", "models", "routing", "prefix", "health", "metrics", "proxy", "launch")
_SERVER_KEYS = ("host", "port", "max_body_bytes", "drain_timeout", "request_id_header",
                "access_log", "log_format", "log_level", "sentry_dsn")
_MODEL_KEYS = ("name", "aliases", "backends")
_BACKEND_KEYS = ("url", "tensor_parallel_size", "weight", "labels", "api_key", "api_key_env",
                 "kv_events")
_KV_EVENTS_KEYS = ("endpoint", "replay_endpoint", "topic")
_ROUTING_KEYS = ("policy", "params", "session_header")
_PREFIX_KEYS = ("block_chars", "block_tokens", "capacity_blocks")
_HEALTH_KEYS = ("interval", "timeout", "failure_threshold", "success_threshold")
_METRICS_KEYS = ("scrape_interval", "timeout", "models_interval")
_PROXY_KEYS = ("connect_timeout", "read_timeout", "max_attempts", "backoff_initial",
               "backoff_max", "deadline", "retry_after", "max_connections")
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
    if parts.query or parts.fragment:
        node.fail(f"expected a base URL without query or fragment, found {describe(value)}")
    return value.rstrip("/")


def _zmq_endpoint(node: Node) -> str:
    value = node.string()
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        node.fail(f"expected a ZMQ endpoint like tcp://127.0.0.1:5557, found {describe(value)}")
    return value


def _server(node: Node) -> ServerConfig:
    node.mapping(_SERVER_KEYS)
    d = ServerConfig()
    dsn = node.get("sentry_dsn", None)
    return ServerConfig(
        host=node.get("host", d.host).string(),
        port=_int(node, "port", d.port, minimum=0, maximum=65535),
        max_body_bytes=_int(node, "max_body_bytes", d.max_body_bytes, minimum=1024),
        drain_timeout=_num(node, "drain_timeout", d.drain_timeout, exclusive=False),
        request_id_header=_header_name(node.get("request_id_header", d.request_id_header)),
        access_log=node.get("access_log", d.access_log).boolean(),
        log_format=node.get("log_format", d.log_format).choice(LOG_FORMATS),
        log_level=node.get("log_level", d.log_level).choice(LOG_LEVELS),
        sentry_dsn=dsn.optional_string(),
    )


def _backend(node: Node, env: Mapping[str, str]) -> BackendConfig:
    if isinstance(node.value, str):  # shorthand: just the URL
        return BackendConfig(url=_url(node))
    node.mapping(_BACKEND_KEYS)
    api_key = node.get("api_key", None).optional_string()
    if node.has("api_key_env"):
        key_node = node.get("api_key_env")
        var = key_node.string()
        if api_key is not None:
            key_node.fail("give either api_key or api_key_env, not both")
        if var not in env:
            key_node.fail(f"environment variable '{var}' is not set")
        api_key = env[var]
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
    )


def _models(node: Node, env: Mapping[str, str]) -> tuple[ModelConfig, ...]:
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
            backend = _backend(backend_node, env)
            if backend.url in urls:
                backend_node.fail(f"backend URL {backend.url} is already used at {urls[backend.url]}")
            urls[backend.url] = backend_node.path
            backends.append(backend)
        models.append(ModelConfig(name=name, aliases=tuple(aliases), backends=tuple(backends)))
    return tuple(models)


def _routing(node: Node) -> RoutingConfig:
    node.mapping(_ROUTING_KEYS)
    params = node.get("params", {})
    if not isinstance(params.value, Mapping):
        params.fail(f"expected a mapping of policy parameters, found {describe(params.value)}")
    return RoutingConfig(
        policy=node.get("policy", DEFAULT_POLICY).choice(POLICY_NAMES),
        params=MappingProxyType(dict(params.value)),
        session_header=_header_name(node.get("session_header", "X-Session-Id")),
        file=str(node.file) if node.file is not None else None,
    )


def _prefix(node: Node) -> PrefixConfig:
    node.mapping(_PREFIX_KEYS)
    cap = node.get("capacity_blocks", None)
    return PrefixConfig(
        block_chars=_int(node, "block_chars", 64, minimum=1, maximum=1 << 20),
        block_tokens=_int(node, "block_tokens", 16, minimum=1, maximum=1 << 16),
        capacity_blocks=None if cap.value is None else cap.integer(minimum=1),
    )


def _health(node: Node) -> HealthConfig:
    node.mapping(_HEALTH_KEYS)
    d = HealthConfig()
    return HealthConfig(
        interval=_num(node, "interval", d.interval),
        timeout=_num(node, "timeout", d.timeout),
        failure_threshold=_int(node, "failure_threshold", d.failure_threshold, minimum=1),
        success_threshold=_int(node, "success_threshold", d.success_threshold, minimum=1),
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
        read_timeout=_num(node, "read_timeout", d.read_timeout),
        max_attempts=_int(node, "max_attempts", d.max_attempts, minimum=1, maximum=100),
        backoff_initial=initial,
        backoff_max=maximum,
        deadline=_num(node, "deadline", d.deadline),
        retry_after=_int(node, "retry_after", d.retry_after, minimum=0),
        max_connections=_int(node, "max_connections", d.max_connections, minimum=0),
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
    models = _models(root.get("models", []), env)
    if not models and launch is None:
        root.get("models", None).fail(
            "expected at least one model with backends (or a `launch:` block that starts them)")
    for i, model in enumerate(models):
        if not model.backends and launch is None:
            Node(None, f"models[{i}].backends", file).fail(
                f"model '{model.name}' needs at least one backend (or a `launch:` block)")
    return Config(
        server=_server(root.get("server", {})),
        models=models,
        routing=_routing(root.get("routing", {})),
        prefix=_prefix(root.get("prefix", {})),
        health=_health(root.get("health", {})),
        metrics=_metrics(root.get("metrics", {})),
        proxy=_proxy(root.get("proxy", {})),
        launch=launch,
        file=str(file) if file is not None else None,
    )


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate routes.yaml; ConfigError names file, key path, found and expected."""
    root = load_yaml(path)
    return parse_config(root.value, root.file, env=env)


def validate_policy_params(config: Config) -> None:
    """Build the policy once so a bad `routing.params` is a config error, not a crash later."""
    from router.policies import build_policy

    try:
        build_policy(config.routing.policy, config.routing.params_node())
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        raise ConfigError(config.file, "routing.policy",
                          f"policy '{config.routing.policy}' is not available ({exc})") from None


__all__ = [
    "BackendConfig", "Config", "ConfigError", "HealthConfig", "LaunchConfig", "MetricsConfig",
    "ModelConfig", "PrefixConfig", "ProxyConfig", "RoutingConfig", "ServerConfig",
    "load_config", "parse_config", "validate_policy_params", "DEFAULT_CONFIG_PATH",
]
