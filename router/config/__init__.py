"""routes.yaml: the router's configuration, validated into frozen dataclasses.

One module per section (server.py, auth.py, ... launch.py) holds that section's dataclass and
its parser; loader.py reads the whole file.  This package's names are the public face:
``from router.config import Config, load_config``.

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

from router.config.admission import AdmissionConfig
from router.config.auth import AuthConfig, ClientKeyConfig, RateLimitConfig
from router.config.backends import ROLES, BackendConfig, parse_backend
from router.config.breaker import CircuitBreakerConfig
from router.config.cors import CorsConfig
from router.config.discovery import DiscoveryConfig, DnsDiscoveryConfig, KubernetesDiscoveryConfig
from router.config.health import HealthConfig, MetricsConfig
from router.config.launch import LaunchConfig
from router.config.loader import DEFAULT_CONFIG_PATH, Config, load_config, parse_config
from router.config.models import REPLICA_TOKENIZER, DisaggregationConfig, LoraConfig, ModelConfig
from router.config.prefix import ExactConfig, PrefixConfig
from router.config.proxy import HedgeConfig, ProxyConfig
from router.config.routing import DEFAULT_PRESET, PRESET_NAMES, RoutingConfig
from router.config.server import ServerConfig
from yamlcheck import ConfigError

__all__ = [
    "AdmissionConfig",
    "AuthConfig",
    "BackendConfig",
    "CircuitBreakerConfig",
    "ClientKeyConfig",
    "Config",
    "ConfigError",
    "CorsConfig",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_PRESET",
    "DisaggregationConfig",
    "DiscoveryConfig",
    "DnsDiscoveryConfig",
    "ExactConfig",
    "HealthConfig",
    "HedgeConfig",
    "KubernetesDiscoveryConfig",
    "LaunchConfig",
    "LoraConfig",
    "MetricsConfig",
    "ModelConfig",
    "PRESET_NAMES",
    "PrefixConfig",
    "ProxyConfig",
    "REPLICA_TOKENIZER",
    "ROLES",
    "RateLimitConfig",
    "RoutingConfig",
    "ServerConfig",
    "load_config",
    "parse_backend",
    "parse_config",
]
