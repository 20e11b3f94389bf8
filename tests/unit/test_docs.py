"""The documentation: the docs/ site builds with `mkdocs build --strict` (a broken link, a
broken anchor or a page left out of the navigation fails), the configuration reference is
what the code generates, and the README's links lead somewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from router.config.reference import render

ROOT = Path(__file__).resolve().parents[2]


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "configuration" / "index.html").exists()


def test_the_configuration_reference_is_not_stale() -> None:
    """Regenerate with: python -m router.config.reference > docs/configuration.md"""
    assert (ROOT / "docs" / "configuration.md").read_text() == render()


def test_the_reference_lists_every_key_the_parsers_accept_with_a_description() -> None:
    page = render()
    for key in ("max_inflight_body_bytes", "admin_key_file", "api_key_file", "role", "kv_events", "relearn_s"):
        assert f"| `{key}` |" in page, key
    undocumented = [line for line in page.splitlines() if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not undocumented, undocumented


def test_the_readme_is_short_and_its_links_lead_somewhere() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    assert readme.index("make run") < readme.index("make test") < 1200  # the two commands come first
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target
