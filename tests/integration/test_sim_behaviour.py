"""The simulator measures like vLLM: prefix-cache counters, cached_tokens, KV usage and waiting
under load, preemptions, KV events on ZMQ, abort on disconnect, and bounded state."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import msgpack
import zmq
import zmq.asyncio

from engines.sim.kv_cache import block_hash, event_hash
from engines.sim.process import SimProcess

MODEL = "sim-b"
LONG = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(100))


def sample(text: str, name: str, **labels: str) -> float:
    """One labelled sample from Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def complete(http: aiohttp.ClientSession, sim: SimProcess, prompt: str, max_tokens: int = 1,
                   **extra: object) -> dict:
    async with http.post(sim.url + "/v1/completions",
                         json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, **extra}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def metrics_text(http: aiohttp.ClientSession, sim: SimProcess) -> str:
    async with http.get(sim.url + "/metrics") as r:
        return await r.text()


async def test_prefix_cache_counters_and_cached_tokens_count_like_vllm():
    """As prefix_cache_test.txt: queries grow by the prompt both times, hits by whole blocks."""
    async with SimProcess(MODEL, time_scale=50, args=["--block-size", "128", "--num-gpu-blocks", "100"]) as sim, \
            aiohttp.ClientSession() as http:
        before = await sim.metrics(http)
        first = await complete(http, sim, LONG)
        n = first["usage"]["prompt_tokens"]
        assert n > 1152
        mid = await sim.metrics(http)
        second = await complete(http, sim, LONG)
        after = await sim.metrics(http)
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        cached = (n - 1) // 128 * 128
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
        # Completions: vLLM sets cached_tokens only.
        assert second["usage"]["prompt_tokens_details"]["created_cache_tokens"] is None
        q, h = "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"
        assert mid[q] - before[q] == n and mid[h] - before[h] == 0
        assert after[q] - mid[q] == n and after[h] - mid[h] == cached
        assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == 2 * n
        assert after["vllm:prompt_tokens_cached_total"] - before["vllm:prompt_tokens_cached_total"] == cached
        assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 2
        assert after["vllm:kv_cache_usage_perc"] == 0.0  # idle, cached blocks or not
        # An unrelated prompt queries but does not hit.
        await complete(http, sim, "an unrelated prompt " * 50)
        last = await sim.metrics(http)
        assert last[h] == after[h] and last[q] > after[q]
        text = await metrics_text(http, sim)
        assert sample(text, "vllm:request_success_total", finished_reason="length") == 3
        assert 'vllm:cache_config_info{' in text and 'block_size="128"' in text and 'num_gpu_blocks="100"' in text


async def test_chat_reports_created_cache_tokens():
    """vLLM's chat usage: created_cache_tokens = prompt tokens in cached blocks minus the hit."""
    messages = [{"role": "user", "content": LONG[:2000]}]
    async with SimProcess(MODEL, time_scale=50, args=["--block-size", "16", "--num-gpu-blocks", "400"]) as sim, \
            aiohttp.ClientSession() as http:
        details = []
        for stream in (False, True):
            body = {"model": MODEL, "messages": messages, "max_tokens": 2, "stream": stream,
                    "stream_options": {"include_usage": True} if stream else None}
            async with http.post(sim.url + "/v1/chat/completions", json=body) as r:
                if stream:
                    lines = [ln for ln in (await r.read()).split(b"\n\n") if ln.startswith(b"data: {")]
                    details.append(json.loads(lines[-1][6:])["usage"])
                else:
                    details.append((await r.json())["usage"])
        n = details[0]["prompt_tokens"]
        full = n // 16 * 16
        assert details[0]["prompt_tokens_details"] == {"cached_tokens": 0, "created_cache_tokens": full,
                                                       "multimodal_tokens": None}
        hit = (n - 1) // 16 * 16
        # The stream's usage chunk leaves the unset multimodal_tokens out.
        assert details[1]["prompt_tokens_details"] == {"cached_tokens": hit, "created_cache_tokens": full - hit}


async def test_load_shows_in_running_waiting_and_kv_usage_and_then_drains():
    args = ["--num-gpu-blocks", "40", "--block-size", "16", "--max-model-len", "512", "--max-num-seqs", "4"]
    async with SimProcess(MODEL, time_scale=2, args=args) as sim, aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(complete(http, sim, f"{i} " + LONG[:1000], max_tokens=40)) for i in range(12)]
        peak_waiting = peak_usage = peak_running = 0.0
        while not all(t.done() for t in tasks):
            m = await sim.metrics(http)
            peak_waiting = max(peak_waiting, m["vllm:num_requests_waiting"])
            peak_running = max(peak_running, m["vllm:num_requests_running"])
            peak_usage = max(peak_usage, m["vllm:kv_cache_usage_perc"])
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert peak_waiting > 0 and 0 < peak_running <= 4 and 0.5 < peak_usage <= 1.0
        m = await sim.metrics(http)
        assert m["vllm:num_requests_waiting"] == 0 and m["vllm:num_requests_running"] == 0
        assert m["vllm:kv_cache_usage_perc"] == 0.0
        assert m["vllm:e2e_request_latency_seconds_count"] == 12
        assert m["vllm:time_to_first_token_seconds_count"] == 12
        assert m["vllm:inter_token_latency_seconds_count"] == 12 * 39


