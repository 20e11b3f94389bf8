"""The processes a launcher started, found again by PID: is a recorded PID still the process we
started (same start time, same command line), and signalling a replica's whole process group.

A PID is recycled once its process is gone; checking the start time (/proc/PID/stat) and the
command line before any signal means `down` never signals a stranger.  Linux /proc only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def proc_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = proc_start_ticks(pid)
    if stat is None:
        return True
    try:  # a zombie is as good as gone
        state = Path(f"/proc/{pid}/stat").read_text()
        return state[state.rindex(")") + 2] != "Z"
    except OSError:
        return False


def is_ours(record: dict) -> bool:
    """Is the process in `record` (from the state file) still the one we started?"""
    pid = int(record["pid"])
    ticks = proc_start_ticks(pid)
    if ticks is None or not alive(pid):
        return False
    if record.get("start_ticks") is not None and ticks != record["start_ticks"]:
        return False
    cmdline = _proc_cmdline(pid)
    if cmdline is None:
        return False
    return cmdline_matches(cmdline, list(record.get("argv") or []))


def cmdline_matches(cmdline: Sequence[str], argv: Sequence[str]) -> bool:
    """Does a live /proc cmdline come from spawning `argv`?

    A script with a shebang (``.venv-vllm/bin/vllm``) shows as ``python SCRIPT args...`` and
    interpreter paths may be resolved differently, so: the arguments after argv[0] must be
    the tail of the cmdline, and argv[0]'s file name must appear before that tail.
    """
    if not argv or not cmdline:
        return False
    tail = list(argv[1:])
    if len(cmdline) < len(tail) + 1 or (tail and list(cmdline[-len(tail):]) != tail):
        return False
    head = cmdline[: len(cmdline) - len(tail)]
    exe = os.path.basename(argv[0])
    return any(os.path.basename(part) == exe or os.path.basename(part).startswith(exe)
               for part in head)


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # each replica leads its own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def group_alive(pgid: int) -> bool:
    """Does any live (non-zombie) process remain in process group `pgid`?"""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False
