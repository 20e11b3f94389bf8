"""Who a request comes from: its client key, its address, and whether it may administer.

* **Client keys** (``auth.keys``).  With none configured, the API is open (the router's
  first deployments sit behind something that authenticates).  With keys, every API
  request needs one, as ``Authorization: Bearer KEY`` (OpenAI clients) or ``x-api-key:
  KEY`` (Anthropic clients, for ``/v1/messages``); a missing or wrong key is a 401.  A key
  may be limited to some models (others are a 404, as if they did not exist, so a key
  learns nothing about models it cannot use), carries an admission priority and its own
  rate limits.
* **Comparison.**  The presented key is hashed (SHA-256) and looked up by its digest.  What
  the lookup's timing could reveal is about the digest of the guess, and a guess that
  shares a prefix with a real key has an unrelated digest, so the time taken says nothing
  about how much of a key was guessed, nor depends on how many keys exist (the admin key,
  a single secret, is compared with ``hmac.compare_digest``).  Keys are kept only as
  digests here.
* **The admin credential** (``auth.admin_key``) guards ``/admin/*``, ``/metrics`` with
  ``auth.protect_metrics``, and the per-model details of ``/ready``.  Without one, those
  answer only a client on this host: its *resolved* address (below) must be loopback, so a
  request a trusted same-host proxy forwards for 6.6.6.6 is 6.6.6.6's, not the proxy's.
  And every address a forwarding header names (``X-Forwarded-For``, ``X-Real-IP``,
  ``Forwarded: for=``) must be loopback too, even from a peer that is not a trusted proxy:
  such a header on a loopback connection says a proxy on this host forwarded it, one the
  operator did not declare in ``server.trusted_proxies``, and the client is elsewhere.  A
  forged header can only lock its sender out, never let anyone in.
* **Client address** (for the access log, per-client rate limits and fairness): the TCP
  peer, unless the peer is one of ``server.trusted_proxies``; then ``X-Forwarded-For`` is
  read from the right, skipping trusted proxies, and the first other address is the client.
  A client cannot forge its address through a proxy that appends to the header, and an
  untrusted peer's header is ignored.

Secrets never appear in logs, metrics or messages: only the key's ``name`` does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping

from router.config import AuthConfig, ClientKeyConfig
from router.core.clients import ANONYMOUS, Client
from router.errors import RouterError

_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The client's key from ``Authorization: Bearer`` or ``x-api-key``, if any."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def basic_password(headers: Mapping[str, str]) -> str | None:
    """The password of ``Authorization: Basic``: the admin key as a browser sends it (the
    status page's 401 asks for it; the user name is not read)."""
    auth = headers.get("Authorization")
    if not auth:
        return None
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip() or len(token) > 4096:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, colon, password = decoded.partition(":")
    return password if colon and password else None


def unauthorized(message: str = "Invalid or missing API key. Send it as 'Authorization: "
                 "Bearer KEY'.") -> RouterError:
    return RouterError(401, message, type="AuthenticationError",
                       headers={"WWW-Authenticate": 'Bearer realm="router"'})


class KeyRing:
    """The client keys and the admin credential, as digests."""

    def __init__(self, config: AuthConfig, trusted_proxies: Iterable[IpNetwork] = ()) -> None:
        self._keys: dict[bytes, ClientKeyConfig] = {_digest(k.key): k for k in config.keys}
        self._admin = _digest(config.admin_key) if config.admin_key else None
        self.protect_metrics = config.protect_metrics
        self.trusted_proxies = tuple(trusted_proxies)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def _lookup(self, secret: str | None) -> ClientKeyConfig | None:
        if secret is None:
            return None
        return self._keys.get(_digest(secret))

    def client(self, headers: Mapping[str, str], peer: str | None) -> Client:
        """Who sent this API request; 401 when keys are configured and none matches."""
        address = self.client_address(headers, peer)
        if not self._keys:
            return Client(ANONYMOUS, address or ANONYMOUS, address)
        key = self._lookup(presented_key(headers))
        if key is None:
            raise unauthorized()
        return Client(key.name, key.name, address, key)

    def check_admin(self, headers: Mapping[str, str], peer: str | None) -> None:
        """401/403 unless the request may use an admin endpoint."""
        problem = self._admin_problem(headers, peer)
        if problem is not None:
            raise problem

    def is_admin(self, headers: Mapping[str, str], peer: str | None) -> bool:
        """Would `check_admin` let this request in?  (For answers with an admin-only part.)"""
        return self._admin_problem(headers, peer) is None

    def _admin_problem(self, headers: Mapping[str, str], peer: str | None) -> RouterError | None:
        if self._admin is None:
            if not self._on_this_host(headers, peer):
                return RouterError(403, "Admin endpoints answer only clients on this host (a "
                                        "loopback address, also behind a proxy) unless "
                                        "auth.admin_key is configured")
            return None
        secret = presented_key(headers) or basic_password(headers)
        if secret is None or not hmac.compare_digest(_digest(secret), self._admin):
            return unauthorized("Invalid or missing admin key")
        return None

    def _on_this_host(self, headers: Mapping[str, str], peer: str | None) -> bool:
        """The client's resolved address is loopback, and so is every address a
        forwarding header names (see the module docstring)."""
        if not _is_loopback(self.client_address(headers, peer)):
            return False
        return all(_is_loopback(address) for address in forwarded_addresses(headers))

    # -- addresses ------------------------------------------------------------------
    def _trusted(self, address: str | None) -> bool:
        ip = _ip(address)
        return ip is not None and any(ip in net for net in self.trusted_proxies)

    def client_address(self, headers: Mapping[str, str], peer: str | None) -> str | None:
        """The client's address: the peer, or X-Forwarded-For through trusted proxies."""
        if not self.trusted_proxies or not self._trusted(peer):
            return peer
        getall = getattr(headers, "getall", None)
        forwarded = ",".join(getall("X-Forwarded-For", []) if getall is not None
                             else [headers.get("X-Forwarded-For", "")])
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        for hop in reversed(hops):
            if _ip(hop) is None:
                return peer  # a malformed header: trust only what we saw
            if not self._trusted(hop):
                return hop
        return hops[0] if hops else peer


def _values(headers: Mapping[str, str], name: str) -> list[str]:
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, []))
    value = headers.get(name)
    return [value] if value is not None else []


def forwarded_addresses(headers: Mapping[str, str]) -> list[str]:
    """Every client address the forwarding headers name: ``X-Forwarded-For`` hops,
    ``X-Real-IP``, ``Forwarded``'s ``for=`` (quotes, brackets and ports taken off; an
    obfuscated or ``unknown`` node stays as it is, and is not an IP address)."""
    found = [hop.strip() for value in _values(headers, "X-Forwarded-For")
             for hop in value.split(",") if hop.strip()]
    found += [value.strip() for value in _values(headers, "X-Real-IP") if value.strip()]
    for value in _values(headers, "Forwarded"):
        for element in value.split(","):
            for pair in element.split(";"):
                name, _, node = pair.strip().partition("=")
                if name.strip().lower() == "for":
                    found.append(_forwarded_node(node.strip().strip('"')))
    return found


def _forwarded_node(node: str) -> str:
    """RFC 7239 node -> address: ``[v6]:port`` -> v6, ``v4:port`` -> v4."""
    if node.startswith("["):
        return node[1:].partition("]")[0]
    if node.count(":") == 1:
        return node.partition(":")[0]
    return node


def _ip(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not address:
        return None
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


def _is_loopback(address: str | None) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip in net for net in _LOOPBACK)
