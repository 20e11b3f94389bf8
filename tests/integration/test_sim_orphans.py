"""A simulator started by SimProcess dies with its parent, even a parent killed by SIGKILL.

Without this, a test run cut short by a timeout leaves simulators behind that hold ports and
CPU for the rest of the suite (seen here: 120 orphans after a few interrupted runs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]

PARENT = """
import asyncio, sys
from engines.sim.process import SimProcess

async def main():
    async with SimProcess(model="orphan-check", time_scale=50) as sim:
        print(sim.pid, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_simulator_dies_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        child = psutil.Process(child_pid)
        assert child.is_running()
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        gone, alive = psutil.wait_procs([child], timeout=10)
        assert child in gone and not alive
    finally:
        if parent.poll() is None:
            parent.kill()
