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
* **The admin credential** (``auth.admin_key``) guards ``/admin/*`` and, with
  ``auth.protect_metrics``, ``/metrics``.  Without one, those answer only clients on
  loopback (the peer address itself, never X-Forwarded-For).
* **Client address** (for the access log, per-client rate limits and fairness): the TCP
  peer, unless the peer is one of ``server.trusted_proxies``; then ``X-Forwarded-For`` is
  read from the right, skipping trusted proxies, and the first other address is the client.
  A client cannot forge its address through a proxy that appends to the header, and an
  untrusted peer's header is ignored.

Secrets never appear in logs, metrics or messages: only the key's ``name`` does.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from router.config import AuthConfig, ClientKeyConfig
from router.errors import RouterError

ANONYMOUS = "anonymous"
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


@dataclass(frozen=True, slots=True)
class Client:
    """The caller of one request, as admission and routing see it."""

    name: str  # the key's name, or ANONYMOUS
    identity: str  # rate-limit and fairness bucket: the key's name, else the address
    address: str | None
    key: ClientKeyConfig | None = None

    @property
    def priority(self) -> int:
        return self.key.priority if self.key is not None else 0


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
        if self._admin is None:
            if not _is_loopback(peer):
                raise RouterError(403, "Admin endpoints answer only loopback clients unless "
                                       "auth.admin_key is configured")
            return
        secret = presented_key(headers)
        if secret is None or not hmac.compare_digest(_digest(secret), self._admin):
            raise unauthorized("Invalid or missing admin key")

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
