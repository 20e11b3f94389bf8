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
