"""Where the admin API may point the router: the networks a registered replica may be in.

Why: ``POST /admin/replicas`` makes the router probe a URL, poll its /metrics and
/v1/models, send it clients' requests and subscribe to its KV-event endpoints.  Unbounded,
a stolen admin key would make the router a request-forgery tool: it reaches what it can
reach (cloud metadata at 169.254.169.254, services on its own host, the internal network)
and reports what answered.  So every host a registration names (the URL's, and the
``kv_events`` endpoints') must lie in the allowed networks:

* ``auth.admin_replica_networks`` (CIDRs) when set: exactly those (``[]``: none at all);
* unset: loopback, plus the addresses of the hosts the router already serves from (its
  ``backends:``, launched engines, discovered replicas): a replica registered beside the
  known ones, and no further, until the operator names the networks.
* Link-local addresses (169.254.0.0/16, fe80::/10: where cloud metadata answers), AWS's
  IPv6 metadata address, unspecified ("this host": a connect to 0.0.0.0 or :: reaches
  loopback) and multicast addresses are refused unless a listed network lies inside that
  range: named on purpose, not swept in by a wide ``0.0.0.0/0``.

A hostname is resolved with ``loop.getaddrinfo`` (off the event loop) within a timeout, and
*every* address it resolves to must be allowed; one that does not resolve in time is
refused.  An ``ipc://`` or ``inproc://`` KV-event endpoint is on this host, so it counts as
loopback.  What this cannot see: a name whose answer changes after the check (DNS
rebinding); register addresses, or list only networks whose every host is acceptable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from urllib.parse import urlsplit

from router.config import BackendConfig
from router.errors import RouterError

log = logging.getLogger("router.replica_networks")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str], Awaitable[list[str]]]

CONFIG_KEY = "auth.admin_replica_networks"
RESOLVE_TIMEOUT_S = 2.0  # one name's resolution; then the registration is refused
LOOPBACK: tuple[IpNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
# Refused unless a listed network lies inside the range (see the module docstring).
ALWAYS_REFUSED: tuple[IpNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8",  # unspecified / "this host"
    "169.254.0.0/16",  # IPv4 link-local: cloud metadata (169.254.169.254)
    "224.0.0.0/4", "255.255.255.255/32",  # multicast, broadcast
    "::/128",  # unspecified
    "fe80::/10",  # IPv6 link-local
    "fd00:ec2::254/128",  # AWS's IPv6 instance metadata
    "ff00::/8",  # multicast
))
_LOCAL_SCHEMES = ("ipc://", "inproc://")


def ip(text: str) -> IpAddress | None:
    """`text` as an IP address (IPv4-mapped IPv6 as the IPv4 address), or None."""
    try:
        address = ipaddress.ip_address(text.partition("%")[0])  # no IPv6 zone
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _in(address: IpAddress, networks: Iterable[IpNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def allowed(address: IpAddress, networks: Sequence[IpNetwork]) -> bool:
    """Is `address` in `networks`, with the always-refused ranges named on purpose?"""
    special = [r for r in ALWAYS_REFUSED if r.version == address.version and address in r]
    if not special:
        return _in(address, networks)
    return any(net.version == address.version and address in net
               and any(_inside(net, r) for r in special)
               for net in networks)


def _inside(net: IpNetwork, outer: IpNetwork) -> bool:
    """`net` lies inside `outer` (of the same version)."""
    return net.network_address in outer and net.broadcast_address in outer


def registration_hosts(backend: BackendConfig) -> list[tuple[str, str]]:
    """(param, host) of every place a registered backend makes the router connect to."""
    hosts = [("url", urlsplit(backend.url).hostname or "")]
    for param, endpoint in (("kv_events.endpoint", backend.kv_events_endpoint),
                            ("kv_events.replay_endpoint", backend.kv_replay_endpoint)):
        if endpoint is None:
            continue
        if endpoint.startswith(_LOCAL_SCHEMES):
            hosts.append((param, "127.0.0.1"))  # a socket of this host
        else:
            hosts.append((param, urlsplit(endpoint).hostname or ""))
    return hosts


async def system_resolver(host: str) -> list[str]:
    """Every address `host` resolves to (the loop's getaddrinfo: off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class ReplicaNetworks:
    """The check one registration goes through (built per check: the config may change)."""

    def __init__(self, networks: Sequence[IpNetwork] | None, known_hosts: Callable[[], Iterable[str]], *,
                 resolve: Resolver = system_resolver, timeout: float = RESOLVE_TIMEOUT_S) -> None:
        self.networks = tuple(networks) if networks is not None else None
        self.known_hosts = known_hosts  # the default's hosts, read only when needed
        self.resolve = resolve
        self.timeout = timeout
        self._known: set[IpAddress] | None = None

    async def check(self, hosts: Sequence[tuple[str, str]]) -> None:
        """RouterError 403 (nothing registered) unless every address of every host is allowed."""
        for param, host in hosts:
            addresses = await self._addresses(param, host)
            refused = [a for a in addresses if not await self._allows(a)]
            if refused:
                log.warning("admin registration refused: %s host %s resolves to %s, outside %s",
                            param, host, ", ".join(map(str, refused)), CONFIG_KEY)
                shown = ", ".join(map(str, refused[:4]))
                raise RouterError(403, f"'{param}' points outside the networks replicas may be "
                                       f"registered in ({host} is {shown}); to allow it, list its "
                                       f"network in {CONFIG_KEY}", param=param)

    async def _addresses(self, param: str, host: str) -> list[IpAddress]:
        literal = ip(host)
        if literal is not None:
            return [literal]
        found: list[IpAddress] = []
        if host:  # (an endpoint without a host names no address to allow)
            try:
                async with asyncio.timeout(self.timeout):
                    found = [a for a in map(ip, await self.resolve(host)) if a is not None]
            except (OSError, TimeoutError, UnicodeError):
                found = []
        if not found:
            raise RouterError(403, f"'{param}': the host {host!r} did not resolve within "
                                   f"{self.timeout:g}s, so it cannot be checked against "
                                   f"{CONFIG_KEY}", param=param)
        return found

    async def _allows(self, address: IpAddress) -> bool:
        if self.networks is not None:
            return allowed(address, self.networks)
        if allowed(address, LOOPBACK):
            return True
        if _in(address, ALWAYS_REFUSED):
            return False  # the default never names these on purpose
        return address in await self._known_addresses()

    async def _known_addresses(self) -> set[IpAddress]:
        """The default's addresses: the known hosts' literals, and their names resolved."""
        if self._known is None:
            addresses: set[IpAddress] = set()
            names: list[str] = []
            for host in set(self.known_hosts()):
                literal = ip(host)
                if literal is not None:
                    addresses.add(literal)
                elif host:
                    names.append(host)
            if names:
                results = await asyncio.gather(*(self._resolve_quietly(n) for n in names))
                addresses.update(a for found in results for a in found)
            self._known = addresses
        return self._known

    async def _resolve_quietly(self, host: str) -> list[IpAddress]:
        try:
            async with asyncio.timeout(self.timeout):
                return [a for a in map(ip, await self.resolve(host)) if a is not None]
        except (OSError, TimeoutError, UnicodeError) as exc:
            log.info("known replica host %s did not resolve (%s): not in the default allowlist",
                     host, exc or type(exc).__name__)
            return []