async def test_preemptions_counted_when_running_requests_outgrow_the_cache():
    args = ["--num-gpu-blocks", "24", "--block-size", "16", "--max-model-len", "384"]
    async with SimProcess(MODEL, time_scale=20, args=args) as sim, aiohttp.ClientSession() as http:
        results = await asyncio.gather(*(complete(http, sim, f"{i} " + LONG[:400], max_tokens=150)
                                         for i in range(6)))
        assert all(r["usage"]["completion_tokens"] == 150 for r in results)
        m = await sim.metrics(http)
        assert m["vllm:num_preemptions_total"] > 0
        assert m["vllm:kv_cache_usage_perc"] == 0.0
        # Re-admissions after preemption are not prefix-cache queries (vLLM counts them apart).
        assert m["vllm:prefix_cache_queries_total"] == sum(r["usage"]["prompt_tokens"] for r in results)


async def test_kv_events_publish_vllms_wire_format_with_replay():
    args = ["--block-size", "16", "--num-gpu-blocks", "64", "--max-model-len", "1024"]
    async with SimProcess(MODEL, time_scale=20, args=args, kv_events=True, kv_topic="kv") as sim, \
            aiohttp.ClientSession() as http:
        async with http.get(sim.url + "/kv_event_sources") as r:
            sources = await r.json()
        assert sources == [{"data_parallel_rank": 0, "endpoint": sim.kv_events_endpoint,
                            "replay_endpoint": sim.kv_replay_endpoint, "topic": "kv"}]
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        sub.connect(sim.kv_events_endpoint)
        try:
            await asyncio.sleep(0.3)  # let the subscription reach the publisher (PUB drops before)
            prompt = LONG[:600]
            async with http.post(sim.url + "/tokenize", json={"model": MODEL, "prompt": prompt}) as r:
                ids = (await r.json())["tokens"]
            body = await complete(http, sim, prompt, max_tokens=20)
            assert body["usage"]["prompt_tokens"] == len(ids)
            topic, seq, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
            assert topic == b"kv" and int.from_bytes(seq, "big") == 0
            ts, events, dp_rank = msgpack.unpackb(payload)
            assert isinstance(ts, float) and dp_rank == 0
            stored = events[0]
            assert stored["type"] == "BlockStored" and stored["parent_block_hash"] is None
            assert stored["block_size"] == 16 and stored["medium"] == "GPU"
            n_blocks = len(ids) // 16
            assert stored["token_ids"] == ids[: n_blocks * 16]
            expected, parent = [], None
            for i in range(n_blocks):
                parent = block_hash(parent, ids[i * 16:(i + 1) * 16])
                expected.append(event_hash(parent))
            assert stored["block_hashes"] == expected
            # A repeat stores nothing new (all prompt blocks hit); generated blocks came before.
            await complete(http, sim, prompt, max_tokens=1)
            # Resetting the prefix cache (vLLM's /reset_prefix_cache) publishes AllBlocksCleared.
            async with http.post(sim.url + "/admin/reset") as r:
                assert r.status == 200
            types = []
            while "AllBlocksCleared" not in types:
                _, _, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
                types += [e["type"] for e in msgpack.unpackb(payload)[1]]
            async with http.get(sim.url + "/admin/stats") as r:
                assert (await r.json())["cached_blocks"] == 0
            # Replay from 0: every batch again, then the end marker.
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(sim.kv_replay_endpoint)
            await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            seqs = []
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
                assert len(frames) == 4  # ["", topic, seq, payload]; end: ["", "", -1, ""]
                seq_n = int.from_bytes(frames[2], "big", signed=True)
                if seq_n == -1:
                    assert frames[1] == b"" and frames[3] == b""
                    break
                assert frames[1] == b"kv"
                seqs.append(seq_n)
                msgpack.unpackb(frames[3])
            assert seqs == list(range(len(seqs))) and len(seqs) >= 1
            # The harness's fresh reset: the stream starts again as a fresh engine's, nothing
            # left to replay, the next batch numbered 0.
            async with http.post(sim.url + "/admin/reset?fresh=1") as r:
                assert r.status == 200
            await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
            assert int.from_bytes(frames[2], "big", signed=True) == -1  # the end marker at once
            while True:  # (the reset's own AllBlocksCleared may have gone out before it)
                try:
                    await asyncio.wait_for(sub.recv_multipart(), 0.3)
                except TimeoutError:
                    break
            await complete(http, sim, LONG[600:1200], max_tokens=2)
            _, seq, _ = await asyncio.wait_for(sub.recv_multipart(), 5)
            assert int.from_bytes(seq, "big") == 0
            dealer.close(0)
        finally:
            sub.close(0)
            ctx.term()


