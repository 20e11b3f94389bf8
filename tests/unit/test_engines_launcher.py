"""The launcher starts processes, waits for /health, records them, and stops exactly those."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from engines import launcher as L
from engines.launcher import Launcher, LaunchError, ReplicaPlan, cmdline_matches, is_ours
from engines.vllm.registry import free_port

# A stand-in replica: answers GET /health with 200 after DELAY seconds, and spawns a child
# (like vLLM's engine core) that must die with it.
FAKE = textwrap.dedent("""
    import http.server, subprocess, sys, time
    port, delay = int(sys.argv[1]), float(sys.argv[2])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print("CHILD-PID", child.pid, flush=True)
    time.sleep(delay)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


def fake_plan(name: str, *, delay: float = 0.2, crash: bool = False) -> ReplicaPlan:
    port = free_port()
    code = "import sys; print('boom'); sys.exit(3)" if crash else FAKE
    return ReplicaPlan(
        name=name, entry=name.rsplit("-", 1)[0], kind="sim", served_model_name="m",
        host="127.0.0.1", port=port, argv=(sys.executable, "-c", code, str(port), str(delay)),
        env={"FAKE_REPLICA": name}, tensor_parallel_size=1, pipeline_parallel_size=1, gpus=(),
        kv_events_endpoint=None, kv_replay_endpoint=None, kv_events_topic=None,
        health_timeout_s=20.0,
    )


def child_pid(log_path) -> int:
    for _ in range(100):
        for line in log_path.read_text().splitlines():
            if line.startswith("CHILD-PID "):
                return int(line.split()[1])
        time.sleep(0.05)
    raise AssertionError("no child line in log")


def alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_up_records_state_and_down_stops_process_groups(tmp_path):
    launcher = Launcher(tmp_path)
    fleet = launcher.up([fake_plan("f-0"), fake_plan("f-1", delay=0.8)], timeout=20)
    state = json.loads((tmp_path / "state.json").read_text())
    assert [r["name"] for r in state["replicas"]] == ["f-0", "f-1"]
    pids = [r["pid"] for r in state["replicas"]]
    children = [child_pid(rep.log_path) for rep in fleet.replicas]
    assert all(alive(p) for p in pids + children)
    assert all(is_ours(r) for r in state["replicas"])
    assert "FAKE_REPLICA" not in os.environ  # env goes to the child only
    assert (tmp_path / "logs" / "f-0.log").exists()
    with pytest.raises(LaunchError, match="already running"):
        launcher.up([fake_plan("f-0")])
    stopped = launcher.down()
    assert stopped == ["f-0", "f-1"]
    for rep in fleet.replicas:
        rep.process.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in children):
        time.sleep(0.05)
    assert not any(alive(p) for p in pids + children)
    assert not (tmp_path / "state.json").exists()


def test_down_leaves_a_recycled_pid_alone(tmp_path):
    """A PID in the state file that now belongs to another process is never signalled."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                start_new_session=True)
    try:
        record = {"name": "x-0", "entry": "x", "kind": "sim", "url": "http://127.0.0.1:1",
                  "pid": stranger.pid, "argv": [sys.executable, "-m", "engines.sim", "--port", "1"],
                  "start_ticks": L._proc_start_ticks(stranger.pid)}
        (tmp_path / "state.json").write_text(json.dumps({"replicas": [record]}))
        assert not is_ours(record)
        assert Launcher(tmp_path).down() == []
        assert stranger.poll() is None
        # Same cmdline but another start time: still not ours.
        record2 = {**record, "argv": stranger.args, "start_ticks": 1}
        assert not is_ours(record2)
        assert is_ours({**record2, "start_ticks": L._proc_start_ticks(stranger.pid)})
    finally:
        stranger.kill()
        stranger.wait()


def test_a_replica_that_exits_fails_up_with_its_log(tmp_path):
    launcher = Launcher(tmp_path)
    good = fake_plan("ok-0", delay=30)
    with pytest.raises(LaunchError, match=r"(?s)crash-0 exited \(code 3\).*boom"):
        launcher.up([good, fake_plan("crash-0", crash=True)], timeout=20)
    # The healthy-to-be sibling was stopped too, and nothing stays recorded.
    assert not (tmp_path / "state.json").exists()


def test_health_timeout_stops_everything(tmp_path):
    launcher = Launcher(tmp_path)
    with pytest.raises(LaunchError, match="not healthy"):
        launcher.up([fake_plan("slow-0", delay=30)], timeout=1.0)
    assert not (tmp_path / "state.json").exists()


async def test_async_wait_and_stop(tmp_path):
    fleet = Launcher(tmp_path).start([fake_plan("a-0")], write_state=False)
    await fleet.wait_healthy_async(timeout=20)
    pid = fleet.replicas[0].pid
    await fleet.stop_async()
    assert not alive(pid)


def test_cmdline_matching_handles_shebang_scripts():
    argv = [".venv-vllm/bin/vllm", "serve", "m", "--port", "1"]
    assert cmdline_matches(["/w/.venv-vllm/bin/python", ".venv-vllm/bin/vllm", "serve", "m",
                            "--port", "1"], argv)
    assert not cmdline_matches(["/w/.venv-vllm/bin/python", ".venv-vllm/bin/vllm", "serve", "m",
                                "--port", "2"], argv)
    assert not cmdline_matches(["python", "other.py", "serve", "m", "--port", "1"], argv)
    assert cmdline_matches(["/usr/bin/python3", "-m", "engines.sim"],
                           ["/usr/bin/python3", "-m", "engines.sim"])


def test_cli_dry_run_prints_commands(tmp_path, capsys):
    from engines.cli import main

    cfg = tmp_path / "e.yaml"
    cfg.write_text("models:\n  - {name: s, kind: sim, port: 9100, replicas: 2}\n")
    assert main(["up", "--config", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--port 9100" in out and "--port 9101" in out and "engines.sim" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - {name: s, kind: sym}\n")
    assert main(["up", "--config", str(bad), "--dry-run"]) == 2
    assert "models[0].kind" in capsys.readouterr().err


def test_stopping_one_fleet_keeps_the_other_fleets_records(tmp_path):
    """The router's `launch:` and a manual `engines up` may share .engines/state.json."""
    launcher = Launcher(tmp_path)
    first = launcher.up([fake_plan("one-0")], timeout=20)
    second = launcher.start([fake_plan("two-0")])
    second.wait_healthy(timeout=20)
    names = [r["name"] for r in json.loads((tmp_path / "state.json").read_text())["replicas"]]
    assert names == ["one-0", "two-0"]
    second.stop()
    names = [r["name"] for r in json.loads((tmp_path / "state.json").read_text())["replicas"]]
    assert names == ["one-0"]
    assert first.replicas[0].running()
    assert launcher.down() == ["one-0"]
    assert not (tmp_path / "state.json").exists()
