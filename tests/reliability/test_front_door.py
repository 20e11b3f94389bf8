"""The front door, tried from outside the way it was attacked: paths, keys, admin, CORS,
client addresses, and secrets that must never show.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import orjson
import pytest

from router.config import AuthConfig
from router.core.auth import KeyRing

FAULTS_BODY = b'{"fail_rate": 1.0, "model": "sim-a"}'
TRAVERSALS = [
    "/v1/..%2Fadmin%2Ffaults", "/v1/%2e%2e/admin/faults", "/v1/%2E%2E%2Fadmin%2Ffaults",
    "/v1/..%2F..%2Fadmin%2Ffaults", "/v1/chat/completions/..%2F..%2F..%2Fadmin%2Ffaults",
    "/v1/../admin/faults", "/v1/./../admin/faults", "/v1%2F..%2Fadmin%2Ffaults",
    "/v1/completions%3F/../../admin/faults", "/admin/faults", "//admin/faults",
    "/v1\\..\\admin\\faults", "/admin%2Ffaults", "/reset_prefix_cache", "/admin/reset",
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/sleep", "/wake_up",
    "/collective_rpc", "/start_profile", "/v1/anything", "/v1/completions/../../admin/faults",
]


def _request(method: str, path: str, body: bytes = b"", headers: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{headers}Connection: close\r\n\r\n").encode() + body


async def test_no_path_trick_reaches_a_replica_endpoint(make_sim, start_router, make_routes,
                                                        http, raw_http) -> None:
    sim = await make_sim()
    server = await start_router(make_routes([sim.url]))
    for path in TRAVERSALS:
        status, headers, body = await raw_http(server.url, _request("POST", path, FAULTS_BODY))
        assert status in (400, 404, 405), (path, status, body)
        assert headers["content-type"].startswith("application/json")
        assert set(orjson.loads(body)["error"]) == {"message", "type", "param", "code"}
    async with http.get(sim.url + "/admin/faults") as r:
        faults = await r.json()
    assert faults["fail_rate"] == 0.0, "a client reached the replica's /admin/faults"
    # The allowed paths still work, and the query string never travels.
    status, _, body = await raw_http(server.url, _request(
        "POST", "/v1/completions?x=%2e%2e", b'{"model":"sim-a","prompt":"hi","max_tokens":2}'))
    assert status == 200, body
    async with http.get(server.url + "/metrics") as r:
        assert 'router_rejections_total{reason="bad_path"}' in await r.text()


async def test_query_strings_are_not_forwarded(fakes, start_router, make_routes, http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url]))
    async with http.post(server.url + "/v1/completions?api-version=2024-01-01&x=/admin",
                         json={"model": "sim-a", "prompt": "x"}) as r:
        assert r.status == 200
    assert fake.seen[-1][0] == "/v1/completions"


KEY_A = "sk-team-a-0123456789abcdef"
KEY_B = "sk-team-b-0123456789abcdef"
ADMIN = "admin-0123456789abcdef"
BACKEND_KEY = "backend-secret-0123456789"


def _auth_routes(make_routes, fake_url: str, **extra: dict) -> dict:
    return make_routes([{"url": fake_url, "api_key": BACKEND_KEY}],
                       auth={"keys": [{"name": "team-a", "key": KEY_A},
                                      {"name": "team-b", "key": KEY_B, "models": ["alias-a"]}],
                             "admin_key": ADMIN, **extra})


async def test_client_keys(fakes, start_router, make_routes, http, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    (fake,) = await fakes(1, models=("sim-a", "sim-a-lora"))
    server = await start_router(_auth_routes(make_routes, fake.url))
    url = server.url + "/v1/completions"
    body = {"model": "sim-a", "prompt": "x"}
    for headers in ({}, {"Authorization": "Bearer wrong-key-123456"}, {"Authorization": KEY_A},
                    {"Authorization": f"Basic {KEY_A}"}, {"x-api-key": KEY_A[:-1]}):
        async with http.post(url, json=body, headers=headers) as r:
            payload = await r.json()
            assert r.status == 401, headers
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert payload["error"]["type"] == "AuthenticationError"
    assert not fake.seen  # nothing unauthenticated reached the replica
    for headers in ({"Authorization": f"Bearer {KEY_A}"}, {"x-api-key": KEY_A}):
        async with http.post(url, json=body, headers=headers) as r:
            assert r.status == 200
    # The replica gets its own key, never the client's credentials.
    for _, seen_headers, _ in fake.seen:
        assert seen_headers["Authorization"] == f"Bearer {BACKEND_KEY}"
        assert "x-api-key" not in seen_headers
    # A key limited to some models: others do not exist for it.
    b = {"Authorization": f"Bearer {KEY_B}"}
    async with http.post(url, json=body, headers=b) as r:
        assert r.status == 200  # alias-a is sim-a: allowed through its alias
    async with http.post(url, json={"model": "sim-a-lora", "prompt": "x"}, headers=b) as r:
        payload = await r.json()
        assert r.status == 404 and "do not have access" in payload["error"]["message"]
        assert "sim-a-lora" not in payload["error"]["message"].split("Valid models:")[1]
    async with http.get(server.url + "/v1/models", headers=b) as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["sim-a", "alias-a"]
    async with http.get(server.url + "/v1/models") as r:
        assert r.status == 401
    async with http.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY_A}"}) as r:
        assert {m["id"] for m in (await r.json())["data"]} >= {"sim-a", "alias-a"}
    # Probes stay open: load balancers and Kubernetes call them without keys.
    for path in ("/health", "/ready"):
        async with http.get(server.url + path) as r:
            assert r.status == 200
    # Secrets never appear in logs, metrics or the admin view; the key's name does.
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with http.get(server.url + "/admin/replicas", headers=admin) as r:
        replicas = await r.text()
    async with http.get(server.url + "/metrics") as r:
        metrics = await r.text()
    for text in (caplog.text, replicas, metrics):
        for secret in (KEY_A, KEY_B, ADMIN, BACKEND_KEY):
            assert secret not in text
    assert '"key":"team-b"' in caplog.text


async def test_admin_endpoints_and_metrics_need_the_admin_key(fakes, start_router, make_routes,
                                                              http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(_auth_routes(make_routes, fake.url, protect_metrics=True))
    for path in ("/admin/replicas", "/metrics"):
        for headers in ({}, {"Authorization": f"Bearer {KEY_A}"}):
            async with http.get(server.url + path, headers=headers) as r:
                assert r.status == 401, (path, headers)
                assert (await r.json())["error"]["code"] == 401
        async with http.get(server.url + path, headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            assert r.status == 200
    # Without an admin key, /admin answers loopback clients only.  X-Forwarded-For from a
    # peer that is not a trusted proxy never makes a client loopback; on a loopback
    # connection it says a proxy on this host (one nobody declared) forwarded the request
    # for someone elsewhere, so it is refused (issue 23 #3).
    open_server = await start_router(make_routes([fake.url]))
    async with http.get(open_server.url + "/admin/replicas") as r:
        assert r.status == 200
    async with http.get(open_server.url + "/admin/replicas",
                        headers={"X-Forwarded-For": "203.0.113.9"}) as r:
        assert r.status == 403
    with pytest.raises(Exception) as info:
        KeyRing(AuthConfig()).check_admin({}, "198.51.100.4")
    assert getattr(info.value, "status", None) == 403


@contextlib.asynccontextmanager
async def listener():
    """A TCP port on loopback that counts the connections made to it (a would-be replica)."""
    seen: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(1)
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()
        await server.wait_closed()


def assert_error(status: int, payload: dict, expected: int) -> dict:
    assert status == expected and set(payload) == {"error"}, payload
    error = payload["error"]
    assert error["code"] == expected and {"message", "type", "param"} <= set(error)
    return error


async def test_admin_behind_a_same_host_proxy_answers_only_loopback_clients(
        fakes, start_router, make_routes, http) -> None:
    """Issue 23 #3: `trusted_proxies: [127.0.0.1/32]`, no admin key: a request the proxy
    forwards for 6.6.6.6 must not register (or probe) anything, nor read admin data."""
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url], server={"trusted_proxies": ["127.0.0.1/32"]},
                                            auth={"protect_metrics": True}))
    router = server.router
    outside = {"X-Forwarded-For": "6.6.6.6"}
    async with listener() as (target, connections):
        async with http.post(server.url + "/admin/replicas", headers=outside,
                             json={"model": "m", "url": target}) as r:
            assert_error(r.status, await r.json(), 403)
        for method, path in (("GET", "/admin/replicas"), ("POST", "/admin/reload"),
                             ("DELETE", "/admin/replicas"), ("GET", "/metrics")):
            async with http.request(method, server.url + path, headers=outside,
                                    json={"url": fake.url}) as r:
                assert_error(r.status, await r.json(), 403)
        await asyncio.sleep(0.3)  # three probe intervals: a registered replica would be probed
        assert connections == []
    assert [r.url for r in router.fleet] == [fake.url]
    assert [m.name for m in router.config.models] == ["sim-a"]
    # The ready probe tells the outside client only whether the router is ready.
    async with http.get(server.url + "/ready", headers=outside) as r:
        assert r.status == 200 and await r.json() == {"ready": True, "draining": False}
    # A client on this host, through the same proxy, is a loopback client.
    for inside in ({"X-Forwarded-For": "127.0.0.1"}, {}):
        async with http.get(server.url + "/admin/replicas", headers=inside) as r:
            assert r.status == 200, inside
        async with http.get(server.url + "/ready", headers=inside) as r:
            assert (await r.json())["models"] == {"sim-a": {"healthy": 1, "total": 1}}


async def test_ready_names_models_only_to_the_admin(fakes, start_router, make_routes, http) -> None:
    """Issue 23 #9: a key's 404 does not say whether a model exists; /ready must not either."""
    (fake,) = await fakes(1)
    server = await start_router(_auth_routes(make_routes, fake.url))
    for headers in ({}, {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": "Bearer wrong-0123456789"}):
        async with http.get(server.url + "/ready", headers=headers) as r:
            assert r.status == 200 and await r.json() == {"ready": True, "draining": False}, headers
    async with http.get(server.url + "/ready", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert (await r.json())["models"] == {"sim-a": {"healthy": 1, "total": 1}}
    server.router.api.draining = True  # not ready: the same bare answer, with its 503
    async with http.get(server.url + "/ready") as r:
        assert r.status == 503 and await r.json() == {"ready": False, "draining": True}


async def test_registration_stays_inside_the_allowed_networks(fakes, start_router, make_routes,
                                                            http) -> None:
    """Issue 23 #3: with the admin key, registration may point the router only into
    auth.admin_replica_networks (default: loopback and the hosts already served)."""
    (fake, extra) = await fakes(2)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    server = await start_router(_auth_routes(make_routes, fake.url))
    url = server.url + "/admin/replicas"
    port = extra.url.rsplit(":", 1)[1]
    for body, param in (({"url": "http://169.254.169.254"}, "url"),  # cloud metadata
                        ({"url": "http://0.0.0.0:" + port}, "url"),
                        ({"url": "http://10.255.255.1:8000"}, "url"),  # no backend there
                        ({"url": extra.url, "kv_events": {"endpoint": "tcp://10.255.255.1:5557"}},
                         "kv_events.endpoint")):
        async with http.post(url, headers=admin, json={"model": "m", **body}) as r:
            error = assert_error(r.status, await r.json(), 403)
        assert error["param"] == param and "auth.admin_replica_networks" in error["message"], body
    assert [r.url for r in server.router.fleet] == [fake.url]
    # Loopback is in the default, by address or by a name resolving only to loopback.
    async with http.post(url, headers=admin, json={"model": "sim-a", "url": f"http://localhost:{port}"}) as r:
        assert r.status == 201, await r.text()
    # A list replaces the default: here loopback is not in it.
    listed = await start_router(_auth_routes(make_routes, fake.url, admin_replica_networks=["10.0.0.0/8"]))
    async with listener() as (target, connections):
        async with http.post(listed.url + "/admin/replicas", headers=admin,
                             json={"model": "m", "url": target}) as r:
            assert_error(r.status, await r.json(), 403)
        await asyncio.sleep(0.3)
        assert connections == []  # refused before anything was probed
    assert [r.url for r in listed.router.fleet] == [fake.url]


async def test_cors(fakes, start_router, make_routes, http) -> None:
    (fake,) = await fakes(1)
    origin = "https://app.example.com"
    server = await start_router(make_routes([fake.url], cors={"allow_origins": [origin]}))
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    async with http.options(server.url + "/v1/chat/completions", headers=preflight) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == origin
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert "x-stainless-os" in r.headers["Access-Control-Allow-Headers"]
        assert int(r.headers["Access-Control-Max-Age"]) > 0
    for bad in ({**preflight, "Origin": "https://evil.example"},
                {**preflight, "Access-Control-Request-Method": "DELETE"},
                {**preflight, "Access-Control-Request-Headers": "x-secret-thing"}):
        async with http.options(server.url + "/v1/chat/completions", headers=bad) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    # Answers to an allowed origin carry the headers: JSON, errors, and streams.
    async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": "x"},
                         headers={"Origin": origin}) as r:
        assert r.headers["Access-Control-Allow-Origin"] == origin
        assert "X-Request-Id" in r.headers["Access-Control-Expose-Headers"]
        assert "Origin" in r.headers["Vary"]
    async with http.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"},
                         headers={"Origin": origin}) as r:
        assert r.status == 404 and r.headers["Access-Control-Allow-Origin"] == origin
    async with http.get(server.url + "/v1/models", headers={"Origin": "https://evil.example"}) as r:
        assert "Access-Control-Allow-Origin" not in r.headers
    # Without `cors:`, a plain OPTIONS is answered (no more 405) and no CORS header is sent.
    plain = await start_router(make_routes([fake.url]))
    async with http.options(plain.url + "/v1/chat/completions") as r:
        assert r.status == 204 and "POST" in r.headers["Allow"]
    async with http.options(plain.url + "/v1/chat/completions", headers=preflight) as r:
        assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers


async def test_cors_headers_on_a_stream(make_sim, start_router, make_routes, http) -> None:
    sim = await make_sim()
    server = await start_router(make_routes([sim.url], cors={"allow_origins": ["*"]}))
    async with http.post(server.url + "/v1/completions", headers={"Origin": "https://x.example"},
                         json={"model": "sim-a", "prompt": "hello", "max_tokens": 3,
                               "stream": True}) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert (await r.read()).endswith(b"data: [DONE]\n\n")


async def test_forwarded_for_from_trusted_proxies_only(fakes, start_router, make_routes, http,
                                                       caplog) -> None:
    caplog.set_level(logging.INFO, logger="router.access")
    (fake,) = await fakes(1)
    trusted = await start_router(make_routes([fake.url],
                                             server={"trusted_proxies": ["127.0.0.0/8"]}))
    untrusted = await start_router(make_routes([fake.url]))
    spoof = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
    for server, expected in ((trusted, "203.0.113.7"), (untrusted, "127.0.0.1")):
        caplog.clear()
        async with http.post(server.url + "/v1/completions", json={"model": "sim-a", "prompt": "x"},
                             headers=spoof) as r:
            assert r.status == 200
        line = next(orjson.loads(rec.getMessage()) for rec in caplog.records
                    if rec.name == "router.access")
        assert line["client"] == expected
    # The header is the router's business: the replica never receives the client's.
    assert all("X-Forwarded-For" not in h for _, h, _ in fake.seen)
