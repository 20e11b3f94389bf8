"""The docker-compose stack's files exist where it mounts them (no Docker engine runs here)."""

from __future__ import annotations

from pathlib import Path

import yaml

from router.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_compose_mounts_and_build_context_exist() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    build = services["router"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
    load_config(ROOT / "deploy" / "routes.yaml")  # the router's mounted config is valid


def test_the_dockerfile_copies_every_package() -> None:
    copied = {line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ")}
    for package in ("router", "engines", "benchmarks", "yamlcheck", "config"):
        assert package in copied, f"the image lacks {package}/"
        assert (ROOT / package).is_dir()
