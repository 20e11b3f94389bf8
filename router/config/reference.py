"""The configuration reference (docs/configuration.md), generated from the config dataclasses
so that it cannot drift from the code: ``python -m router.config.reference > docs/configuration.md``
(tests/unit/test_docs.py fails when the page is stale).

Each section's keys are the ones its parser accepts: asked of the parser itself (a key it
does not know is refused with the list of those it does, yamlcheck.Node.mapping).  Each key's
type and default are its dataclass field's, and its one-line doc the comment on the field's
line, or the class docstring's first sentence for a nested section.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import io
import re
import sys
import tokenize
from collections.abc import Mapping
from typing import Any

from router.config import (
    admission,
    auth,
    backends,
    breaker,
    cors,
    discovery,
    health,
    launch,
    models,
    prefix,
    proxy,
    routing,
    server,
)
from router.config.loader import parse_config
from yamlcheck import ConfigError

_PROBE = "zz_reference_probe"
_MINIMAL = {"models": [{"name": "m", "backends": ["http://127.0.0.1:9"]}]}

# (key path as the page shows it, where to put the probe in a minimal file, the dataclass)
SECTIONS: tuple[tuple[str, tuple[Any, ...], type], ...] = (
    ("server", ("server",), server.ServerConfig),
    ("auth", ("auth",), auth.AuthConfig),
    ("auth.keys[]", ("auth", "keys", 0), auth.ClientKeyConfig),
    ("auth.keys[].rate_limit", ("auth", "keys", 0, "rate_limit"), auth.RateLimitConfig),
    ("cors", ("cors",), cors.CorsConfig),
    ("admission", ("admission",), admission.AdmissionConfig),
    ("models[]", ("models", 0), models.ModelConfig),
    ("models[].backends[]", ("models", 0, "backends", 0), backends.BackendConfig),
    ("models[].lora", ("models", 0, "lora"), models.LoraConfig),
    ("models[].disaggregation", ("models", 0, "disaggregation"), models.DisaggregationConfig),
    ("models[].discovery", ("models", 0, "discovery"), discovery.DiscoveryConfig),
    ("models[].discovery.dns", ("models", 0, "discovery", "dns"), discovery.DnsDiscoveryConfig),
    ("models[].discovery.kubernetes", ("models", 0, "discovery", "kubernetes"),
     discovery.KubernetesDiscoveryConfig),
    ("routing", ("routing",), routing.RoutingConfig),
    ("prefix", ("prefix",), prefix.PrefixConfig),
    ("prefix.exact", ("prefix", "exact"), prefix.ExactConfig),
    ("health", ("health",), health.HealthConfig),
    ("metrics", ("metrics",), health.MetricsConfig),
    ("proxy", ("proxy",), proxy.ProxyConfig),
    ("proxy.hedge", ("proxy", "hedge"), proxy.HedgeConfig),
    ("circuit_breaker", ("circuit_breaker",), breaker.CircuitBreakerConfig),
    ("launch", ("launch",), launch.LaunchConfig),
)
# What a probe's parent must hold to reach the probe (its required keys).
_PARENTS: dict[tuple[Any, ...], dict[str, Any]] = {
    ("auth", "keys", 0): {"name": "probe", "key": "probe-key-0123456789"},
    ("models", 0, "backends", 0): {"url": "http://127.0.0.1:9"},
    ("launch",): {"config": "engines.yaml"},
}


def _probe_document(where: tuple[Any, ...]) -> dict[str, Any]:
    """A minimal valid file with an unknown key at `where` (its parents made as needed)."""
    doc: dict[str, Any] = copy.deepcopy(_MINIMAL)
    container: Any = doc
    for depth, token in enumerate(where):
        following = where[depth + 1] if depth + 1 < len(where) else None
        if isinstance(token, int):
            while len(container) <= token:
                container.append({})
            if not isinstance(container[token], dict):  # (a backend given as a bare URL)
                container[token] = {}
            child = container[token]
        else:
            child = container.get(token)
            wanted = list if isinstance(following, int) else dict
            if not isinstance(child, wanted):
                child = container[token] = wanted()
        if isinstance(child, dict):
            child.update(_PARENTS.get(where[:depth + 1], {}))
        container = child
    container[_PROBE] = 1
    return doc


def allowed_keys(where: tuple[Any, ...]) -> list[str]:
    """The keys the parser accepts at `where`: its answer to a key it does not know."""
    try:
        parse_config(_probe_document(where), "<reference>", env={})
    except ConfigError as exc:
        found = re.search(r"\(allowed: ([^)]*)\)", exc.message)
        if found and _PROBE in exc.path:
            return [key.strip() for key in found.group(1).split(",")]
        raise RuntimeError(f"probing {where}: {exc}") from None
    raise RuntimeError(f"probing {where}: the parser accepted an unknown key")


def _field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """Field name -> (its annotation, the comment on its line or just above it), from one
    parse of the class's source."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    whole_lines: set[int] = set()  # comments on a line of their own
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
            if token.line.strip().startswith("#"):
                whole_lines.add(token.start[0])
    out: dict[str, tuple[str, str]] = {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    for item in body.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            text = comments.get(item.end_lineno or item.lineno) or comments.get(item.lineno)
            above = item.lineno - 1
            if text is None and above in whole_lines:
                lines: list[str] = []
                while above in whole_lines:
                    lines.insert(0, comments[above])
                    above -= 1
                text = " ".join(lines)
            out[item.target.id] = (ast.unparse(item.annotation), text or "")
    return out


_TYPE_WORDS = (
    (r"ipaddress\.IPv4Network \| ipaddress\.IPv6Network", "CIDR"),
    (r"tuple\[([^\[\]]+), \.\.\.\]", r"list of \1"),
    (r"Mapping\[str, ([^\[\]]+)\]", r"map of \1"),
    (r"([A-Za-z]+)Config", r"\1 section"),
    (r" \| None$", " or null"),
    (r"\bstr\b", "string"), (r"\bint\b", "integer"), (r"\bfloat\b", "number"), (r"\bbool\b", "true/false"),
    (r"\bAny\b", "any"),
)

# Keys a parser reads into another field (the secret's source) or that have no field of their own.
_KEY_DOCS = {
    "kv_events": "this backend's KV-event publisher (vLLM's --kv-events-config): `endpoint`, "
                 "`replay_endpoint`, `topic`; see [KV events and exact mode](routing.md)",
    "backend": "what each discovered replica gets, as a backend entry of `models[].backends[]` "
               "(tensor_parallel_size, weight, labels, api_key...)",
    "models": "the engines' models to start (engines.yaml's own keys)",
}


def _type(annotation: str) -> str:
    text = annotation
    for pattern, word in _TYPE_WORDS:
        text = re.sub(pattern, word, text)
    return text


def _key_doc(key: str, fields: Mapping[str, Any]) -> str:
    for suffix, source in (("_env", "the environment variable named here"), ("_file", "the file named here")):
        if key.endswith(suffix) and key[:-len(suffix)] in fields:
            return f"`{key[:-len(suffix)]}` read from {source} (a secret kept out of the file)"
    if key == "keys_file":
        return "more `keys` entries, read from this YAML file"
    return _KEY_DOCS.get(key, "")


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "see below"
    return "`" + _yaml(value) + "`"


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list, frozenset, set)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def _summary(cls: type, top: bool) -> str:
    """The class's docstring, or for a top-level section without one its module's."""
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(cls.__name__ + "("):  # the signature dataclass writes when there is none
        doc = (sys.modules[cls.__module__].__doc__ or "").strip() if top else ""
    return " ".join(doc.split("\n\n")[0].split())


