"""Hostile input from outside: fuzzed bodies and malformed HTTP, against a real router process.

The router and a simulated replica run as child processes (as in production), and the
client is a plain socket or `http.client`, so nothing here can hide a dropped connection
or a traceback behind an in-process shortcut.  What must hold for every input:

* no 5xx caused by client input: the body is judged (400/404/413/415/422...), never crashes;
* every error is the OpenAI JSON shape with the right content type;
* a malformed request is one warning line in the log, never an ERROR or a traceback.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engines.sim.process import SimProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL = "sim-a"
FUZZ_CASES = int(os.environ.get("ROUTER_FUZZ_CASES", "1500"))  # per strategy below


class RouterChild:
    """One router process on loopback with its log in a file; sync, for hypothesis tests."""

    def __init__(self, tmp: Path, backend: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "server": {"host": "127.0.0.1", "port": self.port, "header_timeout": 2,
                       "body_timeout": 2, "max_body_bytes": 1 << 20, "log_format": "text"},
            "models": [{"name": MODEL, "aliases": ["alias-a"], "backends": [backend]}],
            "health": {"interval": 0.2},
            "proxy": {"read_timeout": 20, "deadline": 30},
        }
        self.config_path = tmp / "routes.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "router.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "router", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.log()
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def why_failing(self) -> str:
        """What the router and its replica logged about failing attempts: a 5xx here is
        rare and timing-dependent (seen on CI only), and its first cause is otherwise lost
        (hypothesis reports the shrunk example, which fails only because the first failures
        opened the replica's breaker)."""
        lines = [line for line in self.log().splitlines()
                 if "failed before the answer" in line or "circuit breaker" in line
                 or "router.monitor" in line or " WARNING " in line or " ERROR " in line]
        sim_log = self.log_path.with_name("sim.log")
        sim_tail = sim_log.read_text(errors="replace")[-3000:] if sim_log.exists() else ""
        return "router:\n" + "\n".join(lines[-30:]) + "\nsimulator (tail):\n" + sim_tail

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def router(tmp_path_factory) -> Iterator[RouterChild]:
    tmp = tmp_path_factory.mktemp("fuzz")
    sim = SimProcess(model=MODEL, time_scale=1000.0, log_path=tmp / "sim.log",
                     args=["--default-output-len", "3", "--max-model-len", "2048"]).start_sync()
    child = RouterChild(tmp, sim.url)
    try:
        yield child
    finally:
        child.stop()
        sim.stop_sync()
        sim._cleanup_log()


class Client:
    """A keep-alive `http.client` connection that reconnects when the server closes it."""

    def __init__(self, url: str) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None
             ) -> tuple[int, str, bytes]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            try:
                self.conn.request("POST", path, body=body, headers={
                    "Content-Type": "application/json", **(headers or {})})
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                return resp.status, resp.getheader("Content-Type", ""), data
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                self.close()  # a kept-alive connection the server had closed: once more
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def assert_openai_answer(status: int, content_type: str, data: bytes, what: Any) -> None:
    assert status < 500, (status, data[:500], what)
    if status >= 400:
        assert content_type.startswith("application/json"), (status, content_type, what)
        error = json.loads(data)["error"]
        assert set(error) == {"message", "type", "param", "code"}, (error, what)
        assert isinstance(error["message"], str) and error["message"], (error, what)
        assert "Traceback" not in error["message"] and "http://" not in error["message"]


def assert_log_clean(router: RouterChild) -> None:
    """No traceback, no ERROR, and every line a log record (no client bytes breaking lines)."""
    text = router.log()
    assert "Traceback" not in text, text[-4000:]
    lines = text.splitlines()
    errors = [line for line in lines if " ERROR " in line or " CRITICAL " in line]
    assert not errors, errors[:5]
    stray = [line for line in lines if line and not line[:4].isdigit()]
    assert not stray, stray[:5]


# -- strategies: OpenAI-shaped bodies with every field at times of the wrong type ----------

