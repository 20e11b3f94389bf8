"""``routing:``: the scheduling policy (a preset), its params and cost-term weights, the session
header, and the key of stored-response ids.  The core builds the profile from this section
(router/core/scheduling/presets.py: ``profile_of``); config only names the presets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from router.config.values import header_name, read_secret
from yamlcheck import Node, describe

# The policy names routes.yaml accepts: each is a preset of router/core/scheduling/presets.py,
# which builds its profile (and checks that it knows exactly these names).
PRESET_NAMES: tuple[str, ...] = (
    "cache_aware",
    "prefix_affinity",
    "session",
    "least_load",
    "round_robin",
    "power_of_two",
    "random",
)
DEFAULT_PRESET = "cache_aware"


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    policy: str = DEFAULT_PRESET  # a preset of router/core/scheduling/presets.py
    # the preset's parameters (load_factor, running_weight, ...: see Routing)
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


_ROUTING_KEYS = ("policy", "params", "terms", "session_header", "response_id_secret",
                 "response_id_secret_env", "response_id_secret_file")


def parse_routing(node: Node, env: Mapping[str, str], base_dir: Path | None) -> RoutingConfig:
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
        session_header=header_name(node.get("session_header", "X-Session-Id")),
        response_id_secret=read_secret(node, "response_id_secret", env, base_dir, min_length=16),
        file=str(node.file) if node.file is not None else None,
    )