def render() -> str:
    lines = [
        "# Configuration reference (`routes.yaml`)",
        "",
        "Generated from the configuration's dataclasses and parsers (`router/config/`) by",
        "`python -m router.config.reference > docs/configuration.md`; `make test` fails when this",
        "page is stale. Each section lists the keys its parser accepts, with the type and default",
        "of the field it fills. A key not listed is refused with its key path (`router",
        "check-config` lists every problem of a file at once). How the sections fit together:",
        "[Getting started](getting-started.md) and the example `config/routes.yaml`.",
        "",
    ]
    for path, where, cls in SECTIONS:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        docs = _field_docs(cls)
        summary = _summary(cls, top="." not in path and "[" not in path)
        lines += [f"## `{path}`", "", *([summary, ""] if summary else []),
                  "| key | type | default | what |", "|---|---|---|---|"]
        for key in allowed_keys(where):
            f = fields.get(key)
            if f is None:
                lines.append(f"| `{key}` | | | {_key_doc(key, fields) or _nested_note(path, key)} |")
                continue
            annotation, doc = docs.get(key, ("", ""))
            annotation, doc = _type(annotation).replace("|", "\\|"), doc.replace("|", "\\|")
            lines.append(f"| `{key}` | `{annotation}` | {_default(f).replace('|', chr(92) + '|')} | {doc} |")
        lines.append("")
    return "\n".join(lines)


def _nested_note(path: str, key: str) -> str:
    nested = f"{path}.{key}"
    for candidate in (nested, nested + "[]"):
        if any(p == candidate for p, _, _ in SECTIONS):
            return f"a section: see `{candidate}`"
    return "read by the section's parser (see its docs)"


if __name__ == "__main__":
    sys.stdout.write(render())
