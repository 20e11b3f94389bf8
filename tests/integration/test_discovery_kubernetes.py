"""Kubernetes discovery (router/fleet/discovery/kubernetes.py) against a stand-in API server.

No Kubernetes API server can run on our machines.  This test serves, on loopback, the
two requests the informer makes - LIST and WATCH of
``/apis/discovery.k8s.io/v1/namespaces/NS/endpointslices?labelSelector=...`` - in the API's
wire format: an ``EndpointSliceList`` with ``metadata.resourceVersion``, then a chunked
stream of ``{"type": ..., "object": ...}`` lines (ADDED, MODIFIED, DELETED, BOOKMARK, and
an ERROR carrying a 410 ``Status``, as kube-apiserver sends when a resourceVersion has
expired).  The objects are written from the API reference (discovery.k8s.io/v1), not
captured from a live cluster; the router has not been run against a live cluster.  The
client side is the real one: kubernetes_asyncio, a kubeconfig with a bearer token.

The replicas are simulators on 127.0.0.2 and .3 (one port, like pods)."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from _loopback import HOSTS, complete, discovery_state, gone, healthy, long_stream, port_free_on_all, replicas
from aiohttp import web
from conftest import MODEL, routes, wait_async

from engines.sim.process import SimProcess

pytest.importorskip("kubernetes_asyncio")
NAMESPACE, SERVICE, TOKEN = "llm", "vllm", "test-token-7f3a"
SLICES_PATH = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"


def endpoint(address: str, pod: str, *, ready: bool = True, terminating: bool = False) -> dict:
    return {"addresses": [address],
            "conditions": {"ready": ready, "serving": ready or terminating, "terminating": terminating},
            "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod,
                          "uid": f"uid-{pod}"},
            "nodeName": "node-a", "zone": "zone-1"}


def endpoint_slice(name: str, port: int, endpoints: list[dict], version: int) -> dict:
    return {
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": name, "generateName": f"{SERVICE}-", "namespace": NAMESPACE,
                     "uid": f"uid-{name}", "resourceVersion": str(version),
                     "generation": version, "creationTimestamp": "2026-12-01T10:00:00Z",
                     "labels": {"kubernetes.io/service-name": SERVICE,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": SERVICE,
                                          "uid": "uid-service", "controller": True,
                                          "blockOwnerDeletion": True}]},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "protocol": "TCP", "port": port},
                  {"name": "metrics", "protocol": "TCP", "port": 9090}],
    }


class FakeApiServer:
    """LIST and WATCH of EndpointSlices; `change()` moves the state and tells the watchers."""

    def __init__(self) -> None:
        self.version = 100
        self.slices: dict[str, dict] = {}
        self.watchers: list[asyncio.Queue] = []
        self.lists = 0
        self.selectors: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(SLICES_PATH, self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        for queue in self.watchers:
            queue.put_nowait(None)
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "reason": "Unauthorized", "code": 401}, status=401)
        self.selectors.append(request.query.get("labelSelector", ""))
        if request.query.get("watch", "").lower() not in ("true", "t", "1"):  # Go ParseBool
            self.lists += 1
            return web.json_response({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                                      "metadata": {"resourceVersion": str(self.version)},
                                      "items": [copy.deepcopy(s) for s in self.slices.values()]})
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        queue: asyncio.Queue = asyncio.Queue()
        self.watchers.append(queue)
        try:
            while (line := await queue.get()) is not None:
                await response.write(json.dumps(line).encode() + b"\n")
                if line["type"] == "ERROR":
                    break
        finally:
            self.watchers.remove(queue)
        return response

    def change(self, kind: str, name: str, port: int = 0, endpoints: list[dict] | None = None, *,
               silent: bool = False) -> None:
        """ADDED / MODIFIED / DELETED of one slice (silent: the state moves, no event is sent,
        as if the watch had missed it)."""
        self.version += 1
        if kind == "DELETED":
            obj = self.slices.pop(name)
            obj["metadata"]["resourceVersion"] = str(self.version)
        else:
            obj = self.slices[name] = endpoint_slice(name, port, endpoints or [], self.version)
        if not silent:
            for queue in self.watchers:
                queue.put_nowait({"type": kind, "object": copy.deepcopy(obj)})

    def bookmark(self) -> None:
        for queue in self.watchers:
            queue.put_nowait({"type": "BOOKMARK", "object": {
                "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": str(self.version)}}})

    def expire(self) -> None:
        """The watch's resourceVersion is too old: kube-apiserver's 410 ERROR event."""
        for queue in self.watchers:
            queue.put_nowait({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "too old resource version: 100 (150)", "reason": "Expired", "code": 410}})


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server}}],
        "users": [{"name": "router", "user": {"token": TOKEN}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "router",
                                                  "namespace": NAMESPACE}}]}))
    return path


async def test_kubernetes_discovery_follows_endpoint_slices(tmp_path, start_router, http):
    port = port_free_on_all(HOSTS)
    sims = [SimProcess(MODEL, host=h, port=port, time_scale=5) for h in HOSTS[:2]]
    api = FakeApiServer()
    await asyncio.gather(api.start(), *(s.start() for s in sims))
    a, b = (f"http://{h}:{port}" for h in HOSTS[:2])
    try:
        # One ready pod, one not ready yet.
        api.change("ADDED", "vllm-x1", port, [endpoint(HOSTS[0], "vllm-0"),
                                              endpoint(HOSTS[1], "vllm-1", ready=False)])
        doc = routes([], policy="round_robin")
        doc["models"][0]["discovery"] = {"kubernetes": {
            "namespace": NAMESPACE, "service": SERVICE, "port_name": "http", "resync": 60,
            "kubeconfig": str(kubeconfig(tmp_path / "kubeconfig", api.url))}}
        server = await start_router(doc, wait_healthy=False)

        await wait_async(lambda: healthy(http, server.url, a), timeout=10)
        seen = await replicas(http, server.url)
        assert set(seen) == {a}, seen  # the pod that is not ready is not a replica
        assert seen[a]["labels"] == {"pod": "vllm-0", "zone": "zone-1", "node": "node-a"}
        assert seen[a]["source"] == "discovery"
        assert api.selectors[0] == f"kubernetes.io/service-name={SERVICE}"
        await wait_async(lambda: _watching(api), timeout=5)

        # vllm-1 becomes ready (a watch event) and joins.
        api.bookmark()
        api.change("MODIFIED", "vllm-x1", port, [endpoint(HOSTS[0], "vllm-0"), endpoint(HOSTS[1], "vllm-1")])
        await wait_async(lambda: healthy(http, server.url, a, b), timeout=8)

        # vllm-0 terminates while a stream runs on it: drained, then gone.
        streams = [asyncio.create_task(long_stream(http, server.url, MODEL)) for _ in range(2)]
        await asyncio.sleep(0.3)
        api.change("MODIFIED", "vllm-x1", port, [endpoint(HOSTS[0], "vllm-0", ready=False, terminating=True),
                                                 endpoint(HOSTS[1], "vllm-1")])
        await wait_async(lambda: gone(http, server.url, a), timeout=5)
        assert all(b_.rstrip().endswith(b"data: [DONE]") for b_ in await asyncio.gather(*streams))

        # A change the watch misses, then 410 Gone: the informer lists again and catches up.
        lists = api.lists
        api.change("MODIFIED", "vllm-x1", port, [endpoint(HOSTS[0], "vllm-0")], silent=True)
        api.expire()
        await wait_async(lambda: healthy(http, server.url, a), timeout=10)
        assert set(await replicas(http, server.url)) == {a} and api.lists == lists + 1

        # The API server goes away: nothing changes, requests still served.
        await wait_async(lambda: _watching(api), timeout=5)
        await api.stop()
        await asyncio.sleep(2)
        assert set(await replicas(http, server.url)) == {a}
        assert await complete(http, server.url, MODEL, "q") == 200
        state = await discovery_state(http, server.url)
        assert state["kind"] == "kubernetes" and state["errors"] >= 1 and state["endpoints"] == 1
    finally:
        await api.stop()
        await asyncio.gather(*(s.stop() for s in sims), return_exceptions=True)


async def test_a_deleted_slice_takes_its_replicas_away(tmp_path, start_router, http):
    port = port_free_on_all(HOSTS)
    sim = SimProcess(MODEL, host=HOSTS[0], port=port, time_scale=5)
    api = FakeApiServer()
    await asyncio.gather(api.start(), sim.start())
    try:
        api.change("ADDED", "vllm-x1", port, [endpoint(HOSTS[0], "vllm-0")])
        doc = routes([], policy="round_robin")
        doc["models"][0]["discovery"] = {"kubernetes": {
            "namespace": NAMESPACE, "selector": {"app": "vllm"}, "port": port,
            "kubeconfig": str(kubeconfig(tmp_path / "kubeconfig", api.url))}}
        server = await start_router(doc, wait_healthy=False)
        await wait_async(lambda: _present(http, server.url, f"http://{HOSTS[0]}:{port}"), timeout=10)
        assert api.selectors[0] == "app=vllm"
        await wait_async(lambda: _watching(api), timeout=5)
        started = time.monotonic()
        api.change("DELETED", "vllm-x1")
        await wait_async(lambda: gone(http, server.url, f"http://{HOSTS[0]}:{port}"), timeout=5)
        assert time.monotonic() - started < 5
        assert await complete(http, server.url, MODEL, "q") == 503
    finally:
        await api.stop()
        await sim.stop()


async def _watching(api: FakeApiServer) -> bool:
    return bool(api.watchers)


async def _present(http: aiohttp.ClientSession, url: str, replica: str) -> bool:
    return replica in await replicas(http, url)