_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
_json = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=16)


def mostly(valid: st.SearchStrategy, weight: int = 6) -> st.SearchStrategy:
    """`valid` most of the time, any JSON value now and then: most bodies are nearly right."""
    return st.sampled_from([True] * weight + [False]).flatmap(lambda ok: valid if ok else _json)


_model = mostly(st.sampled_from([MODEL, MODEL, MODEL, "alias-a", "nope", "", "sim-a "]))
_small_int = mostly(st.integers(min_value=-1, max_value=6))
_text = st.text(min_size=1, max_size=60)
_token_ids = st.lists(st.one_of(*[st.integers(min_value=0, max_value=30_000)] * 6,
                                st.integers(min_value=-5, max_value=200_000),
                                st.integers(min_value=2 ** 62, max_value=2 ** 66)), max_size=12)
_part = st.fixed_dictionaries(
    {"type": mostly(st.sampled_from(["text", "text", "text", "image_url", "input_audio",
                                     "refusal", "input_text"]))},
    optional={"text": mostly(_text),
              "image_url": mostly(st.fixed_dictionaries({"url": st.text(max_size=20)}))})
_content = mostly(st.one_of(_text, st.lists(mostly(_part), max_size=4)))
_tool_call = st.fixed_dictionaries(
    {"id": mostly(st.text(max_size=8)), "type": st.just("function"),
     "function": mostly(st.fixed_dictionaries({"name": mostly(st.text(max_size=8)),
                                               "arguments": mostly(st.text(max_size=20))}))})
_message = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["system", "user", "user", "user", "assistant", "tool",
                                     "developer"]))},
    optional={"content": _content, "name": mostly(st.text(max_size=8)),
              "tool_call_id": mostly(st.text(max_size=8)),
              "tool_calls": mostly(st.lists(_tool_call, max_size=3))})
_messages = mostly(st.lists(_message, min_size=1, max_size=4))
_tool = st.fixed_dictionaries({"type": st.just("function"), "function": mostly(
    st.fixed_dictionaries({"name": st.text(max_size=8)}, optional={"parameters": _json}))})
_common = {"max_tokens": _small_int, "stream": mostly(st.booleans()),
           "stream_options": mostly(st.fixed_dictionaries({}, optional={
               "include_usage": mostly(st.booleans())})),
           "n": mostly(st.integers(min_value=0, max_value=3)),
           "temperature": mostly(st.floats(min_value=0, max_value=2)),
           "stop": mostly(st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=3))),
           "logprobs": mostly(st.one_of(st.booleans(), st.integers(min_value=0, max_value=5))),
           "seed": mostly(st.integers(min_value=-(2 ** 63), max_value=2 ** 64)),
           "user": mostly(st.text(max_size=8)), "priority": mostly(st.integers(-3, 3)),
           "extra_field": _json}
_chat = st.fixed_dictionaries({"model": _model, "messages": _messages}, optional={
    "tools": mostly(st.lists(_tool, max_size=2)), "tool_choice": mostly(st.sampled_from(
        ["auto", "none", "required"])),
    "top_logprobs": _small_int, "max_completion_tokens": _small_int, **_common})
_prompt = mostly(st.one_of(_text, _token_ids, st.lists(st.text(max_size=10), min_size=1, max_size=3),
                           st.lists(_token_ids, min_size=1, max_size=3)))
_completion = st.fixed_dictionaries({"model": _model, "prompt": _prompt}, optional={
    "echo": mostly(st.booleans()), "suffix": _json, **_common})
_embedding = st.fixed_dictionaries({"model": _model, "input": _prompt}, optional={
    "encoding_format": mostly(st.sampled_from(["float", "base64"])), "dimensions": _json})
_tokenize = st.fixed_dictionaries({"model": _model}, optional={
    "prompt": mostly(_text), "messages": _messages, "tokens": mostly(_token_ids),
    "add_special_tokens": mostly(st.booleans())})

