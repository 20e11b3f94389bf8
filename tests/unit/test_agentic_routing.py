"""Routing text of the agentic APIs (router/prefix/agentic.py): the next turn of an agent
loop extends the previous one's, and one conversation routes alike through every API."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.requests import build_route_request, routing_input_of, validate_body
from router.prefix.agentic import anthropic_to_chat, chat_body, responses_to_chat

TOOLS_OPENAI = [{"type": "function", "name": "read_file", "parameters": {"type": "object"}}]


def _text(path: str, body: dict) -> str:
    rin = routing_input_of(path, body)
    assert rin is not None and rin.text is not None
    return rin.text


def _responses_turns() -> list[list]:
    """An agent loop through the Responses API, one input list per turn."""
    items: list = [{"role": "user", "content": [{"type": "input_text", "text": "Fix the bug in app.py"}]}]
    turns = [list(items)]
    for i in range(4):
        items += [
            {"type": "reasoning", "id": f"rs_{i}", "summary": [{"type": "summary_text", "text": "think"}]},
            {"type": "function_call", "call_id": f"call_{i}", "name": "read_file",
             "arguments": f'{{"path": "file{i}.py"}}'},
            {"type": "function_call_output", "call_id": f"call_{i}", "output": f"contents of file {i} " * 20},
        ]
        turns.append(list(items))
    return turns


def test_each_responses_turn_extends_the_previous_routing_text() -> None:
    texts = [_text("/v1/responses", {"model": "m", "instructions": "You are a coding agent.",
                                     "input": items, "tools": TOOLS_OPENAI})
             for items in _responses_turns()]
    for shorter, longer in zip(texts, texts[1:]):
        assert longer.startswith(shorter) and len(longer) > len(shorter)
    assert "contents of file 3" in texts[-1] and "You are a coding agent." in texts[0]


def test_each_anthropic_turn_extends_the_previous_routing_text() -> None:
    messages: list = [{"role": "user", "content": "Fix the bug in app.py"}]
    texts = []
    for i in range(4):
        texts.append(_text("/v1/messages", {"model": "m", "system": "You are a coding agent.",
                                            "messages": list(messages), "max_tokens": 64}))
        messages += [
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "x"},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": f"toolu_{i}", "name": "read_file", "input": {"path": f"f{i}.py"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": f"contents {i} " * 20}]},
        ]
    for shorter, longer in zip(texts, texts[1:]):
        assert longer.startswith(shorter) and len(longer) > len(shorter)


def test_one_conversation_routes_alike_through_chat_responses_and_messages() -> None:
    system, question, answer, follow = "Be brief.", "What is 2+2?", "4.", "And 3+3?"
    chat = _text("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": question},
        {"role": "assistant", "content": answer}, {"role": "user", "content": follow}]})
    responses = _text("/v1/responses", {"model": "m", "instructions": system, "input": [
        {"role": "user", "content": question},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": answer}]},
        {"role": "user", "content": [{"type": "input_text", "text": follow}]}]})
    messages = _text("/v1/messages", {"model": "m", "system": system, "max_tokens": 9, "messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        {"role": "user", "content": follow}]})
    assert chat == responses == messages


def test_tool_calls_map_onto_chat_tool_calls() -> None:
    messages, tools = responses_to_chat({"input": [
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"}], "tools": TOOLS_OPENAI})
    assert messages == [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    assert tools == TOOLS_OPENAI
    messages, _ = anthropic_to_chat({"messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"b": 1, "a": 2}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"},
                                     {"type": "text", "text": "next"}]}]})
    assert messages == [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a":2,"b":1}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "next"}]}]
    body = chat_body("/v1/messages", {"model": "m", "system": "s", "messages": [{"role": "user", "content": "hi"}]})
    assert body == {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}


def test_route_requests_of_the_agentic_apis_get_block_hashes() -> None:
    for path, body in (("/v1/responses", {"model": "m", "input": "hello " * 100}),
                       ("/v1/messages", {"model": "m", "max_tokens": 4,
                                         "messages": [{"role": "user", "content": "hello " * 100}]})):
        route = build_route_request(model="m", path=path, data=validate_body(path, body), body=b"{}")
        assert route.block_hashes and route.prompt_chars > 500
    count = build_route_request(model="m", path="/v1/messages/count_tokens",
                                data={"model": "m", "messages": []}, body=b"{}")
    assert not count.block_hashes  # counting caches nothing: no prefix to record


_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))
_json = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                     max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(_json, max_size=6), st.lists(_json, max_size=3), _json)
def test_any_input_items_map_and_extend(items: list, more: list, system: object) -> None:
    """Whatever a client sends (vLLM answers malformed items itself), mapping never raises
    and appending items never changes the text of the earlier ones."""
    for path, key in (("/v1/responses", "input"), ("/v1/messages", "messages")):
        first = routing_input_of(path, {key: items, "system": system, "instructions": system})
        later = routing_input_of(path, {key: items + more, "system": system, "instructions": system})
        assert first is not None and later is not None
        assert (later.text or "").startswith(first.text or "")
