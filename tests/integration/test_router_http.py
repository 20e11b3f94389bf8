"""The router's HTTP surface against in-process fake replicas that record what they get.

Fake replicas (not the simulator) are used where the test must see the exact bytes and
headers that reached the replica, or must make the replica misbehave in one precise way.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from router.fleet.replicas import Health


def assert_error(status: int, payload: dict, expected: int, param: str | None = None) -> dict:
    assert status == expected, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == expected
    if param is not None:
        assert error["param"] == param
    return error


async def post(http: aiohttp.ClientSession, url: str, data: bytes | str,
               headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    async with http.post(url, data=data, headers={"Content-Type": "application/json",
                                                  **(headers or {})}) as r:
        raw = await r.read()
        return r.status, r.headers.copy(), orjson.loads(raw) if raw else None


BAD_INPUTS = [
    # (path, body, status, param, message fragment)
    ("/v1/chat/completions", b'{"model": "sim-a", "messages": [', 400, None, "Malformed JSON"),
    ("/v1/chat/completions", b"", 400, None, "empty"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/chat/completions", b'"just a string"', 400, None, "JSON object"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model",
     "'model' is required"),
    ("/v1/completions", b'{"prompt": "hi"}', 400, "model", "'model' is required"),
    ("/v1/embeddings", b'{"input": "hi"}', 400, "model", "'model' is required"),
    ("/v1/chat/completions", b'{"model": 42, "messages": []}', 400, "model", "must be a string"),
    ("/v1/chat/completions", b'{"model": "sim-a", "messages": "hi"}', 400, "messages", "array"),
    ("/v1/chat/completions", b'{"model": "sim-a", "messages": ["hi"]}', 400, "messages", "object"),
    ("/v1/chat/completions", b'{"model": "sim-a"}', 400, "messages", "required"),
    ("/v1/chat/completions", b'{"model": "sim-a", "messages": [], "stream": "yes"}', 400, "stream",
     "boolean"),
    ("/v1/completions", b'{"model": "sim-a", "prompt": 12}', 400, "prompt", "prompt"),
    ("/v1/completions", b'{"model": "sim-a", "prompt": [1, "a"]}', 400, "prompt", "prompt"),
    ("/v1/completions", b'{"model": "sim-a"}', 400, "prompt", "required"),
    ("/v1/completions", b'{"model": "sim-a", "prompt": "x", "stream_options": 1}', 400,
     "stream_options", "object"),
    ("/v1/embeddings", b'{"model": "sim-a", "input": {"a": 1}}', 400, "input", "input"),
    ("/v1/completions", b'{"model": "nope", "prompt": "hi"}', 404, "model", "`nope` does not exist"),
    ("/v1/chat/completions", b'{"model": "nope", "messages": []}', 404, "model", "sim-a, alias-a"),
]


async def test_bad_inputs_get_openai_shaped_errors(fakes, start_router, make_routes, http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url]))
    for path, body, status, param, fragment in BAD_INPUTS:
        code, headers, payload = await post(http, server.url + path, body)
        error = assert_error(code, payload, status, param)
        assert fragment in error["message"], (path, body, error)
        assert headers["Content-Type"].startswith("application/json")
        assert headers.get("X-Request-Id")
        assert "Traceback" not in error["message"]
    assert fake.seen == []  # nothing bad reached the replica


async def test_body_cap_413(fakes, start_router, make_routes, http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url], server={"max_body_bytes": 4096}))
    big = orjson.dumps({"model": "sim-a", "prompt": "x" * 5000})
    code, _, payload = await post(http, server.url + "/v1/completions", big)
    assert "4096" in assert_error(code, payload, 413)["message"]

    async def chunks():  # no Content-Length: the cap applies while reading
        for _ in range(10):
            yield b"x" * 1000

    async with http.post(server.url + "/v1/completions", data=chunks()) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == 413
    small = orjson.dumps({"model": "sim-a", "prompt": "x" * 100})
    code, _, payload = await post(http, server.url + "/v1/completions", small)
    assert code == 200 and len(fake.seen) == 1


async def test_wrong_method_405_and_unknown_path_404(fakes, start_router, make_routes, http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url]))
    for method, path in [("GET", "/v1/chat/completions"), ("PUT", "/v1/completions"),
                         ("DELETE", "/v1/embeddings"), ("POST", "/v1/models"), ("POST", "/health"),
                         ("POST", "/metrics"), ("GET", "/tokenize")]:
        async with http.request(method, server.url + path, data=b"{}",
                                headers={"X-Request-Id": "wrong-method"}) as r:
            payload = await r.json()
            assert_error(r.status, payload, 405)
            assert "Allow" in r.headers, (method, path)
            assert r.headers["X-Request-Id"] == "wrong-method"
    async with http.get(server.url + "/v2/nothing") as r:
        assert_error(r.status, await r.json(), 404)
    assert fake.seen == []


async def test_no_healthy_replica_503_with_retry_after(fakes, start_router, make_routes, http,
                                                       until) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url]))
    fake.healthy = False
    replica = next(iter(server.router.fleet))
    await until(lambda: replica.health is Health.UNHEALTHY, message="replica unhealthy")
    code, headers, payload = await post(http, server.url + "/v1/completions",
                                        b'{"model": "sim-a", "prompt": "hi"}')
    assert "sim-a" in assert_error(code, payload, 503)["message"]
    assert headers["Retry-After"] == "1"
    async with http.get(server.url + "/ready") as r:
        assert r.status == 503
        assert (await r.json())["models"]["sim-a"] == {"healthy": 0, "total": 1}
    async with http.get(server.url + "/health") as r:  # the router itself is alive
        assert r.status == 200
    async with http.get(server.url + "/v1/models") as r:
        assert (await r.json())["data"] == []
    fake.healthy = True
    await until(lambda: replica.health is Health.HEALTHY, message="replica healthy again")
    code, _, _ = await post(http, server.url + "/v1/completions", b'{"model": "sim-a", "prompt": "hi"}')
    assert code == 200


async def test_header_hygiene_and_request_ids(fakes, start_router, make_routes, http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([{"url": fake.url, "api_key": "replica-key"}]))
    headers = {
        "Authorization": "Bearer client-secret",
        "Proxy-Authorization": "Basic abc",
        "Connection": "keep-alive, X-Hop-Custom",
        "X-Hop-Custom": "drop me",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "X-Request-Id": "client-id-1",
        "X-Other": "kept",
    }
    body = b'{"model": "sim-a", "prompt": "hi"}'
    async with http.post(server.url + "/v1/completions", data=body, headers=headers) as r:
        assert r.status == 200
        assert r.headers["X-Request-Id"] == "client-id-1"
        assert r.headers["X-Replica-Kept"] == "yes"
        assert "Proxy-Authenticate" not in r.headers
        await r.read()
    _, seen, seen_body = fake.seen[-1]
    lower = {k.lower(): v for k, v in seen.items()}
    assert lower["authorization"] == "Bearer replica-key"
    for dropped in ("proxy-authorization", "x-hop-custom", "keep-alive", "te"):
        assert dropped not in lower, dropped
    assert lower.get("connection", "keep-alive").lower() != "keep-alive, x-hop-custom"
    assert lower["x-other"] == "kept"
    assert lower["x-request-id"] == "client-id-1-1"  # unique per upstream attempt
    assert seen_body == body

    # No client id: one is generated, returned, and suffixed upstream.
    async with http.post(server.url + "/v1/completions", data=body) as r:
        generated = r.headers["X-Request-Id"]
        await r.read()
    assert len(generated) >= 16
    assert fake.request_ids[-1] == f"{generated}-1"
    # Without an api_key, the client's Authorization is still not forwarded.
    (bare,) = await fakes(1)
    server2 = await start_router(make_routes([bare.url]))
    async with http.post(server2.url + "/v1/completions", data=body, headers=headers) as r:
        await r.read()
    assert "authorization" not in {k.lower() for k in bare.seen[-1][1]}


async def test_alias_rewrites_model_and_nothing_else(fakes, start_router, make_routes, http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url], aliases=["alias-a"]))
    original = ('{ "prompt" : "h\\u00e9llo \u00e9 \\"model\\"",\n  "model" :  "alias-a" ,'
                '"max_tokens": 1.50E1, "extra": {"model": "keep-me"}, "n":1}').encode()
    async with http.post(server.url + "/v1/completions", data=original) as r:
        assert r.status == 200
    expected = original.replace(b'"alias-a"', b'"sim-a"')
    assert fake.seen[-1][2] == expected
    # The canonical name is forwarded byte for byte.
    canonical = b'{"model":"sim-a",  "prompt":"x" , "temperature": 0.10}'
    async with http.post(server.url + "/v1/completions", data=canonical) as r:
        assert r.status == 200
    assert fake.seen[-1][2] == canonical


async def test_failover_on_5xx_uses_new_attempt_id(fakes, start_router, make_routes, http) -> None:
    bad, good = await fakes(2)
    bad.status = 500
    server = await start_router(make_routes([bad.url, good.url], policy="round_robin"))
    for i in range(4):
        rid = f"req-{i}"
        async with http.post(server.url + "/v1/completions", data=b'{"model":"sim-a","prompt":"x"}',
                             headers={"X-Request-Id": rid}) as r:
            assert r.status == 200
            assert (await r.json())["url"] == good.url
            assert r.headers["X-Request-Id"] == rid
    # Every request that met the bad replica first was retried there as attempt 2.
    assert bad.request_ids and all(rid.endswith("-1") for rid in bad.request_ids)
    retried = {rid.rsplit("-", 1)[0] for rid in bad.request_ids}
    assert {f"{rid}-2" for rid in retried} <= set(good.request_ids)
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    assert "router_failovers_total" in text and "router_retries_total" in text
    assert 'kind="status_5xx"' in text


async def test_429_fails_over_and_all_429_is_relayed(fakes, start_router, make_routes, http) -> None:
    limited, good = await fakes(2)
    limited.status = 429
    server = await start_router(make_routes([limited.url, good.url]))
    for _ in range(3):
        code, _, payload = await post(http, server.url + "/v1/completions", b'{"model":"sim-a","prompt":"x"}')
        assert code == 200 and payload["url"] == good.url
    good.status = 429
    code, headers, payload = await post(http, server.url + "/v1/completions",
                                        b'{"model":"sim-a","prompt":"x"}')
    assert code == 429 and payload["error"]["message"] == "fake 429"
    assert headers["Retry-After"] == "7"


async def test_4xx_from_replica_is_relayed_without_retry(fakes, start_router, make_routes, http) -> None:
    a, b = await fakes(2)
    a.status = b.status = 400
    server = await start_router(make_routes([a.url, b.url]))
    code, _, payload = await post(http, server.url + "/v1/completions", b'{"model":"sim-a","prompt":"x"}')
    assert code == 400 and payload["error"]["message"] == "fake 400"
    assert len(a.seen) + len(b.seen) == 1


async def test_non_stream_answer_cut_midway_fails_over(fakes, start_router, make_routes, http) -> None:
    # A whole answer is buffered (up to proxy.buffer_bytes) before the client sees a byte,
    # so a replica that dies while sending it is a failover, not a broken answer.
    a, b = await fakes(2)
    a.mode = "partial"
    server = await start_router(make_routes([a.url, b.url]))
    for _ in range(2):
        code, _, payload = await post(http, server.url + "/v1/completions",
                                      b'{"model":"sim-a","prompt":"x"}')
        assert code == 200 and payload["url"] == b.url
    assert a.seen  # it was tried
    b.mode = "partial"
    code, _, payload = await post(http, server.url + "/v1/completions", b'{"model":"sim-a","prompt":"x"}')
    error = assert_error(code, payload, 502)
    assert "lost the connection" in error["message"] and "127.0.0.1" not in error["message"]


@pytest.fixture
def closed_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_dead_backend_is_skipped(fakes, start_router, make_routes, http, closed_url,
                                       until) -> None:
    (good,) = await fakes(1)
    server = await start_router(make_routes([closed_url, good.url],
                                            health={"interval": 5.0, "failure_threshold": 3}),
                                wait_healthy=False)
    dead, alive = list(server.router.fleet)
    await until(lambda: alive.health is Health.HEALTHY)
    # Pretend the dead one had looked healthy (e.g. it just crashed between probes).
    dead.health = Health.HEALTHY
    for _ in range(4):
        code, _, payload = await post(http, server.url + "/v1/completions", b'{"model":"sim-a","prompt":"x"}')
        assert code == 200 and payload["url"] == good.url
    assert dead.health in (Health.SUSPECT, Health.UNHEALTHY)  # marked at once on the request path
    async with http.get(server.url + "/metrics") as r:
        assert 'kind="connect"' in await r.text()


async def test_models_merge_healthy_replicas_and_aliases(fakes, start_router, make_routes, http,
                                                         until) -> None:
    a = (await fakes(1))[0]
    b = (await fakes(1, models=("sim-a", "sim-a-lora")))[0]
    server = await start_router(make_routes([a.url, b.url], aliases=["alias-a"]))
    rb = [r for r in server.router.fleet if r.url == b.url][0]
    await until(lambda: "sim-a-lora" in rb.served_models, message="models discovered")
    async with http.get(server.url + "/v1/models") as r:
        listing = await r.json()
    ids = [m["id"] for m in listing["data"]]
    assert listing["object"] == "list"
    assert ids == ["sim-a", "sim-a-lora", "alias-a"]
    by_id = {m["id"]: m for m in listing["data"]}
    assert by_id["alias-a"]["parent"] == "sim-a" and by_id["sim-a"]["max_model_len"] == 4096
    async with http.get(server.url + "/v1/models/alias-a") as r:
        assert (await r.json())["id"] == "alias-a"
    # A discovered served name routes to the replicas that serve it, unchanged.
    for _ in range(3):
        code, _, payload = await post(http, server.url + "/v1/completions",
                                      b'{"model":"sim-a-lora","prompt":"x"}')
        assert code == 200 and payload["url"] == b.url
    b.healthy = False
    await until(lambda: rb.health is Health.UNHEALTHY)
    async with http.get(server.url + "/v1/models") as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["sim-a", "alias-a"]


async def test_pass_through_endpoints_route_by_model(fakes, start_router, make_routes, http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url]))
    for path in ("/tokenize", "/detokenize", "/v1/completions/render", "/v1/chat/completions/render",
                 "/v1/responses"):
        code, _, payload = await post(http, server.url + path, b'{"model":"alias-a","prompt":"x"}')
        assert code == 200 and payload["path"] == path
        assert orjson.loads(fake.seen[-1][2])["model"] == "sim-a"
    # /tokenize without a model: the only model configured.
    code, _, payload = await post(http, server.url + "/tokenize", b'{"prompt":"x"}')
    assert code == 200 and fake.seen[-1][2] == b'{"prompt":"x"}'
    code, _, payload = await post(http, server.url + "/tokenize", b'{"model":"nope","prompt":"x"}')
    assert_error(code, payload, 404, "model")


async def test_health_ready_metrics(fakes, start_router, make_routes, http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url]))
    async with http.get(server.url + "/health") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
    async with http.get(server.url + "/ready") as r:
        assert r.status == 200 and (await r.json())["ready"] is True
    await post(http, server.url + "/v1/completions", b'{"model":"sim-a","prompt":"x"}')
    await post(http, server.url + "/v1/completions", b'{"model":"zzz","prompt":"x"}')
    async with http.get(server.url + "/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    for name in ("router_requests_total", "router_request_duration_seconds_bucket",
                 "router_time_to_first_byte_seconds_bucket", "router_in_flight_requests",
                 "router_replica_health", "router_retries_total", "router_failovers_total",
                 "router_upstream_errors_total", "router_policy_decisions_total",
                 "router_policy_decision_seconds_bucket", "router_replica_engine_load",
                 "router_build_info"):
        assert name in text, name
    assert "vllm:" not in text
    assert f'router_requests_total{{model="sim-a",replica="{fake.url}",status="200"}} 1.0' in text
    assert 'router_requests_total{model="none",replica="none",status="404"} 1.0' in text
    assert "zzz" not in text  # client-chosen names never become label values
    assert f'router_replica_health{{model="sim-a",replica="{fake.url}",state="healthy"}} 1.0' in text
    async with http.get(server.url + "/admin/replicas") as r:
        fleet = await r.json()
    assert fleet["replicas"][0]["health"] == "healthy" and fleet["active_requests"] == 0


async def test_access_log_line_per_request(fakes, start_router, make_routes, http, caplog) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url], policy="least_load"))
    caplog.set_level("INFO", logger="router.access")
    await post(http, server.url + "/v1/completions", b'{"model":"alias-a","prompt":"x"}',
               headers={"X-Request-Id": "log-me"})
    await asyncio.sleep(0)
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "router.access"]
    (line,) = [entry for entry in lines if entry["request_id"] == "log-me"]
    assert line["model"] == "sim-a" and line["replica"] == fake.url and line["status"] == 200
    assert line["policy"] == "least_load" and isinstance(line["why"], dict)
    assert line["ttfb_ms"] is not None and line["duration_ms"] >= line["ttfb_ms"]


async def test_routing_terms_weigh_the_decision_and_the_access_log_names_each(
        fakes, start_router, make_routes, http, caplog) -> None:
    a, b = await fakes(2)
    routes = make_routes([a.url, b.url], policy="cache_aware")
    routes["routing"]["terms"] = {"prefill": 1.0, "queue": 0.5}
    server = await start_router(routes)
    caplog.set_level("INFO", logger="router.access")
    await post(http, server.url + "/v1/completions", b'{"model":"sim-a","prompt":"' + b"tell me more " * 200 + b'"}',
               headers={"X-Request-Id": "weighed"})
    await asyncio.sleep(0)
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "router.access"]
    (line,) = [entry for entry in lines if entry["request_id"] == "weighed"]
    why = line["why"]
    assert line["policy"] == "cache_aware" and line["status"] == 200
    assert set(why["terms"]) == {"prefill", "queue"}  # eviction is off: not listed
    winner, runner_up = why["terms"]["prefill"]
    assert winner > 0 and why["cost_s"] == pytest.approx(winner + why["terms"]["queue"][0], abs=2e-6)
    assert why["runner_up"] in {a.url, b.url} and why["runner_up"] != line["replica"]


async def test_forwarding_headers_stay_here_and_replica_headers_are_filtered(
        fakes, start_router, make_routes, http) -> None:
    """Issue 23 #7a/b: what a client says about the path its request took (X-Forwarded-*,
    X-Real-IP, ...) never reaches a replica, and the router adds none of its own; what a
    replica says about itself (its software, host, cookies, its challenge to the router's
    key) never reaches the client, while the rest of its headers (rate limits) do."""
    (fake,) = await fakes(1)
    fake.extra_headers = {
        "Server": "uvicorn-replica", "X-Powered-By": "vllm-0.32", "Via": "1.1 gpu-node-7",
        "X-Served-By": "gpu-node-7", "X-Backend-Server": "10.0.0.5", "Alt-Svc": 'h3=":443"',
        "Set-Cookie": "AWSALB=sticky-to-node-7; Path=/", "WWW-Authenticate": 'Bearer realm="vllm"',
        "X-Ratelimit-Remaining-Requests": "99",
    }
    server = await start_router(make_routes([fake.url]))
    sent = {"X-Forwarded-Host": "evil.example", "X-Real-IP": "203.0.113.9",
            "X-Forwarded-Proto": "https", "X-Forwarded-Port": "443", "X-Forwarded-Prefix": "/x",
            "X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.9", "Via": "1.1 cdn",
            "True-Client-IP": "203.0.113.9", "X-Client-IP": "203.0.113.9", "X-Other": "kept"}
    async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": "x"},
                         headers=sent) as r:
        assert r.status == 200
        got = {k.lower(): v for k, v in r.headers.items()}
        await r.read()
    for name in ("x-powered-by", "via", "x-served-by", "x-backend-server", "alt-svc", "set-cookie",
                 "www-authenticate"):
        assert name not in got, name
    assert got.get("server") != "uvicorn-replica"  # (aiohttp's own, not the replica's)
    assert got["x-ratelimit-remaining-requests"] == "99" and got["x-replica-kept"] == "yes"
    seen = {k.lower() for k in fake.seen[-1][1]}
    assert "x-other" in seen
    for name in sent:
        if name != "X-Other":
            assert name.lower() not in seen, name


async def test_a_200_event_stream_that_is_not_sse_fails_over(fakes, start_router, make_routes,
                                                             http, metric) -> None:
    """Issue 23 #7d: a replica answering a stream with 200 text/event-stream whose first
    bytes are no SSE (a JSON error, an HTML page) was relayed as the client's 200 stream;
    it is a failure before anything is committed: the next replica answers, and with none
    left the client gets a 502 error, not a broken 200."""
    bad, good = await fakes(2)
    bad.mode, good.mode = "bad_sse", "sse"
    server = await start_router(make_routes([bad.url, good.url], policy="round_robin"))
    body = {"model": "sim-a", "prompt": "x", "stream": True}
    for _ in range(4):
        async with http.post(server.url + "/v1/completions", json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            raw = await r.read()
        assert raw.startswith(b"data: {") and raw.endswith(b"data: [DONE]\n\n") and b"engine dead" not in raw
    assert len(bad.seen) >= 1 and len(good.seen) == 4  # the bad one was tried, the good one answered
    async with http.get(server.url + "/metrics") as r:
        page = await r.text()
    assert (metric(page, "router_upstream_errors_total", replica=bad.url, kind="bad_stream") or 0) >= 1
    # An HTML page, alone: 502, an OpenAI-shaped error naming what went wrong.
    bad.sse_body = b"<html><body>502 Bad Gateway</body></html>"
    alone = await start_router(make_routes([bad.url], proxy={"max_attempts": 1}))
    async with http.post(alone.url + "/v1/completions", json=body) as r:
        assert r.status == 502
        message = (await r.json())["error"]["message"]
    assert "not server-sent events" in message and "<html>" not in message


def test_sse_verdict_reads_the_first_line() -> None:
    from router.transport.relay import sse_verdict

    for good in (b"data: {}\n\n", b"data:{}", b": keep-alive\n\n", b"event: x\ndata: 1\n\n",
                 b"id: 1\n", b"retry: 100\n", b"\xef\xbb\xbfdata: 1\n\n", b"\n\ndata: 1", b"data\n"):
        assert sse_verdict(good) is True, good
    for bad in (b'{"error": 1}', b"<html>", b"HTTP/1.1 200", b"dat a", b"identity: 1", b"dataset"):
        assert sse_verdict(bad) is False, bad
    for undecided in (b"", b"d", b"da", b"data", b"\r\n\r\n", b"\xef\xbb\xbf", b"ret"):
        assert sse_verdict(undecided) is None, undecided


async def test_every_answer_is_counted_and_logged_with_its_reason(fakes, start_router, make_routes, http,
                                                                  caplog) -> None:
    """405s, GET 404s, refused paths and the router's own 400s: counted in
    router_requests_total and logged with their reason (not `"error": null`); probes and
    scrapes answered fine are neither."""
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url]))
    caplog.set_level("INFO", logger="router.access")
    async with http.put(server.url + "/v1/completions", data=b"{}") as r:
        assert r.status == 405
    async with http.get(server.url + "/v2/nothing") as r:
        assert r.status == 404
    await post(http, server.url + "/v1/completions", b'{"model": "sim-a", "prompt": ',
               headers={"X-Request-Id": "own-400"})
    async with http.get(server.url + "/v1/models") as r:
        assert r.status == 200
    for probe in ("/health", "/ready"):
        async with http.get(server.url + probe) as r:
            assert r.status == 200
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    for status, count in (("405", 1), ("404", 1), ("400", 1), ("200", 1)):
        assert f'router_requests_total{{model="none",replica="none",status="{status}"}} {count}.0' in text, status
    await asyncio.sleep(0)
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "router.access"]
    by_path = {(line["method"], line["path"]): line for line in lines}
    assert "not allowed" in by_path[("PUT", "/v1/completions")]["error"]
    assert by_path[("GET", "/v2/nothing")]["error"] == "Not found: GET /v2/nothing"
    own = next(line for line in lines if line["request_id"] == "own-400")
    assert own["status"] == 400 and own["error"].startswith("Malformed JSON")
    assert by_path[("GET", "/v1/models")]["status"] == 200
    assert ("GET", "/health") not in by_path and ("GET", "/metrics") not in by_path
    # The JSON log's keys on every line, the access log's too.
    from router.observability.access_log import RequestRecord, write_access_log

    record = RequestRecord(request_id="r", method="GET", path="/x")
    write_access_log(record, 0.001, "json")
    line = orjson.loads(caplog.records[-1].getMessage())
    assert list(line)[:3] == ["ts", "level", "logger"] and line["logger"] == "router.access"


def test_the_listening_line_is_in_the_logs_format(tmp_path) -> None:
    """With log_format json every stderr line is JSON, the address line included."""
    import subprocess
    import sys

    import yaml

    from tests.conftest import free_port, routes

    port = free_port()
    doc = routes(["http://127.0.0.1:9"], server={"port": port, "log_format": "json", "log_level": "warning"})
    (tmp_path / "routes.yaml").write_text(yaml.safe_dump(doc))
    child = subprocess.Popen([sys.executable, "-m", "router", "--config", str(tmp_path / "routes.yaml")],
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stderr is not None
        first = child.stderr.readline()
    finally:
        child.terminate()
        rest = child.communicate(timeout=20)[1]
    for line in [first, *rest.splitlines()]:
        if line.strip():
            entry = orjson.loads(line)
            assert {"ts", "level", "logger", "message"} <= set(entry), line
    assert orjson.loads(first)["message"].startswith(f"router listening on http://127.0.0.1:{port}")