ENDPOINT_BODIES = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), _chat),
    st.tuples(st.just("/v1/chat/completions"), _chat),
    st.tuples(st.just("/v1/completions"), _completion),
    st.tuples(st.just("/v1/completions"), _completion),
    st.tuples(st.just("/v1/embeddings"), _embedding),
    st.tuples(st.sampled_from(["/tokenize", "/detokenize", "/v1/completions/render",
                               "/v1/chat/completions/render"]), _tokenize),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), _json),
)
_FUZZ = settings(max_examples=FUZZ_CASES, deadline=None, database=None, derandomize=False,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.data_too_large])


def test_fuzzed_bodies_never_cause_a_router_5xx(router: RouterChild) -> None:
    client = Client(router.url)
    counts: dict[int, int] = {}
    first_5xx: list[int] = []

    @_FUZZ
    @given(case=ENDPOINT_BODIES)
    def check(case: tuple[str, Any]) -> None:
        path, body = case
        data = json.dumps(body).encode()  # stdlib: big ints, NaN and Infinity as they come
        status, content_type, answer = client.post(path, data)
        counts[status] = counts.get(status, 0) + 1
        if os.environ.get("ROUTER_FUZZ_TRACE"):
            print("FUZZ", status, path, answer[:160], data[:200])
        if status >= 500 and not first_5xx:  # shown by pytest on failure: the first cause
            first_5xx.append(status)
            print(f"FUZZ first {status} for {path} {data[:300]!r}:\n{router.why_failing()}")
        assert_openai_answer(status, content_type, answer, (path, data[:300]))

    try:
        check()
    finally:
        client.close()
    assert sum(counts.values()) >= FUZZ_CASES
    assert counts.get(200, 0) > FUZZ_CASES // 20, counts  # the fuzz does reach the replica
    assert_log_clean(router)


def test_fuzzed_bytes_never_cause_a_router_5xx(router: RouterChild) -> None:
    client = Client(router.url)

    @_FUZZ
    @given(data=st.one_of(st.binary(max_size=200),
                          st.text(max_size=200).map(str.encode),
                          st.sampled_from([b'{"model": "sim-a", "prompt": "x"', b"\xef\xbb\xbf{}",
                                           b'{"model": "sim-a"}' * 2, b"[]", b"null", b'"x"',
                                           b'{"model": "sim-a", "prompt": "\\ud800"}',
                                           b'{"model": "sim-a", "prompt": 1e999}'])),
           path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]),
           content_type=st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]),
           encoding=st.sampled_from(["", "gzip", "deflate", "br", "identity", "x-gzip"]))
    def check(data: bytes, path: str, content_type: str, encoding: str) -> None:
        headers = {"Content-Type": content_type} if content_type else {}
        if encoding:
            headers["Content-Encoding"] = encoding
        status, ctype, answer = client.post(path, data, headers)
        assert_openai_answer(status, ctype, answer, (path, data[:200], headers))

    try:
        check()
    finally:
        client.close()
    assert_log_clean(router)


def _deep(levels: int, leaf: str = '"x"') -> str:
    """JSON text nested `levels` lists deep (too deep for json.dumps to write)."""
    return "[" * levels + leaf + "]" * levels


def _raw_json(template: str, **deep: str) -> bytes:
    return template.replace("'", '"').format(**deep).encode()


