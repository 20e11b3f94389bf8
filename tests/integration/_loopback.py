"""Helpers for tests whose replicas live on several loopback addresses (127.0.0.2, .3, .4)
on one port, as the pods behind a Kubernetes Service or a DNS name do."""

from __future__ import annotations

import socket

import aiohttp

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def port_free_on_all(hosts: tuple[str, ...] = HOSTS) -> int:
    """A TCP port free on every one of `hosts`."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every loopback address")


async def replicas(http: aiohttp.ClientSession, url: str) -> dict[str, dict]:
    """The router's /admin/replicas, by replica URL."""
    async with http.get(url + "/admin/replicas") as resp:
        assert resp.status == 200
        return {r["url"]: r for r in (await resp.json())["replicas"]}


async def gone(http: aiohttp.ClientSession, url: str, replica: str) -> bool:
    return replica not in await replicas(http, url)


async def healthy(http: aiohttp.ClientSession, url: str, *replica_urls: str) -> bool:
    """Is every one of `replica_urls` a healthy replica of the router at `url`?"""
    seen = await replicas(http, url)
    return all(seen.get(u, {}).get("health") == "healthy" for u in replica_urls)


async def long_stream(http: aiohttp.ClientSession, url: str, model: str) -> bytes:
    """A 200-token streamed completion through the router, read to its end."""
    async with http.post(url + "/v1/completions",
                         json={"model": model, "prompt": "long", "max_tokens": 200, "stream": True}) as resp:
        return await resp.read()


async def complete(http: aiohttp.ClientSession, url: str, model: str, prompt: str) -> int:
    """A two-token completion through the router; its status."""
    async with http.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 2}) as resp:
        await resp.read()
        return resp.status


async def discovery_state(http: aiohttp.ClientSession, url: str) -> dict:
    """The first discovery source's state in the router's /admin/replicas."""
    async with http.get(url + "/admin/replicas") as resp:
        return (await resp.json())["discovery"][0]
