"""``proxy:``: the transport's timeouts, retries, retry budget, upstream pool and hedging.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from router.config.values import integer, number
from yamlcheck import Node

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
    connect_timeout: float = 2.0  # seconds to connect to a replica before failing over
    first_byte_timeout: float = 60.0  # a stream's wait for its first byte (its TTFT)
    read_timeout: float = 600.0  # max silence between upstream bytes (and a non-stream answer's wait)
    unhealthy_grace: float = 2.0  # max silence while the replica is unhealthy
    max_attempts: int = 3  # upstream attempts per request, first one included
    backoff_initial: float = 0.02  # seconds; full-jitter exponential backoff between attempts
    backoff_max: float = 0.5  # most seconds between attempts
    deadline: float = 30.0  # no new attempt starts this long after the request arrived
    retry_after: int = 1  # Retry-After seconds on 503
    max_connections: int = 0  # upstream connection pool size (0: unlimited)
    pool_timeout: float = 5.0  # most seconds a request waits for a pool slot (capped by `deadline`; 0: none)
    retry_budget_ratio: float = 0.2  # retries may add at most this share of the requests ...
    retry_budget_min_per_s: float = 5.0  # ... plus this many per second
    buffer_bytes: int = 1024 * 1024  # non-stream answers up to this size are buffered whole
    # a second attempt on another replica when the first is slow to answer
    hedge: HedgeConfig = field(default_factory=HedgeConfig)


_PROXY_KEYS = ("connect_timeout", "first_byte_timeout", "read_timeout", "unhealthy_grace",
               "max_attempts", "backoff_initial", "backoff_max", "deadline", "retry_after",
               "max_connections", "pool_timeout", "retry_budget_ratio", "retry_budget_min_per_s",
               "buffer_bytes", "hedge")


_HEDGE_KEYS = ("enabled", "min_delay", "multiplier", "max_delay", "paths")


def _hedge(node: Node) -> HedgeConfig:
    node.mapping(_HEDGE_KEYS)
    d = HedgeConfig()
    shortest = number(node, "min_delay", d.min_delay, exclusive=False)
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
        multiplier=number(node, "multiplier", d.multiplier, minimum=1.0, exclusive=False),
        max_delay=longest,
        paths=tuple(dict.fromkeys(paths)),
    )


def parse_proxy(node: Node) -> ProxyConfig:
    node.mapping(_PROXY_KEYS)
    d = ProxyConfig()
    initial = number(node, "backoff_initial", d.backoff_initial, exclusive=False)
    maximum_node = node.get("backoff_max", d.backoff_max)
    maximum = maximum_node.number(minimum=0.0)
    if maximum < initial:
        maximum_node.fail(f"expected a value >= backoff_initial ({initial:g}), found {maximum:g}")
    return ProxyConfig(
        connect_timeout=number(node, "connect_timeout", d.connect_timeout),
        first_byte_timeout=number(node, "first_byte_timeout", d.first_byte_timeout),
        read_timeout=number(node, "read_timeout", d.read_timeout),
        unhealthy_grace=number(node, "unhealthy_grace", d.unhealthy_grace),
        max_attempts=integer(node, "max_attempts", d.max_attempts, minimum=1, maximum=100),
        backoff_initial=initial,
        backoff_max=maximum,
        deadline=number(node, "deadline", d.deadline),
        retry_after=integer(node, "retry_after", d.retry_after, minimum=0),
        max_connections=integer(node, "max_connections", d.max_connections, minimum=0),
        pool_timeout=number(node, "pool_timeout", d.pool_timeout, exclusive=False),
        retry_budget_ratio=number(node, "retry_budget_ratio", d.retry_budget_ratio, exclusive=False),
        retry_budget_min_per_s=number(node, "retry_budget_min_per_s", d.retry_budget_min_per_s,
                                    exclusive=False),
        buffer_bytes=integer(node, "buffer_bytes", d.buffer_bytes, minimum=0),
        hedge=_hedge(node.get("hedge", {})),
    )
