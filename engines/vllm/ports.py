"""The TCP ports replicas listen on: the fixed ones the file gives (`fixed_ports`, checked not
to clash by `check_fixed_ports`) and the 'auto' ones picked free at planning time
(`free_port`)."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from pathlib import Path

from engines.vllm.specs import LOCALHOST, EnginesConfig, ModelSpec
from yamlcheck import Node


def check_fixed_ports(config: EnginesConfig, models_node: Node) -> None:
    used: dict[int, str] = {}
    for index, spec in enumerate(config.models):
        for name, port in fixed_ports(spec):
            if port in used:
                models_node.items()[index].get("port", None).fail(
                    f"port {port} of {name} is also used by {used[port]}")
            used[port] = name


def fixed_ports(spec: ModelSpec) -> Iterable[tuple[str, int]]:
    for i, rep in enumerate(spec.replicas):
        name = f"{spec.name}-{i}"
        if isinstance(rep.port, int):
            yield name, rep.port
        elif isinstance(spec.port, int):
            yield name, spec.port + i
        if spec.kv_events is not None:
            if isinstance(spec.kv_events.port, int):
                yield f"{name} (kv events)", spec.kv_events.port + i
            if isinstance(spec.kv_events.replay_port, int):
                yield f"{name} (kv replay)", spec.kv_events.replay_port + i


AUTO_PORT_FLOOR = 20000


def _ephemeral_low() -> int:
    """Where the kernel starts handing out ports for bind(0) and outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOCALHOST, exclude: set[int] | None = None) -> int:
    """A TCP port nobody listens on right now (and not in `exclude`).

    Picked at random *below* the kernel's ephemeral range: a replica binds its ports many
    seconds after planning (vLLM opens its KV-event socket only once the engine is up), and a
    port from bind(0) could meanwhile be handed to any other process asking for a free port
    (vLLM itself does so for its internal sockets).  Falls back to bind(0) when that fails.
    """
    import random

    exclude = exclude or set()
    bind_host = host if host not in ("0.0.0.0", "") else LOCALHOST
    low = _ephemeral_low()
    rng = random.SystemRandom()
    if low - AUTO_PORT_FLOOR > 100:
        for _ in range(200):
            port = rng.randrange(AUTO_PORT_FLOOR, low)
            if port not in exclude and _bindable(bind_host, port):
                return port
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((bind_host, 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port
    raise RuntimeError("no free port found")
