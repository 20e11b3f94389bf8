"""Stored responses on their replica (router/core/response_ids.py): the id the router has vLLM
give a response names its replica, and every follow-up (previous_response_id, GET, resumed
stream, cancel) goes there, through any router process in front of the fleet."""

from __future__ import annotations

import orjson

from router.core.response_ids import ResponseIds


def _seen_ids(fake) -> list[str]:
    return [orjson.loads(body)["request_id"] for path, _, body in fake.seen if path == "/v1/responses"]


async def test_responses_get_an_id_naming_their_replica_and_follow_ups_go_there(
        fakes, start_router, make_routes, http) -> None:
    fleet = await fakes(3)
    routes = make_routes([f.url for f in fleet], policy="round_robin")
    # Two router processes (as with --workers 2 or two pods) sharing nothing but the config.
    first, second = await start_router(routes), await start_router(routes)
    ids = ResponseIds()
    created = []
    for i in range(6):
        async with http.post(first.url + "/v1/responses",
                             json={"model": "sim-a", "input": f"task {i}"}) as r:
            assert r.status == 200
            created.append((await r.json())["url"])
    for fake in fleet:
        for rid in _seen_ids(fake):  # vLLM uses the body's request_id as the response id
            token = ResponseIds.token_of(rid)
            assert token is not None and token == ids.token(next(
                rep for rep in first.router.fleet if rep.url == fake.url))
    chains = [(fake, rid) for fake in fleet for rid in _seen_ids(fake)]
    assert len(chains) == 6
    for n, (holder, rid) in enumerate(chains):
        router = (first, second)[n % 2]  # alternating router processes
        before = {f.url: len(f.seen) for f in fleet}
        async with http.post(router.url + "/v1/responses", json={
                "model": "sim-a", "input": "next turn", "previous_response_id": rid}) as r:
            assert r.status == 200 and (await r.json())["url"] == holder.url
        async with http.get(router.url + f"/v1/responses/{rid}?stream=true&starting_after=3&x=evil") as r:
            assert r.status == 200 and (await r.json())["method"] == "GET"
        async with http.post(router.url + f"/v1/responses/{rid}/cancel") as r:
            assert r.status == 200 and (await r.json())["path"] == f"/v1/responses/{rid}/cancel"
        for fake in fleet:  # the three follow-ups reached the holder, and no other replica
            assert len(fake.seen) - before[fake.url] == (3 if fake is holder else 0)
        get_path = holder.seen[-2][0]
        assert get_path == f"/v1/responses/{rid}?stream=true&starting_after=3"  # only vLLM's params


async def test_a_follow_up_whose_replica_is_gone_is_a_clear_404(fakes, start_router, make_routes,
                                                                http) -> None:
    fleet = await fakes(2)
    server = await start_router(make_routes([f.url for f in fleet], policy="round_robin"))
    gone = ResponseIds().new_id(type("R", (), {"url": "http://127.0.0.1:9"})())  # a replica not in the fleet
    for method, path, body in (
            ("POST", "/v1/responses", {"model": "sim-a", "input": "x", "previous_response_id": gone}),
            ("GET", f"/v1/responses/{gone}", None),
            ("POST", f"/v1/responses/{gone}/cancel", None),
            ("GET", "/v1/responses/resp_0123456789abcdef0123456789abcdef", None)):  # not the router's
        async with http.request(method, server.url + path, json=body) as r:
            payload = await r.json()
            assert r.status == 404, (path, payload)
            assert payload["error"]["type"] == "invalid_request_error"
            assert payload["error"]["message"].startswith("Response with id '")
    assert not any(f.seen for f in fleet)  # nothing reached a replica
    async with http.get(server.url + "/v1/responses/" + "resp_" + "a" * 300) as r:
        assert r.status == 404


async def test_a_client_chosen_request_id_is_kept(fakes, start_router, make_routes, http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url]))
    async with http.post(server.url + "/v1/responses",
                         json={"model": "sim-a", "input": "x", "request_id": "resp_mine"}) as r:
        assert r.status == 200
    assert _seen_ids(fake) == ["resp_mine"]


async def test_stored_responses_obey_keys_and_model_access(fakes, start_router, make_routes, http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url], auth={"keys": [
        {"name": "a", "key": "key-a-0123456789"},
        {"name": "b", "key": "key-b-0123456789", "models": ["other"]}]}))
    rid = ResponseIds().new_id(server.router.fleet.for_model("sim-a")[0])
    async with http.get(server.url + f"/v1/responses/{rid}") as r:
        assert r.status == 401
    async with http.get(server.url + f"/v1/responses/{rid}",
                        headers={"x-api-key": "key-b-0123456789"}) as r:
        assert r.status == 404  # a model the key may not use: as if it did not exist
    async with http.get(server.url + f"/v1/responses/{rid}",
                        headers={"Authorization": "Bearer key-a-0123456789"}) as r:
        assert r.status == 200
    assert len(fake.seen) == 1


def test_replica_tokens_are_cached_within_a_bound() -> None:
    from router.core import response_ids

    ids = ResponseIds("a-secret-of-16-chars")
    replica = type("R", (), {"url": "http://10.0.0.1:8000"})()
    first = ids.token(replica)
    assert ids.token(replica) == first and ResponseIds("other-secret-0123456").token(replica) != first
    for i in range(response_ids.MAX_CACHED_TOKENS + 10):
        ids.token(type("R", (), {"url": f"http://10.0.{i // 250}.{i % 250}:8000"})())
    assert len(ids._tokens) <= response_ids.MAX_CACHED_TOKENS
    assert ids.token(replica) == first  # recomputed, the same
