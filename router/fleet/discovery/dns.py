"""DNS discovery: a name whose A/AAAA (or SRV) records are a model's replicas.

A Kubernetes headless Service (``vllm.NAMESPACE.svc.cluster.local`` lists each ready pod's
address), a Consul service name (``vllm.service.consul``, A or SRV), or any zone an
operator keeps.  The name is re-resolved after the answer's TTL, clamped to
``[min_interval, interval]``: a short TTL is followed at once, a long one never delays a
change beyond ``interval``.  Resolution uses dnspython's asyncio resolver (the system's
resolv.conf, or the configured name servers), so it never blocks the event loop.

Answers:
* records → the endpoints (SRV: each target's A/AAAA addresses with the record's port;
  a target of "." means "no service" and is skipped);
* NXDOMAIN or no records of that type → no endpoints: the replicas leave (an empty
  headless Service is NXDOMAIN in CoreDNS);
* a timeout, SERVFAIL or no reachable name server → nothing changes; retried after
  ``min_interval``, doubling up to ``interval``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from router.config import DnsDiscoveryConfig
from router.fleet.discovery.endpoints import Endpoint, Publish

log = logging.getLogger("router.discovery.dns")

MAX_SRV_TARGETS = 1024  # targets resolved per SRV answer


class DnsSource:
    """Resolves one name on a TTL-driven schedule and publishes its endpoints."""

    def __init__(self, config: DnsDiscoveryConfig, publish: Publish, failed: Callable[[str], None]) -> None:
        self.config = config
        self.publish = publish
        self.failed = failed
        self.resolver = dns.asyncresolver.Resolver(configure=not config.nameservers)
        if config.nameservers:
            self.resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                         for host, port in config.nameservers]
        self.resolver.lifetime = config.timeout
        self.resolver.timeout = config.timeout
        self.resolver.cache = None  # the TTL schedule is ours; a cache would hide changes

    async def run(self) -> None:
        cfg = self.config
        retry = cfg.min_interval
        while True:
            try:
                endpoints, ttl = await self.resolve()
            except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout,
                    OSError) as exc:
                reason = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("DNS discovery of %s failed (replicas unchanged): %s", cfg.name, reason)
                self.failed(reason)
                await asyncio.sleep(retry)
                retry = min(retry * 2, cfg.interval)
                continue
            retry = cfg.min_interval
            self.publish(endpoints)
            await asyncio.sleep(min(max(float(ttl), cfg.min_interval), cfg.interval))

    async def resolve(self) -> tuple[list[Endpoint], int]:
        """(endpoints, the answer's TTL); no endpoints (and interval) for NXDOMAIN / no records."""
        cfg = self.config
        try:
            if cfg.record == "SRV":
                return await self._srv()
            answer = await self.resolver.resolve(cfg.name, cfg.record, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [], int(cfg.interval)
        assert cfg.port is not None
        rrset = answer.rrset
        if rrset is None:
            return [], int(cfg.interval)
        hosts = sorted({r.address for r in rrset})
        return [Endpoint(h, cfg.port) for h in hosts], rrset.ttl

    async def _srv(self) -> tuple[list[Endpoint], int]:
        answer = await self.resolver.resolve(self.config.name, "SRV", search=False)
        rrset = answer.rrset
        if rrset is None:
            return [], int(self.config.interval)
        ttl = rrset.ttl
        endpoints: list[Endpoint] = []
        records = sorted(rrset, key=lambda r: (r.priority, -r.weight, str(r.target)))[:MAX_SRV_TARGETS]
        for record in records:
            target = str(record.target).rstrip(".")
            if not target:
                continue  # "." : the service is decidedly not available
            for rdtype in ("A", "AAAA"):
                try:
                    addresses = await self.resolver.resolve(target, rdtype, search=False)
                except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                    continue
                if addresses.rrset is not None:
                    ttl = min(ttl, addresses.rrset.ttl)
                    endpoints.extend(Endpoint(a.address, record.port) for a in addresses.rrset)
        return endpoints, ttl
