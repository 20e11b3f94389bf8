"""Canonical routing text: the next turn of a conversation extends the previous one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.core.requests import build_route_request
from router.prefix.hashing import hash_tokens
from router.prefix.rendering import RoutingInput, render_messages, render_prompt, routing_input

text = st.text(max_size=80)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
image_part = st.fixed_dictionaries(
    {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": text})}
)
content = st.one_of(st.none(), text, st.lists(st.one_of(text_part, image_part), max_size=3))
tool_call = st.fixed_dictionaries(
    {
        "id": st.text(max_size=8),
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": st.text(max_size=10), "arguments": text}),
    }
)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "developer"]), "content": content}),
    st.fixed_dictionaries(
        {"role": st.just("assistant"), "content": content},
        optional={"tool_calls": st.lists(tool_call, max_size=2), "name": st.text(max_size=5)},
    ),
    st.fixed_dictionaries(
        {"role": st.just("tool"), "tool_call_id": st.text(max_size=8), "content": content}
    ),
)
conversation = st.lists(message, max_size=8)


@settings(max_examples=300, deadline=None)
@given(conversation, conversation)
def test_next_turn_is_a_textual_extension_of_the_previous(first: list, later: list) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    for t in (None, tools):
        assert render_messages(first + later, t).startswith(render_messages(first, t))


@settings(max_examples=100, deadline=None)
@given(conversation)
def test_rendering_is_deterministic(messages: list) -> None:
    assert render_messages(messages) == render_messages([dict(m) for m in messages])


def test_roles_parts_tool_calls_and_results_render_in_order() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": " this?"},
                                     {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{\"q\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "a cat"},
        {"role": "assistant", "content": "A cat."},
    ]
    text = render_messages(messages)
    order = ["<|system|>", "Be brief.", "<|user|>", "What is this?", "<|image_url:", "<|assistant|>",
             "<|tool_call|>c1 look({\"q\": 1})", "<|tool|> id=c1", "a cat", "A cat."]
    positions = [text.index(piece) for piece in order]
    assert positions == sorted(positions)


def test_images_are_stable_placeholders_that_tell_images_apart() -> None:
    def with_image(url: str) -> str:
        return render_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])

    assert with_image("data:image/png;base64,AAAA") == with_image("data:image/png;base64,AAAA")
    assert with_image("data:image/png;base64,AAAA") != with_image("data:image/png;base64,BBBB")
    assert "AAAA" not in with_image("data:image/png;base64,AAAA")  # a placeholder, not the payload


def test_tools_change_the_text_from_the_start() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert render_messages(messages, [{"name": "a"}]) != render_messages(messages, [{"name": "b"}])
    assert render_messages(messages, [{"name": "a"}]).startswith("<|tools|>")


def test_completions_prompt_shapes() -> None:
    assert render_prompt("hello") == RoutingInput(text="hello")
    assert render_prompt(["first", "second"]) == RoutingInput(text="first")
    assert render_prompt([1, 2, 3]) == RoutingInput(tokens=(1, 2, 3))
    assert render_prompt([[4, 5], [6]]) == RoutingInput(tokens=(4, 5))
    assert render_prompt("") == RoutingInput()
    assert render_prompt([]) == RoutingInput()
    assert render_prompt(None) == RoutingInput()
    assert render_prompt([True, False]) == RoutingInput()  # booleans are not token ids


def test_routing_input_of_bodies() -> None:
    chat = routing_input({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.text == render_messages([{"role": "user", "content": "hi"}])
    assert routing_input({"model": "m", "prompt": "abc"}).text == "abc"
    assert routing_input({"model": "m", "input": [7, 8]}).tokens == (7, 8)
    assert routing_input({"model": "m"}) == RoutingInput()
    assert routing_input({"prompt": [1, 2, 3]}).chars == 12
    assert routing_input({"prompt": "abcd"}).chars == 4


# -- hostile input: the router renders whatever a client sends without failing -----------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats()
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["role", "content", "type", "text", "name", "tool_calls", "function",
                         "arguments", "id", "tool_call_id", "image_url", "refusal", "x"]),
        children, max_size=5),
    max_leaves=25)


def _deep(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


@given(messages=st.lists(_JSON, max_size=4), tools=_JSON, prompt=_JSON)
@settings(max_examples=1500, deadline=None)
def test_routing_input_never_fails_on_any_json(messages: list, tools: object, prompt: object) -> None:
    for body in ({"messages": messages, "tools": tools}, {"prompt": prompt}, {"input": prompt}):
        rin = routing_input(body)
        assert rin.text is None or isinstance(rin.text, str)


@pytest.mark.parametrize("depth", [10, 300, 1000, 5000])
def test_deep_nesting_in_content_tools_and_names_is_rendered(depth: int) -> None:
    deep = _deep(depth)
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": deep}],
                          "name": deep, "tool_call_id": deep,
                          "tool_calls": [{"id": deep, "function": {"name": deep, "arguments": deep}}]},
                         {"role": "assistant", "tool_calls": 5},
                         {"role": "assistant", "tool_calls": "abc"}],
            "tools": [deep]}
    first = routing_input(body).text
    assert first and routing_input(body).text == first  # stable


def test_token_ids_of_any_size_hash() -> None:
    for tokens in ([2**63, 1] * 16, [-(2**63) - 5] * 32, [2**64 + 7] * 32, [-1] * 32):
        assert len(hash_tokens(tokens, "m", block_tokens=16)) == 2
    assert hash_tokens([2**64 + 7] * 16, "m") != hash_tokens([2**64 + 8] * 16, "m")


def test_hashed_blocks_per_request_are_capped() -> None:
    text = "0123456789abcdef" * 100_000  # 1.6 MB of prompt
    route = build_route_request(model="m", path="/v1/completions", data={"prompt": text},
                                body=b"", block_chars=64, max_blocks=128)
    assert len(route.block_hashes) == 128
    assert route.prompt_chars == len(text)  # the cost models still see its whole size
    full = build_route_request(model="m", path="/v1/completions", data={"prompt": text[:64 * 128]},
                               body=b"", block_chars=64)
    assert full.block_hashes == route.block_hashes
