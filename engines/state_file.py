"""STATE_DIR/state.json: the replicas `up` started (name, URL, argv, PID, start time, log),
which `down` and `status` read back, possibly from another process.

Written whole to a temporary file and renamed, so a reader never sees half a file; records
whose process is no longer ours (processes.py) are dropped whenever it is rewritten.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from engines.processes import is_ours

STATE_FILE = "state.json"


def record_replicas(state_file: Path, records: list[dict[str, Any]]) -> None:
    """Add these replicas' records to the file (and drop those no longer ours)."""
    existing = read_state(state_file)
    kept = [r for r in existing.get("replicas", []) if is_ours(r)]
    state_file.parent.mkdir(parents=True, exist_ok=True)
    _write(state_file, {"written_at": time.time(), "cwd": str(Path.cwd()), "replicas": kept + records})


def rewrite_state(state_file: Path, drop_pids: set[int]) -> None:
    """Forget the records of these PIDs (and those no longer ours); no record left, no file."""
    state = read_state(state_file)
    keep = [r for r in state.get("replicas", []) if r.get("pid") not in drop_pids and is_ours(r)]
    if keep:
        state["replicas"] = keep
        _write(state_file, state)
    else:
        state_file.unlink(missing_ok=True)


def _write(state_file: Path, state: dict[str, Any]) -> None:
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(state_file)


def read_state(state_file: str | Path) -> dict:
    try:
        return json.loads(Path(state_file).read_text())
    except (OSError, ValueError):
        return {}
