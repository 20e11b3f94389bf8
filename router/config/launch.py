"""``launch:``: local engines (simulated or real vLLM) the router starts itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from router.config.values import number
from yamlcheck import Node


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """Local engines to start before serving (engines.launcher); see docs/engines.md."""

    config: str | None = None  # path to an engines.yaml (relative to routes.yaml)
    inline: Mapping[str, Any] | None = None  # or an engines.yaml body inline (`models:`)
    only: tuple[str, ...] = ()  # start only these registry entries
    ready_timeout: float = 300.0  # seconds the launched engines may take to become healthy
    file: str | None = None  # the routes.yaml this came from


_LAUNCH_KEYS = ("config", "models", "only", "ready_timeout")


def parse_launch(node: Node, base_dir: Path | None) -> LaunchConfig:
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
        ready_timeout=number(node, "ready_timeout", 300.0),
        file=str(node.file) if node.file is not None else None,
    )
