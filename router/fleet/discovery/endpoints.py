"""`Endpoint`: one replica as a directory (DNS, Kubernetes) lists it, and `Publish`, how a
source hands its current list to the discovery that runs it (router/fleet/discovery/)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One replica as a directory lists it."""

    host: str  # an IP address (or a name the router can resolve)
    port: int
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


Publish = Callable[[list[Endpoint]], None]
