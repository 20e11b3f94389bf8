"""Routing policies: one file each, all behind the `Policy` protocol of base.py.

Each policy module exposes ``build(params: Node) -> Policy``, where ``params`` is the
validated ``routing.params`` mapping of routes.yaml (a ``yamlcheck.Node``, so a
bad parameter is reported with its key path).  ``build_policy`` finds the module by name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.policies.base import Policy
    from yamlcheck import Node

POLICY_NAMES: tuple[str, ...] = (
    "cache_aware",
    "prefix_affinity",
    "session",
    "least_load",
    "round_robin",
    "power_of_two",
    "random",
)
DEFAULT_POLICY = "cache_aware"


def build_policy(name: str, params: Node) -> Policy:
    """Instantiate the policy `name` (one of POLICY_NAMES) from its validated params node."""
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
    module = importlib.import_module(f"router.policies.{name}")
    policy: Policy = module.build(params)
    return policy
