"""DNS discovery (router/fleet/discovery/dns.py) against a real DNS server on loopback: Debian's
dnsmasq, answering for `*.test` from a hosts directory that the test rewrites (dnsmasq
re-reads it through inotify), records with a TTL of 1 s.

The replicas are simulators on 127.0.0.2, .3 and .4 (all loopback), on one port, as the
pods of a headless Service are.  Checked through the router's HTTP surface: replicas join
when their record appears (and get traffic only after their first passing probe), a
record's short TTL is followed although the configured interval is 30 s, a replica whose
record goes drains its in-flight stream and leaves, NXDOMAIN empties the model, and a DNS
outage changes nothing."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from _loopback import HOSTS, complete, discovery_state, gone, healthy, long_stream, port_free_on_all, replicas
from conftest import MODEL, routes, wait_async

from engines.sim.process import SimProcess

DNSMASQ = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if Path("/usr/sbin/dnsmasq").exists() else None)
pytestmark = pytest.mark.skipif(DNSMASQ is None, reason="dnsmasq not installed (make test installs "
                                                        "Debian's dnsmasq-base)")
NAME = "replicas.vllm.test"


def dns_port() -> int:
    """A port free for UDP and for TCP on 127.0.0.1 (dnsmasq listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


class Dnsmasq:
    def __init__(self, root: Path, extra: tuple[str, ...] = ()) -> None:
        self.extra = extra  # more dnsmasq options (e.g. --srv-host=...)
        self.hosts_dir = root / "hosts"
        self.hosts_dir.mkdir()
        self.port = dns_port()
        self.log = root / "dnsmasq.log"
        self.proc: subprocess.Popen | None = None

    def serve(self, *addresses: str) -> None:
        """Rewrite the records of NAME (atomically: dnsmasq never reads half a file)."""
        tmp = self.hosts_dir.parent / "fleet.tmp"
        tmp.write_text("".join(f"{a} {NAME}\n" for a in addresses))
        tmp.replace(self.hosts_dir / "fleet")

    def start(self) -> None:
        """Start dnsmasq; a port taken between the probe and its bind is retried on another."""
        assert DNSMASQ is not None
        for _ in range(5):
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [DNSMASQ, "--keep-in-foreground", f"--port={self.port}", "--listen-address=127.0.0.1",
                     "--bind-interfaces", "--no-resolv", "--no-hosts", f"--hostsdir={self.hosts_dir}",
                     "--local=/test/", "--local-ttl=1", "--user=root", "--group=root", "--pid-file=",
                     "--log-facility=-", "--conf-file=/dev/null", *self.extra],
                    stdout=log, stderr=subprocess.STDOUT)
            time.sleep(0.3)
            if self.proc.poll() is None or "Address already in use" not in self.log.read_text():
                break
            self.port = dns_port()
        assert self.proc.poll() is None, self.log.read_text()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


@pytest.fixture
def dnsmasq(tmp_path):
    server = Dnsmasq(tmp_path)
    server.serve()
    server.start()
    yield server
    server.stop()