async def test_client_disconnect_aborts_at_once():
    async with SimProcess(MODEL, time_scale=1, args=["--num-gpu-blocks", "256"]) as sim, \
            aiohttp.ClientSession() as http:
        # Streaming: read one chunk, then hang up.
        resp = await http.post(sim.url + "/v1/completions",
                               json={"model": MODEL, "prompt": "hello", "max_tokens": 5000 // 4, "stream": True})
        await resp.content.readline()
        m = await sim.metrics(http)
        assert m["vllm:num_requests_running"] == 1 and m["vllm:kv_cache_usage_perc"] > 0
        resp.close()
        await _until(sim, http, lambda m: m["vllm:num_requests_running"] == 0)
        # Non-streaming: the client gives up while waiting.
        task = asyncio.create_task(complete(http, sim, "hello again", max_tokens=1000))
        await _until(sim, http, lambda m: m["vllm:num_requests_running"] == 1)
        task.cancel()
        await _until(sim, http, lambda m: m["vllm:num_requests_running"] == 0
                     and m["vllm:kv_cache_usage_perc"] == 0)
        text = await metrics_text(http, sim)
        # Like vLLM's output processor, a client abort records no finished-request stats.
        assert sample(text, "vllm:request_success_total", finished_reason="abort") == 0
        assert sample(text, "vllm:e2e_request_latency_seconds_count") == 0
        async with http.get(sim.url + "/admin/stats") as r:
            stats = await r.json()
        assert stats["in_flight"] == 0 and stats["running"] == 0 and stats["waiting"] == 0


async def _until(sim: SimProcess, http: aiohttp.ClientSession, cond, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        m = await sim.metrics(http)
        if cond(m):
            return
        assert time.monotonic() < deadline, m
        await asyncio.sleep(0.01)


async def test_state_stays_bounded_after_much_traffic():
    args = ["--num-gpu-blocks", "32", "--block-size", "16", "--max-model-len", "512"]
    cfg = ["--kv-events-config", json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                                             "endpoint": "tcp://127.0.0.1:1", "buffer_steps": 50})]
    async with SimProcess(MODEL, time_scale=50, args=args + cfg) as sim, aiohttp.ClientSession() as http:
        for round_ in range(4):
            await asyncio.gather(*(complete(http, sim, f"{round_}-{i} " + LONG[:300], max_tokens=8)
                                   for i in range(25)))
        async with http.get(sim.url + "/admin/stats") as r:
            stats = await r.json()
        assert stats["usable_blocks"] == 31  # vLLM keeps one block as its null block
        assert stats["cached_blocks"] <= 31 and stats["free_blocks"] == 31
        assert stats["running"] == stats["waiting"] == stats["in_flight"] == 0
        # ~100 batches are published (one per step that changed the cache): the replay buffer
        # must be full at its bound, not merely under it (as after fewer than 50 batches).
        assert stats["kv_events_buffered"] == 50, stats


async def test_queue_limit_answers_503_like_vllm():
    async with SimProcess(MODEL, time_scale=1, args=["--num-gpu-blocks", "600", "--max-num-queued-reqs", "2"]) as sim, \
            aiohttp.ClientSession() as http:
        slow = [asyncio.create_task(complete(http, sim, f"{i} slow", max_tokens=400)) for i in range(2)]
        await _until(sim, http, lambda m: m["vllm:num_requests_running"] == 2)
        async with http.post(sim.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}) as r:
            assert r.status == 503
            assert "currently busy" in (await r.json())["error"]["message"]
        text = await metrics_text(http, sim)
        assert sample(text, "vllm:admission_rejections_total", reason="max_num_queued_reqs") == 1
        for task in slow:
            task.cancel()


async def test_legacy_metric_names():
    async with SimProcess(MODEL, time_scale=50, args=["--legacy-metric-names", "--num-gpu-blocks", "600"]) as sim, \
            aiohttp.ClientSession() as http:
        await complete(http, sim, "hello")
        m = await sim.metrics(http)
        assert "vllm:gpu_cache_usage_perc" in m and "vllm:kv_cache_usage_perc" not in m
        assert m["vllm:gpu_prefix_cache_queries_total"] > 0 and "vllm:gpu_prefix_cache_hits_total" in m
        assert "vllm:prefix_cache_queries_total" not in m


async def test_time_scale_speeds_up_the_wall_clock_but_metrics_stay_simulated():
    body = {"model": MODEL, "prompt": LONG[:2000], "max_tokens": 50}
    walls = {}
    for scale in (1.0, 10.0):
        async with SimProcess(MODEL, time_scale=scale, args=["--num-gpu-blocks", "600"]) as sim, \
                aiohttp.ClientSession() as http:
            t0 = time.monotonic()
            async with http.post(sim.url + "/v1/completions", json=body) as r:
                assert r.status == 200
            walls[scale] = time.monotonic() - t0
            m = await sim.metrics(http)
            e2e = m["vllm:e2e_request_latency_seconds_sum"]
            # 50 steps of ~7 ms plus a prefill: ~0.35 s simulated, whatever the scale.
            assert 0.3 < e2e < 0.6, e2e
    assert walls[10.0] < walls[1.0] / 3