def test_pathological_bodies(router: RouterChild) -> None:
    """The bodies that crashed the router before, sent whole."""
    client = Client(router.url)
    cases: list[tuple[str, Any]] = [
        ("/v1/chat/completions", {"model": MODEL, "messages": [
            {"role": "assistant", "content": "x", "tool_calls": "not a list"}]}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [
            {"role": "assistant", "content": "x", "tool_calls": [{"function": 7}]}]}),
        ("/v1/completions", {"model": MODEL, "prompt": [2 ** 63, 2 ** 64 + 1]}),
        ("/v1/completions", {"model": MODEL, "prompt": [-(2 ** 63) - 1]}),
        ("/v1/chat/completions", _raw_json(
            "{{'model': 'sim-a', 'messages': [{{'role': 'user', 'content': {d}}}]}}", d=_deep(1000))),
        ("/v1/chat/completions", _raw_json(
            "{{'model': 'sim-a', 'messages': [{{'role': 'user', 'content': 'x'}}], 'tools': {d}}}",
            d=_deep(1000, "{'type': 'function'}"))),
        ("/v1/chat/completions", _raw_json(
            "{{'model': 'sim-a', 'messages': [{{'role': 'user', 'content': "
            "[{{'type': 'text', 'text': {d}}}]}}]}}", d=_deep(900))),
        ("/v1/completions", {"model": [MODEL], "prompt": "x"}),
        ("/v1/completions", {"model": {"$ne": None}, "prompt": "x"}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2 ** 64}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 10 ** 9}),
        ("/v1/completions", {"model": MODEL, "prompt": "x" * 300_000}),
    ]
    try:
        for path, body in cases:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            status, ctype, answer = client.post(path, data)
            assert_openai_answer(status, ctype, answer, (path, data[:200]))
        # Deeper than the JSON parser's own limit: still a 400, not a 500.
        status, ctype, answer = client.post("/v1/completions", b'{"model": "sim-a", "prompt": '
                                            + b"[" * 100_000 + b"]" * 100_000 + b"}")
        assert status == 400, answer
        assert_openai_answer(status, ctype, answer, "deep")
    finally:
        client.close()
    assert_log_clean(router)


# -- malformed HTTP: every one answered in JSON, 4xx, no traceback --------------------------