async def test_dns_discovery_join_leave_ttl_and_outage(dnsmasq, start_router, http):
    port = port_free_on_all(HOSTS)
    sims = [SimProcess(MODEL, host=h, port=port, time_scale=5) for h in HOSTS[:2]]
    await asyncio.gather(*(s.start() for s in sims))
    try:
        a, b = (f"http://{h}:{port}" for h in HOSTS[:2])
        never_up = f"http://{HOSTS[2]}:{port}"
        dnsmasq.serve(HOSTS[0])
        doc = routes([], policy="round_robin")
        doc["models"][0]["discovery"] = {
            "dns": {"name": NAME, "port": port, "nameservers": [f"127.0.0.1:{dnsmasq.port}"],
                    "interval": 30, "min_interval": 0.2, "timeout": 1},
            "backend": {"labels": {"pool": "dns"}}}
        server = await start_router(doc, wait_healthy=False)

        await wait_async(lambda: healthy(http, server.url, a), timeout=10)
        seen = await replicas(http, server.url)
        assert set(seen) == {a} and seen[a]["source"] == "discovery" and seen[a]["labels"] == {"pool": "dns"}

        # A record appears: with interval 30 s only the 1 s TTL can make it join this fast.
        started = time.monotonic()
        dnsmasq.serve(HOSTS[0], HOSTS[1], HOSTS[2])
        await wait_async(lambda: healthy(http, server.url, a, b), timeout=8)
        assert time.monotonic() - started < 8
        seen = await replicas(http, server.url)
        assert seen[never_up]["health"] in ("unknown", "unhealthy")  # listed, never probed OK
        for i in range(12):  # the one that never came up gets none of them
            async with http.post(server.url + "/v1/completions",
                                 json={"model": MODEL, "prompt": f"q{i}", "max_tokens": 2}) as resp:
                assert resp.status == 200
        per_sim = [(await s.metrics()).get("vllm:request_success_total", 0) for s in sims]
        assert sum(per_sim) == 12 and all(n > 0 for n in per_sim), per_sim

        # a's record goes while a stream runs on it (round robin: one on each): it finishes, a leaves.
        streams = [asyncio.create_task(long_stream(http, server.url, MODEL)) for _ in range(2)]
        await asyncio.sleep(0.3)
        dnsmasq.serve(HOSTS[1])
        await wait_async(lambda: gone(http, server.url, a), timeout=8)
        bodies = await asyncio.gather(*streams)
        assert all(body.rstrip().endswith(b"data: [DONE]") for body in bodies)
        assert set(await replicas(http, server.url)) == {b}

        # A DNS outage changes nothing.
        dnsmasq.stop()
        await asyncio.sleep(2.5)
        assert set(await replicas(http, server.url)) == {b}
        assert await complete(http, server.url, MODEL, "during the outage") == 200
        dnsmasq.serve()  # NXDOMAIN once it is back: the model has no replica left
        dnsmasq.start()
        await wait_async(lambda: gone(http, server.url, b), timeout=10)
        assert await complete(http, server.url, MODEL, "nobody") == 503
        state = await discovery_state(http, server.url)
        assert state["kind"] == "dns" and state["errors"] >= 1 and state["endpoints"] == 0
    finally:
        await asyncio.gather(*(s.stop() for s in sims), return_exceptions=True)


async def test_srv_records_give_each_replica_its_port(tmp_path):
    """SRV (a Consul-style name): targets resolved to addresses, ports from the records."""
    from router.config import DnsDiscoveryConfig
    from router.fleet.discovery.dns import DnsSource

    server = Dnsmasq(tmp_path, extra=("--srv-host=_http._tcp.vllm.test,replicas.vllm.test,8001,0,10",
                                      "--srv-host=_http._tcp.vllm.test,replicas.vllm.test,8002,0,10"))
    server.serve(HOSTS[0], HOSTS[1])
    server.start()
    try:
        source = DnsSource(DnsDiscoveryConfig(name="_http._tcp.vllm.test", record="SRV",
                                              nameservers=(("127.0.0.1", server.port),), timeout=1),
                           publish=lambda endpoints: None, failed=lambda reason: None)
        endpoints, ttl = await source.resolve()
        assert sorted((e.host, e.port) for e in endpoints) == sorted(
            (h, p) for h in HOSTS[:2] for p in (8001, 8002))
        assert ttl >= 0
        gone = DnsSource(DnsDiscoveryConfig(name="_none._tcp.vllm.test", record="SRV",
                                            nameservers=(("127.0.0.1", server.port),), timeout=1),
                         publish=lambda endpoints: None, failed=lambda reason: None)
        assert (await gone.resolve())[0] == []  # NXDOMAIN: no replicas
    finally:
        server.stop()
