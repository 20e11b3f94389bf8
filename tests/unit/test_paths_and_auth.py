"""The forward-path allowlist and the key ring: pure functions, tried with hostile input."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from router.config import AuthConfig, ClientKeyConfig
from router.core.auth import ANONYMOUS, KeyRing, presented_key
from router.errors import RouterError
from router.paths import (
    DEFAULT_FORWARD_PATHS,
    MANAGEMENT_PATHS,
    forward_path_problem,
    is_management_path,
    raw_path_problem,
)

SMUGGLED = [
    "/v1/..%2Fadmin%2Ffaults", "/v1/%2e%2e/admin/faults", "/v1/%2E%2E%2Fadmin%2Ffaults",
    "/v1/chat/completions%3Fx=1", "/v1/chat%2Fcompletions", "/v1//chat/completions",
    "/v1/./chat/completions", "/v1/../admin/faults", "/v1/chat/completions/..",
    "/v1\\..\\admin", "/v1/chat/completions%00", "/v1/chat/completions%23frag",
    "/v1/chat/%63ompletions", "/v1/chat/completions/.", "relative/path", "/v1/\tx",
]


@pytest.mark.parametrize("raw", SMUGGLED)
def test_smuggled_paths_are_refused(raw: str) -> None:
    assert raw_path_problem(raw) is not None


@pytest.mark.parametrize("raw", [*DEFAULT_FORWARD_PATHS, "/v1/completions?api-version=1",
                                 "/health", "/v1/models/llama-3.1-8b"])
def test_plain_paths_pass(raw: str) -> None:
    assert raw_path_problem(raw) is None


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
@settings(max_examples=500)
def test_a_refused_path_never_equals_an_allowed_one(tail: str) -> None:
    """Whatever the bytes, a path either is an allowlist entry byte for byte or is not
    forwarded; anything with encoding or dot segments is refused before comparison."""
    raw = "/" + tail
    if raw_path_problem(raw) is None:
        path = raw.split("?", 1)[0]
        assert "%" not in path and "/../" not in path + "/" and "//" not in path


@pytest.mark.parametrize("path", [*MANAGEMENT_PATHS, "/admin/faults", "/ADMIN/x",
                                  "/v1/load_lora_adapter/", "/sleep"])
def test_management_paths_can_never_be_forwarded(path: str) -> None:
    assert is_management_path(path)
    assert forward_path_problem(path) is not None


def test_forward_path_rules() -> None:
    assert forward_path_problem("/v1/audio/transcriptions") is None
    for bad in ("/v1/models", "/metrics", "/v1/x%2Fy", "v1/x", "/v1/../admin", "/v1/x?y=1"):
        assert forward_path_problem(bad) is not None, bad


def ring(**kw: object) -> KeyRing:
    keys = (ClientKeyConfig(name="team-a", key="sk-team-a-0123456789"),
            ClientKeyConfig(name="team-b", key="sk-team-b-0123456789", models=("m-b",),
                            priority=3))
    return KeyRing(AuthConfig(keys=keys, admin_key="admin-0123456789"), **kw)  # type: ignore[arg-type]


def test_presented_key_forms() -> None:
    assert presented_key({"Authorization": "Bearer abc"}) == "abc"
    assert presented_key({"Authorization": "bearer   abc  "}) == "abc"
    assert presented_key({"Authorization": "Basic abc"}) is None
    assert presented_key({"x-api-key": "abc"}) == "abc"
    assert presented_key({}) is None


def test_keys_identify_clients_and_wrong_ones_are_401() -> None:
    keys = ring()
    a = keys.client({"Authorization": "Bearer sk-team-a-0123456789"}, "127.0.0.1")
    assert a.name == a.identity == "team-a" and a.key is not None and not a.key.models
    b = keys.client({"x-api-key": "sk-team-b-0123456789"}, "127.0.0.1")
    assert b.priority == 3 and b.key is not None and b.key.models == ("m-b",)
    for headers in ({}, {"Authorization": "Bearer sk-team-a-012345678"},
                    {"Authorization": "Bearer sk-team-a-01234567890"},
                    {"Authorization": "Bearer admin-0123456789"}):
        with pytest.raises(RouterError) as info:
            keys.client(headers, "127.0.0.1")
        assert info.value.status == 401 and "WWW-Authenticate" in info.value.headers
        assert "sk-team" not in info.value.message


def test_without_keys_everyone_is_anonymous_by_address() -> None:
    open_ring = KeyRing(AuthConfig())
    client = open_ring.client({}, "10.1.2.3")
    assert client.name == ANONYMOUS and client.identity == "10.1.2.3"


def test_admin_key_and_loopback_rule() -> None:
    keys = ring()
    keys.check_admin({"Authorization": "Bearer admin-0123456789"}, "10.0.0.9")
    for headers in ({}, {"Authorization": "Bearer sk-team-a-0123456789"}):
        with pytest.raises(RouterError) as info:
            keys.check_admin(headers, "127.0.0.1")
        assert info.value.status == 401
    no_admin = KeyRing(AuthConfig())
    no_admin.check_admin({}, "127.0.0.1")
    no_admin.check_admin({}, "::1")
    with pytest.raises(RouterError) as info:
        no_admin.check_admin({}, "10.0.0.9")
    assert info.value.status == 403


def test_without_an_admin_key_the_resolved_client_address_must_be_loopback() -> None:
    """Issue 23 #3: behind a trusted same-host proxy the peer is 127.0.0.1, the client is
    whoever X-Forwarded-For says the proxy served; only a loopback client gets in."""
    behind_proxy = KeyRing(AuthConfig(), [ipaddress.ip_network("127.0.0.1/32")])
    for forwarded in ("6.6.6.6", "127.0.0.1, 6.6.6.6", "2001:db8::1", "not-an-ip"):
        headers = CIMultiDict({"X-Forwarded-For": forwarded})
        with pytest.raises(RouterError) as info:
            behind_proxy.check_admin(headers, "127.0.0.1")
        assert info.value.status == 403, forwarded
        assert not behind_proxy.is_admin(headers, "127.0.0.1")
    for headers in (CIMultiDict(), CIMultiDict({"X-Forwarded-For": "127.0.0.1"}),
                    CIMultiDict({"X-Forwarded-For": "::1, 127.0.0.1"})):
        behind_proxy.check_admin(headers, "127.0.0.1")  # a client on this host, via the proxy
        assert behind_proxy.is_admin(headers, "127.0.0.1")
    # A proxy on this host that nobody declared: its forwarding headers still say the
    # client is elsewhere (a forged one only locks its sender out).
    undeclared = KeyRing(AuthConfig())
    for headers in ({"X-Forwarded-For": "203.0.113.9"}, {"X-Real-IP": "203.0.113.9"},
                    {"Forwarded": 'for="[2001:db8::7]:4711";proto=https'},
                    {"Forwarded": "for=127.0.0.1, for=198.51.100.2"}, {"Forwarded": "for=unknown"}):
        assert not undeclared.is_admin(CIMultiDict(headers), "127.0.0.1"), headers
    for headers in ({"Forwarded": 'for="[::1]:80"'}, {"X-Real-IP": "127.0.0.1"}):
        assert undeclared.is_admin(CIMultiDict(headers), "127.0.0.1"), headers
    # With an admin key, the key decides, from any address.
    keyed = ring(trusted_proxies=[ipaddress.ip_network("127.0.0.1/32")])
    admin = CIMultiDict({"Authorization": "Bearer admin-0123456789", "X-Forwarded-For": "6.6.6.6"})
    assert keyed.is_admin(admin, "127.0.0.1")
    assert not keyed.is_admin(CIMultiDict(), "127.0.0.1")


def test_forwarded_for_only_through_trusted_proxies() -> None:
    proxies = [ipaddress.ip_network("10.0.0.0/8")]
    keys = KeyRing(AuthConfig(), proxies)
    h = CIMultiDict({"X-Forwarded-For": "198.51.100.1, 203.0.113.7"})
    assert keys.client_address(h, "10.0.0.2") == "203.0.113.7"  # rightmost untrusted
    assert keys.client_address(h, "192.0.2.5") == "192.0.2.5"  # untrusted peer: ignored
    chain = CIMultiDict({"X-Forwarded-For": "203.0.113.7, 10.0.0.3"})
    assert keys.client_address(chain, "10.0.0.2") == "203.0.113.7"
    bad = CIMultiDict({"X-Forwarded-For": "203.0.113.7, not-an-ip"})
    assert keys.client_address(bad, "10.0.0.2") == "10.0.0.2"
    assert keys.client_address(CIMultiDict(), "10.0.0.2") == "10.0.0.2"
