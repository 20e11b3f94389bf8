"""Every process the harness starts is stopped by its own PID, children included."""

import sys
import textwrap
import time

import psutil

from benchmarks.procs import Processes, ResourceSampler

# A parent that ignores SIGTERM and has a child: stop() must still end both.
STUBBORN = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(child.pid, flush=True)
    time.sleep(60)
""")


def test_stop_ends_process_and_descendants(tmp_path):
    procs = Processes()
    proc = procs.start("stubborn", [sys.executable, "-c", STUBBORN], log_path=tmp_path / "log")
    deadline = time.time() + 10
    while time.time() < deadline and not (tmp_path / "log").read_text().strip():
        time.sleep(0.05)
    child_pid = int((tmp_path / "log").read_text().split()[0])
    assert psutil.pid_exists(child_pid)
    started = time.time()
    procs.stop(proc, timeout_s=1)
    assert time.time() - started < 10
    assert not proc.alive()
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
    assert procs.running == []


def test_context_manager_stops_all():
    with Processes() as procs:
        a = procs.start("a", [sys.executable, "-c", "import time; time.sleep(60)"])
        b = procs.start("b", [sys.executable, "-c", "import time; time.sleep(60)"])
        assert len(procs.running) == 2
    assert not a.alive() and not b.alive()


def test_resource_sampler_reads_cpu_and_rss():
    with Processes() as procs:
        p = procs.start("busy", [sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<0.6: pass"])
        sampler = ResourceSampler(p.pid)
        sampler.start()
        time.sleep(0.5)
        out = sampler.stop()
    assert out["cpu_s"] > 0.1 and out["peak_rss_mb"] > 1