def _raw(router: RouterChild, data: bytes, timeout: float = 5.0) -> tuple[int | None, dict, bytes]:
    with socket.create_connection(("127.0.0.1", router.port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        raw = b""
        s.settimeout(timeout)
        try:
            while chunk := s.recv(65536):
                raw += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/"):
        return None, {}, raw
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


BODY = b'{"model": "sim-a", "prompt": "hi", "max_tokens": 2}'
CL = f"Content-Length: {len(BODY)}\r\n".encode()
H = b"Host: router\r\nContent-Type: application/json\r\nConnection: close\r\n"
MALFORMED: list[tuple[str, bytes, set[int]]] = [
    ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", {400}),
    ("no version", b"POST /v1/completions\r\n\r\n", {400}),
    ("bad version", b"POST /v1/completions HTTP/9.9\r\n" + H + b"\r\n", {400, 505}),
    ("lowercase version", b"POST /v1/completions http/1.1\r\n" + H + b"\r\n", {400}),
    ("method with junk", b"PO(ST /v1/completions HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("header without colon", b"POST /v1/completions HTTP/1.1\r\nHost router\r\n\r\n", {400}),
    ("space before colon", b"POST /v1/completions HTTP/1.1\r\nHost : router\r\n\r\n", {400}),
    ("NUL in a header", b"POST /v1/completions HTTP/1.1\r\nX-A: a\x00b\r\n" + H + b"\r\n", {400}),
    ("obs-fold header", b"POST /v1/completions HTTP/1.1\r\nX-A: a\r\n b\r\n" + H + b"\r\n", {400}),
    ("huge header", b"POST /v1/completions HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n" + H + b"\r\n",
     {400, 431}),
    ("huge URL", b"POST /v1/" + b"a" * 20000 + b" HTTP/1.1\r\n" + H + b"\r\n", {400, 414}),
    ("too many headers", b"POST /v1/completions HTTP/1.1\r\n"
     + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + H + b"\r\n", {400, 431}),
    ("non-numeric Content-Length", b"POST /v1/completions HTTP/1.1\r\nContent-Length: ten\r\n" + H
     + b"\r\n", {400}),
    ("negative Content-Length", b"POST /v1/completions HTTP/1.1\r\nContent-Length: -5\r\n" + H
     + b"\r\n", {400}),
    ("two Content-Lengths", b"POST /v1/completions HTTP/1.1\r\nContent-Length: 5\r\n" + CL + H
     + b"\r\n" + BODY, {400}),
    ("Content-Length and chunked", b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
     + CL + H + b"\r\n" + BODY, {400}),
    ("chunked then identity", b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n"
     + H + b"\r\n0\r\n\r\n", {400, 501}),
    ("bad chunk size", b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n" + H
     + b"\r\nzz\r\nabc\r\n0\r\n\r\n", {400}),
    ("Transfer-Encoding gzip", b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: gzip\r\n" + H
     + b"\r\n", {400, 501}),
    ("non-ASCII path", "POST /v1/cömpletions HTTP/1.1\r\n".encode() + H + CL + b"\r\n" + BODY, {400, 404}),
    ("absolute-form target", b"POST http://evil.example/admin/faults HTTP/1.1\r\n" + H + CL + b"\r\n"
     + BODY, {400, 404}),
    ("asterisk target", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", {400, 404}),
    ("CONNECT", b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n" + H + b"\r\n", {400, 405}),
    ("TRACE", b"TRACE /v1/completions HTTP/1.1\r\n" + H + b"\r\n", {405}),
    ("GET an inference path", b"GET /v1/completions HTTP/1.1\r\n" + H + b"\r\n", {405}),
    ("empty body", b"POST /v1/completions HTTP/1.1\r\nContent-Length: 0\r\n" + H + b"\r\n", {400}),
    ("invalid JSON", b"POST /v1/completions HTTP/1.1\r\nContent-Length: 4\r\n" + H + b"\r\n{abc", {400}),
    ("JSON array body", b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n" + H + b"\r\n[]", {400}),
    ("invalid UTF-8", b"POST /v1/completions HTTP/1.1\r\nContent-Length: 4\r\n" + H + b"\r\n\"\xff\xfe\"",
     {400}),
    ("invalid gzip", b"POST /v1/completions HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n"
     + H + b"\r\nabcde", {400}),
    ("unknown encoding", b"POST /v1/completions HTTP/1.1\r\nContent-Encoding: zstd\r\n" + CL + H
     + b"\r\n" + BODY, {415}),
    ("body too large", b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999\r\n" + H + b"\r\n",
     {413}),
    ("unsupported Expect", b"POST /v1/completions HTTP/1.1\r\nExpect: 200-ok\r\n" + CL + H + b"\r\n",
     {417}),
    ("bad X-Priority", b"POST /v1/completions HTTP/1.1\r\nX-Priority: high\r\n" + CL + H + b"\r\n"
     + BODY, {400}),
    ("bad X-Request-Id", b"POST /v1/completions HTTP/1.1\r\nX-Request-Id: " + b"r" * 600 + b"\r\n"
     + CL + H + b"\r\n" + BODY, {200, 400}),
    ("LF-only line ends", b"POST /v1/completions HTTP/1.1\nHost: router\nContent-Type: application/json\n"
     b"Connection: close\n" + CL.replace(b"\r", b"") + b"\n" + BODY, {200, 400}),
]


@pytest.mark.parametrize("name,data,statuses", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_http_gets_a_json_4xx(router: RouterChild, name: str, data: bytes,
                                       statuses: set[int]) -> None:
    status, headers, body = _raw(router, data)
    assert status in statuses, (name, status, body[:300])
    if status >= 400:
        assert headers.get("content-type", "").startswith("application/json"), (name, headers, body)
        error = json.loads(body.split(b"\r\n0\r\n")[0] if headers.get("transfer-encoding") else body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
    # The router is unharmed: the next plain request is served.
    ok, _, answer = _raw(router, b"POST /v1/completions HTTP/1.1\r\n" + H + CL + b"\r\n" + BODY)
    assert ok == 200, answer
    assert_log_clean(router)
    if status == 400 and b"Malformed HTTP request" in body:
        assert "WARNING router.connections: malformed HTTP request" in router.log()
