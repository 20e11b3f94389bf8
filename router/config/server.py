"""``server:``: the listening socket, connection and body limits, logging, trusted proxies and
the paths that may reach a replica.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from router.config.values import header_name, integer, network, number
from router.paths import DEFAULT_FORWARD_PATHS, forward_path_problem
from yamlcheck import Node, describe

LOG_FORMATS = ("json", "text")


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"  # address to listen on (0.0.0.0: every interface)
    port: int = 8000  # port to listen on (0: any free one)
    max_body_bytes: int = 32 * 1024 * 1024  # request bodies above this get 413
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests
    request_id_header: str = "X-Request-Id"  # the header a request id is read from and echoed in (one made when absent)
    access_log: bool = True  # one line per answered request
    log_format: str = "json"  # json | text
    log_level: str = "info"  # debug | info | warning | error | critical
    sentry_dsn: str | None = field(default=None, repr=False)  # or SENTRY_DSN in the environment
    backlog: int = 4096  # listen backlog (the kernel caps it at net.core.somaxconn)
    max_connections: int | None = None  # client connections at once (None: from the fd limit)
    header_timeout: float = 10.0  # seconds for a request's line and headers to arrive
    body_timeout: float = 60.0  # seconds for its body to arrive
    keepalive_timeout: float = 75.0  # an idle keep-alive connection is closed after this
    max_inflight_body_bytes: int = 256 * 1024 * 1024  # request bodies held at once, all together
    # proxies whose X-Forwarded-For / Forwarded name the client (CIDRs)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    forward_paths: tuple[str, ...] = DEFAULT_FORWARD_PATHS  # POST paths forwarded to replicas


_SERVER_KEYS = ("host", "port", "max_body_bytes", "drain_timeout", "request_id_header",
                "access_log", "log_format", "log_level", "sentry_dsn", "backlog",
                "max_connections", "header_timeout", "body_timeout", "keepalive_timeout",
                "max_inflight_body_bytes", "trusted_proxies", "forward_paths")


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


def parse_server(node: Node) -> ServerConfig:
    node.mapping(_SERVER_KEYS)
    d = ServerConfig()
    dsn = node.get("sentry_dsn", None)
    max_conn = node.get("max_connections", None)
    max_body = integer(node, "max_body_bytes", d.max_body_bytes, minimum=1024)
    budget_node = node.get("max_inflight_body_bytes", max(d.max_inflight_body_bytes, max_body))
    budget = budget_node.integer(minimum=1024)
    if budget < max_body:
        budget_node.fail(f"expected a value >= max_body_bytes ({max_body}), found {budget}")
    return ServerConfig(
        backlog=integer(node, "backlog", d.backlog, minimum=1, maximum=1 << 20),
        max_connections=None if max_conn.value is None else max_conn.integer(minimum=1),
        header_timeout=number(node, "header_timeout", d.header_timeout),
        body_timeout=number(node, "body_timeout", d.body_timeout),
        keepalive_timeout=number(node, "keepalive_timeout", d.keepalive_timeout),
        max_inflight_body_bytes=budget,
        trusted_proxies=tuple(network(n) for n in node.get("trusted_proxies", []).items()),
        forward_paths=(_forward_paths(node.get("forward_paths"))
                       if node.has("forward_paths") else d.forward_paths),
        host=node.get("host", d.host).string(),
        port=integer(node, "port", d.port, minimum=0, maximum=65535),
        max_body_bytes=max_body,
        drain_timeout=number(node, "drain_timeout", d.drain_timeout, exclusive=False),
        request_id_header=header_name(node.get("request_id_header", d.request_id_header)),
        access_log=node.get("access_log", d.access_log).boolean(),
        log_format=node.get("log_format", d.log_format).choice(LOG_FORMATS),
        log_level=node.get("log_level", d.log_level).choice(LOG_LEVELS),
        sentry_dsn=dsn.optional_string(),
    )
