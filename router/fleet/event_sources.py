"""Where a replica publishes its KV events, when routes.yaml does not say: ``GET /kv_event_sources``.

vLLM serves its publisher configuration at ``/kv_event_sources``: a list with one entry per
data-parallel rank, ``{"data_parallel_rank", "endpoint", "replay_endpoint", "topic"}``.  A
publisher that binds (``tcp://*:5557``) is reached at the replica's own host, so a ``*`` or a
wildcard address in the advertised endpoint is replaced by the host of the replica's URL.
The entry of rank 0 is used (one engine per replica URL, as the router counts them).

`discover` asks once, bounded by ``timeout``; a replica that answers 404 (an older vLLM,
another server), an empty list (events off) or garbage has no events: None.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import orjson

DEFAULT_TIMEOUT = 2.0
_WILDCARDS = ("*", "0.0.0.0", "[::]", "::")


@dataclass(frozen=True, slots=True)
class EventSource:
    endpoint: str
    replay_endpoint: str | None
    topic: str


def reachable(endpoint: str, replica_url: str) -> str:
    """`endpoint` with a wildcard host replaced by the replica's host."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return endpoint
    host, colon, port = rest.rpartition(":")
    if not colon or host not in _WILDCARDS:
        return endpoint
    replica_host = urlsplit(replica_url).hostname or "127.0.0.1"
    if ":" in replica_host:
        replica_host = f"[{replica_host}]"
    return f"{scheme}://{replica_host}:{port}"


def parse_sources(data: object, replica_url: str) -> EventSource | None:
    """The rank-0 (or first) entry of a /kv_event_sources answer."""
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        return None
    entries = [e for e in data if isinstance(e, dict) and isinstance(e.get("endpoint"), str)
               and e["endpoint"].startswith("tcp://")]
    if not entries:
        return None
    entry = next((e for e in entries if e.get("data_parallel_rank") in (0, None)), entries[0])
    replay = entry.get("replay_endpoint")
    topic = entry.get("topic")
    return EventSource(endpoint=reachable(entry["endpoint"], replica_url),
                       replay_endpoint=reachable(replay, replica_url) if isinstance(replay, str) and replay else None,
                       topic=topic if isinstance(topic, str) else "")


async def discover(session: aiohttp.ClientSession, replica_url: str, api_key: str | None = None, *,
                   timeout: float = DEFAULT_TIMEOUT) -> EventSource | None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with asyncio.timeout(timeout):
            async with session.get(replica_url + "/kv_event_sources", headers=headers) as resp:
                if resp.status != 200:
                    return None
                data = orjson.loads(await resp.read())
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return None
    return parse_sources(data, replica_url)
