"""Where the router's CPU goes per request: the overhead scenario's closed loop, profiled.

    python -m benchmarks.profile_router                      # CPU per request, no profiler
    python -m benchmarks.profile_router --profile out.prof   # ... under cProfile, top functions printed
    python -m benchmarks.profile_router --workers 2
    python -m benchmarks.profile_router --callgrind           # instructions per request (A/B)
    python -m benchmarks.profile_router --callgrind --callgrind-out cg.out   # ... keep the dump

One simulated replica answering in microseconds (time scale 10,000), the router on core 0,
the simulator and a closed loop of `--clients` streaming chat clients on core 1 (the
overhead scenario's setup: 64-token prompts, 8 output tokens, `stream_options.include_usage`).
CPU per request = the router's CPU seconds (psutil, its process tree) over the requests
answered in the measured window, after a warm-up.  cProfile roughly doubles the CPU time;
its figures rank functions, the no-profiler run gives the number.

CPU time per request moves by 5-10% from one run to the next on a shared 2-core machine,
more than most single changes save.  ``--callgrind`` counts instead the user-space
instructions the router executes per request (valgrind's callgrind; `apt install
valgrind`): `--requests` (1,000) requests from `--clients-callgrind` (16) closed-loop
clients after as many to warm up, the counters zeroed in between.  Three runs of one commit
spread by about 2%, so a change of a few percent shows in three runs of each side; it does
not see the kernel's share (about a fifth of the router's CPU here: the socket calls), nor
cache misses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from benchmarks.procs import ResourceSampler
from engines.sim.process import SimProcess, free_port

MODEL = "sim-model"
PROMPT = "Reply with a few words about routing. " * 7  # ~64 tokens


async def closed_loop(url: str, clients: int, *, seconds: float | None = None, requests: int | None = None,
                      statuses: dict[int, int] | None = None) -> int:
    """Streamed chat requests from `clients` closed-loop clients, each prompt new, for
    `seconds` or until `requests` were sent; returns the number answered 200 (`statuses`
    counts every status)."""
    done = 0
    statuses = {} if statuses is None else statuses
    stop = time.monotonic() + seconds if seconds is not None else float("inf")
    left = float(requests) if requests is not None else float("inf")  # requests not sent yet

    async def client(http: aiohttp.ClientSession, i: int) -> None:
        nonlocal done, left
        n = 0
        while time.monotonic() < stop and left > 0:
            left -= 1
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"{i} {n} {PROMPT}"}],
                    "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if resp.status == 200:
                    done += 1
            n += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(client(http, i) for i in range(clients)))
    return done


def callgrind_dump(out: Path, part: str) -> tuple[Path, int]:
    """The callgrind dump named `part` (callgrind writes one file per dump beside `out`)
    and its instruction total."""
    for path in sorted(out.parent.glob(out.name + "*")):
        text = path.read_text(errors="replace")
        head = text.partition("\nevents:")[0]
        if f"dump {part}" not in head:
            continue
        found = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if found:
            return path, int(found.group(1))
    raise RuntimeError(f"no callgrind dump {part!r} in {out.parent}")


async def wait_ready(url: str, tries: int) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(tries):
            try:
                async with http.get(url + "/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the router did not become ready")


async def main_async(args: argparse.Namespace) -> int:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.client_core})
    async with SimProcess(MODEL, time_scale=10000, args=["--num-gpu-blocks", "16384"]) as sim:
        port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            routes = Path(tmp) / "routes.yaml"
            routes.write_text(yaml.safe_dump({
                # as the benchmark harness runs it (benchmarks/targets.py): no access log, warnings only
                "server": {"host": "127.0.0.1", "port": port, "access_log": False, "log_level": "warning"},
                "models": [{"name": MODEL, "backends": [sim.url]}],
                "routing": {"policy": args.policy}}))
            cmd = [sys.executable]
            if args.callgrind:
                return await run_callgrind(args, routes, port, Path(tmp))
            if args.py_spy:  # sampling: little overhead, the real distribution (collapsed stacks)
                cmd = [str(Path(sys.executable).with_name("py-spy")), "record", "--rate", "250", "--format", "raw",
                       "--output", args.py_spy, "--", sys.executable]
            elif args.profile:
                cmd += ["-m", "cProfile", "-o", args.profile]
            cmd += ["-m", "router", "--config", str(routes), "--workers", str(args.workers)]
            if args.workers == 1:
                cmd = cmd[:-2]
            log = open(Path(tmp) / "router.log", "wb")  # noqa: SIM115 - closed with the directory
            router = subprocess.Popen(["taskset", "-c", args.router_cores, *cmd],
                                      stdout=log, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            await wait_ready(url, tries=100)
            sampler = ResourceSampler(router.pid)  # the process tree: py-spy's child, the workers
            await closed_loop(url, args.clients, seconds=args.warmup)
            sampler.start()
            started = time.monotonic()
            statuses: dict[int, int] = {}
            done = await closed_loop(url, args.clients, seconds=args.seconds, statuses=statuses)
            elapsed = time.monotonic() - started
            cpu = sampler.stop()["cpu_s"]
            router.send_signal(signal.SIGINT if args.py_spy else signal.SIGTERM)  # py-spy writes on SIGINT
            router.wait(60)
            log.close()
            tail = (Path(tmp) / "router.log").read_text(errors="replace")[-2000:]
    if tail.strip():
        print("router log (tail):", tail, sep="\n")
    print(f"requests {done} in {elapsed:.1f}s = {done / elapsed:.0f} req/s; router CPU {cpu:.2f}s "
          f"= {1000 * cpu / max(done, 1):.3f} ms/request (policy {args.policy}, workers {args.workers}); "
          f"statuses {statuses}")
    if args.profile:
        stats = pstats.Stats(args.profile)
        stats.sort_stats("tottime").print_stats(args.top)
    return 0


async def run_callgrind(args: argparse.Namespace, routes: Path, port: int, tmp: Path) -> int:
    out = tmp / "callgrind.out"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m", "router",
           "--config", str(routes)]
    log = open(tmp / "router.log", "wb")  # noqa: SIM115 - closed below
    router = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, tries=3000)  # valgrind starts Python some 50 times slower
        await closed_loop(url, args.clients_callgrind, requests=args.requests)  # warm-up
        subprocess.run(["callgrind_control", "--zero", str(router.pid)], check=True, capture_output=True)
        started = time.monotonic()
        done = await closed_loop(url, args.clients_callgrind, requests=args.requests)
        elapsed = time.monotonic() - started
        subprocess.run(["callgrind_control", "--dump=measured", str(router.pid)], check=True, capture_output=True)
    finally:
        router.send_signal(signal.SIGTERM)
        router.wait(120)
        log.close()
    if done != args.requests:
        raise RuntimeError(f"only {done} of {args.requests} measured requests were answered 200")
    dump, instructions = callgrind_dump(out, "measured")
    if args.callgrind_out:  # keep the measured dump, for callgrind_annotate
        shutil.copyfile(dump, args.callgrind_out)
    print(f"requests {args.requests} in {elapsed:.1f}s under callgrind; router {instructions / 1e6:.1f} M "
          f"instructions = {instructions / args.requests / 1e6:.3f} M instructions/request (policy {args.policy}, "
          f"{args.clients_callgrind} clients)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="cache_aware")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--router-cores", default="0")
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--profile", default=None, help="write cProfile stats here and print the top")
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--py-spy", default=None, help="record collapsed stacks here with py-spy (pip install py-spy)")
    parser.add_argument("--callgrind", action="store_true",
                        help="count the router's instructions per request under valgrind's callgrind")
    parser.add_argument("--callgrind-out", default=None,
                        help="--callgrind: keep the measured dump here (read it with callgrind_annotate)")
    parser.add_argument("--requests", type=int, default=1000, help="--callgrind: requests measured (and warmed up)")
    parser.add_argument("--clients-callgrind", type=int, default=16, help="--callgrind: closed-loop clients")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
