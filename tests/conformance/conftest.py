"""Engines under test for the conformance suite: each kind starts once (package scope:
they stop when the suite ends, before tests/e2e starts its own real replicas).

`engine` is parametrized over the kinds: ``sim`` always, ``vllm`` when the CPU build is
installed (else those tests are skipped, with the command that installs it).  Both run two
identical replicas (the router test routes between them; the other tests use the first).
Real vLLM is started by our own launcher from an engines.yaml-shaped registry entry, so the
launcher's command lines are what is being tested too.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _conformance import (  # noqa: E402
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    MODEL,
    NUM_BLOCKS,
    REPLICAS,
    SIM_AGENTIC_ARGS,
    Engine,
    vllm_registry_entry,
    vllm_skip_reason,
)

KINDS = ("sim", "vllm")


@pytest.fixture(scope="package")
def engines_state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines")


def _start_vllm(state_dir: Path):
    from engines.launcher import Launcher, parse_config, plan

    config = parse_config({"models": [vllm_registry_entry()]}, "conformance")
    plans = plan(config)
    fleet = Launcher(state_dir).up(plans)
    engine = Engine(kind="vllm", urls=fleet.urls(),
                    kv_endpoints=[p.kv_events_endpoint for p in plans],
                    replay_endpoints=[p.kv_replay_endpoint for p in plans], topic="kv",
                    extra={"logs": [str(r.log_path) for r in fleet.replicas]})
    return engine, fleet.stop


def _start_sim(state_dir: Path):
    from engines.sim.process import SimProcess

    loop = asyncio.new_event_loop()
    sims = [SimProcess(MODEL, kv_events=True, kv_topic="kv", log_path=state_dir / f"sim-{i}.log",
                       args=["--block-size", str(BLOCK_SIZE), "--num-gpu-blocks", str(NUM_BLOCKS),
                             "--max-model-len", str(MAX_MODEL_LEN), *SIM_AGENTIC_ARGS])
            for i in range(REPLICAS)]
    async def start_all():
        await asyncio.gather(*(s.start() for s in sims))

    async def stop_all():
        await asyncio.gather(*(s.stop() for s in sims))

    try:
        loop.run_until_complete(start_all())
    except BaseException:
        loop.run_until_complete(stop_all())
        loop.close()
        raise
    engine = Engine(kind="sim", urls=[s.url for s in sims],
                    kv_endpoints=[s.kv_events_endpoint for s in sims],
                    replay_endpoints=[s.kv_replay_endpoint for s in sims], topic="kv",
                    extra={"logs": [str(state_dir / f"sim-{i}.log") for i in range(REPLICAS)]})

    def stop() -> None:
        loop.run_until_complete(stop_all())
        loop.close()

    return engine, stop


@pytest.fixture(scope="package")
def engine_pool(engines_state_dir):
    """Started engines by kind, started lazily, stopped at the end of the session."""
    started: dict[str, tuple[Engine, object]] = {}

    def get(kind: str) -> Engine:
        if kind not in started:
            if kind == "vllm":
                reason = vllm_skip_reason()
                if reason:
                    pytest.skip(reason)
                started[kind] = _start_vllm(engines_state_dir / "vllm")
            else:
                (engines_state_dir / "sim").mkdir(exist_ok=True)
                started[kind] = _start_sim(engines_state_dir / "sim")
        return started[kind][0]

    yield get
    for _, stop in started.values():
        stop()


@pytest.fixture(scope="package", params=[
    "sim", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])])
def engine(request, engine_pool) -> Engine:
    """Each engine kind in turn (tests using it run once per kind)."""
    return engine_pool(request.param)


@pytest.fixture(scope="package")
def both_engines(engine_pool) -> dict[str, Engine]:
    """Sim and real vLLM together, for checks that compare them (skipped without vLLM)."""
    return {kind: engine_pool(kind) for kind in KINDS}


def pytest_collection_modifyitems(config, items):
    """Tests that compare with real vLLM carry the `vllm` marker (`-m "not vllm"` skips them)."""
    for item in items:
        if "both_engines" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.slow)
