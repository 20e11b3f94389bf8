"""The live status page (/admin/status, router/frontdoor/status_page.py) in a real headless
Chromium (Debian's package, `make test` installs it where it can), driven over the DevTools
protocol with aiohttp's websocket client: it loads with no console error or exception,
shows the replicas of a running simulated fleet and the requests just routed, and refreshes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "admin-secret-0123456789"


class DevTools:
    """One page of a headless Chromium, over its DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.problems: list[str] = []  # console errors and uncaught exceptions
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = message.json()
            if "id" in data and data["id"] in self.waiting:
                self.waiting.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                self.problems.append(str(data["params"]["exceptionDetails"]))
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] in ("error", "warning"):
                self.problems.append(str(data["params"]["args"]))
            elif data.get("method") == "Log.entryAdded" and data["params"]["entry"]["level"] in ("error", "warning"):
                self.problems.append(str(data["params"]["entry"]))

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self.ids)
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[number] = done
        await self.ws.send_json({"id": number, "method": method, "params": params})
        answer = await asyncio.wait_for(done, 20)
        assert "error" not in answer, answer
        return dict(answer.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


@contextlib.asynccontextmanager
async def chromium(tmp: Path) -> AsyncIterator[DevTools]:
    assert CHROMIUM is not None
    profile = tmp / "profile"
    process = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1400,900", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port = port_file.read_text().split()[0]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json() if t["type"] == "page"]
            async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=64 << 20) as ws:
                tools = DevTools(ws)
                for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
                    await tools.call(domain)
                yield tools
                tools.reader.cancel()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def _wait_for(tools: DevTools, expression: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await tools.evaluate(expression)
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        await asyncio.sleep(0.2)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian's package; `make test` installs it)")
async def test_the_status_page_shows_the_fleet_and_its_routing_in_chromium(
        make_sims, start_router, make_routes, http, tmp_path) -> None:
    sims = await make_sims(3)
    server = await start_router(make_routes([s.url for s in sims], policy="cache_aware"))
    for n in range(4):
        body = {"model": "sim-a", "messages": [{"role": "system", "content": f"agent {n} " * 60},
                                                {"role": "user", "content": "hi"}], "max_tokens": 4}
        async with http.post(server.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
    async with chromium(tmp_path) as tools:
        await tools.call("Page.navigate", url=server.url + "/admin/status")
        await _wait_for(tools, "document.querySelectorAll('#replicas tr').length === 3")
        table = await tools.evaluate("document.getElementById('replicas').innerText")
        assert all(s.url in table for s in sims) and table.count("healthy") == 3
        recent = await _wait_for(tools, "document.getElementById('recent').innerText")
        assert recent.count("/v1/chat/completions") == 4 and "sim-a" in recent
        assert "prefill" in recent  # the decision's cost terms
        cards = await tools.evaluate("document.getElementById('cards').innerText")
        assert "3 / 3" in cards
        # It refreshes: a new request appears without reloading the page.
        async with http.post(server.url + "/v1/completions",
                             json={"model": "sim-a", "prompt": "later", "max_tokens": 2}) as r:
            assert r.status == 200
        await _wait_for(tools, "document.getElementById('recent').innerText.includes('/v1/completions\\t')")
        shot = await tools.call("Page.captureScreenshot", format="png")
        (tmp_path / "status.png").write_bytes(base64.b64decode(shot["data"]))
        assert await tools.evaluate("document.getElementById('error').textContent") == ""
        assert tools.problems == []


async def test_the_status_page_is_admin_protected_and_asks_a_browser_for_the_key(
        fakes, start_router, make_routes, http) -> None:
    (fake,) = await fakes(1)
    server = await start_router(make_routes([fake.url], auth={"admin_key": KEY}))
    for path in ("/admin/status", "/admin/status.json"):
        async with http.get(server.url + path) as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic ")
        basic = base64.b64encode(f"operator:{KEY}".encode()).decode()
        async with http.get(server.url + path, headers={"Authorization": f"Basic {basic}"}) as r:
            assert r.status == 200
        wrong = base64.b64encode(b"operator:not-the-key").decode()
        async with http.get(server.url + path, headers={"Authorization": f"Basic {wrong}"}) as r:
            assert r.status == 401
    async with http.get(server.url + "/admin/status", headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
        page = await r.text()
    # No external asset: no URL at all, and every src/href an inline data: one.
    assert "http:" not in page and "https:" not in page and "url(" not in page
    assert all(target.startswith("data:") for target in re.findall(r'(?:src|href)="([^"]*)"', page))
    async with http.get(server.url + "/admin/status.json", headers={"Authorization": f"Bearer {KEY}"}) as r:
        data = await r.json()
    assert data["summary"]["replicas"] == 1 and data["fleet"]["replicas"][0]["url"] == fake.url
