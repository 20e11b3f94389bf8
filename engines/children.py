"""Child processes that cannot outlive the process that started them.

Tests and benchmarks start simulators and routers as subprocesses.  If the parent is
killed (a test runner hit by a timeout, SIGKILL, an OOM kill) its `finally` blocks never
run, and without this the children keep running as orphans, holding ports and CPU.  On
Linux `PR_SET_PDEATHSIG` makes the kernel signal the child when its parent dies; SIGKILL
by default because an orphan whose event loop is wedged would ignore a polite SIGTERM.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess.Popen that ties the child's life to its parent's.

    Returns None where the mechanism does not exist (not Linux), so callers can pass the
    result straight to Popen.
    """
    if not sys.platform.startswith("linux"):
        return None

    def _set_parent_death_signal() -> None:  # runs in the child between fork and exec
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
        except OSError:
            pass

    return _set_parent_death_signal
