"""How the scalar values of routes.yaml are read, for every section alike: numbers with bounds,
header names, URLs, paths relative to the file, secrets (inline, ``*_env`` or ``*_file``, never
quoted in an error), ZMQ endpoints and IP networks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from yamlcheck import Node, describe


def number(parent: Node, key: str, default: float, *, minimum: float = 0.0,
         exclusive: bool = True, maximum: float | None = None) -> float:
    return parent.get(key, default).number(minimum=minimum, exclusive_minimum=exclusive,
                                           maximum=maximum)


def integer(parent: Node, key: str, default: int | None, *, minimum: int | None = None,
         maximum: int | None = None) -> int:
    return parent.get(key, default).integer(minimum=minimum, maximum=maximum)


def header_name(node: Node) -> str:
    value = node.string()
    if any(c in value for c in " \t\r\n:"):
        node.fail(f"expected an HTTP header name, found {describe(value)}")
    return value


def url_value(node: Node) -> str:
    value = node.string().strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        node.fail(f"expected an http(s) URL like http://127.0.0.1:8101, found {describe(value)}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        node.fail(f"expected a valid port in the URL, found {describe(value)}")
    if parts.username is not None or parts.password is not None:
        # Never quote the value: it holds a credential.
        node.fail("credentials in the URL are not allowed (URLs are logged and shown in metrics); "
                  "put the replica's key in api_key, api_key_env or api_key_file")
    if parts.query or parts.fragment:
        node.fail(f"expected a base URL without query or fragment, found {describe(value)}")
    return value.rstrip("/")


def resolve_path(value: str, base_dir: Path | None) -> Path:
    path = Path(value)
    return path if path.is_absolute() or base_dir is None else base_dir / path


def read_secret(node: Node, name: str, env: Mapping[str, str], base_dir: Path | None, *,
            required: bool = False, min_length: int = 1) -> str | None:
    """The secret `name` of a mapping node, from `name`, `name_env` or `name_file`.

    At most one of the three may be given.  Error messages name the key, the variable or
    the file, never the secret itself.
    """
    given = [k for k in (name, f"{name}_env", f"{name}_file") if node.has(k)]
    if len(given) > 1:
        node.get(given[1]).fail(f"give only one of {name}, {name}_env, {name}_file")
    if not given:
        if required:
            node.get(name, None).fail(f"required: one of {name}, {name}_env, {name}_file")
        return None
    key = given[0]
    source = node.get(key)
    if key == name:
        if not isinstance(source.value, str):
            source.fail("expected a string (quote it in YAML)")
        value = source.value
    elif key.endswith("_env"):
        var = source.string()
        if var not in env:
            source.fail(f"environment variable '{var}' is not set")
        value = env[var]
    else:
        path = resolve_path(source.string(), base_dir)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            source.fail(f"cannot read the secret file {path}: {exc.strerror or exc}")
    if len(value.strip()) < min_length:
        source.fail(f"expected a secret of at least {min_length} characters")
    if any(c.isspace() or ord(c) < 0x21 for c in value):
        source.fail("the secret must not contain whitespace or control characters")
    return value


def zmq_endpoint(node: Node) -> str:
    value = node.string()
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        node.fail(f"expected a ZMQ endpoint like tcp://127.0.0.1:5557, found {describe(value)}")
    return value


def network(node: Node) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    value = node.string()
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        node.fail(f"expected an IP address or CIDR like 10.0.0.0/8, found {describe(value)}")


def networks_or_default(node: Node) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
    """A list of CIDRs; null (or absent) keeps the default (None), [] allows nothing."""
    if node.value is None:
        return None
    return tuple(network(item) for item in node.items())
