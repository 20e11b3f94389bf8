"""`python -m engines up` brings up the default mixed-TP simulated fleet; `down` stops it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engines", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_up_status_down_with_the_default_registry(tmp_path):
    # The shipped file, with every port made `auto` so the test never collides with a fleet
    # somebody runs on this machine.
    doc = yaml.safe_load((ROOT / "config/engines.yaml").read_text())
    for model in doc["models"]:
        model["port"] = "auto"
        if isinstance(model.get("kv_events"), dict):
            model["kv_events"].update(port="auto", replay_port="auto")
    config = tmp_path / "engines.yaml"
    config.write_text(yaml.safe_dump(doc))
    state = tmp_path / "state"

    dry = run("up", "--config", str(config), "--state-dir", str(state), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("-m engines.sim") == 4
    assert not state.exists()

    up = run("up", "--config", str(config), "--state-dir", str(state))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        records = json.loads((state / "state.json").read_text())["replicas"]
        assert sorted(r["tensor_parallel_size"] for r in records) == [1, 1, 2, 4]
        for r in records:
            with urllib.request.urlopen(r["url"] + "/v1/models", timeout=5) as resp:
                assert json.load(resp)["data"][0]["id"] == "sim-llama"
            assert (state / "logs" / f"{r['name']}.log").exists()
        status = run("status", "--config", str(config), "--state-dir", str(state))
        assert status.stdout.count("healthy") == 4, status.stdout
    finally:
        down = run("down", "--config", str(config), "--state-dir", str(state))
    assert down.returncode == 0 and "stopped 4 replica(s)" in down.stdout, down.stdout + down.stderr
    assert not (state / "state.json").exists()
    for r in records:
        assert not Path(f"/proc/{r['pid']}").exists() or \
            Path(f"/proc/{r['pid']}/stat").read_text().split(")")[-1].split()[0] == "Z"
    again = run("down", "--config", str(config), "--state-dir", str(state))
    assert again.returncode == 0 and "nothing to stop" in again.stdout
