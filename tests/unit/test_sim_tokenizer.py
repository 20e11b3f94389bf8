"""The simulator's tokenizer: prefix relations in text are prefix relations in tokens."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engines.sim.prompts import chat_ids
from engines.sim.tokenizer import SPECIAL_TOKENS, Tokenizer, render_chat

texts = st.text(max_size=400)


@settings(max_examples=200, deadline=None)
@given(texts, texts)
def test_a_text_prefix_is_a_token_prefix_but_for_the_last_partial_chunk(a: str, b: str) -> None:
    tok = Tokenizer()
    short, long = tok.encode(a), tok.encode(a + b)
    assert long[: max(0, len(short) - 1)] == short[: max(0, len(short) - 1)]


def test_about_four_characters_a_token_and_deterministic() -> None:
    text = "x" * 4000
    assert len(Tokenizer().encode(text)) == 1000
    assert Tokenizer().encode("the same text") == Tokenizer().encode("the same text")
    assert Tokenizer().encode("abcd") != Tokenizer().encode("abce")


def test_ids_stay_in_the_vocabulary_and_specials_are_single_tokens() -> None:
    tok = Tokenizer(vocab_size=4096)
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>\n" * 20 + "".join(chr(c) for c in range(32, 3000)))
    assert all(0 <= t < 4096 for t in ids)
    assert ids[0] == SPECIAL_TOKENS["<|im_start|>"]
    assert tok.decode(ids[:3]) == "<|im_start|>user\nhel"


@settings(max_examples=100, deadline=None)
@given(texts)
def test_decode_inverts_encode(text: str) -> None:
    tok = Tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_decode_memory_is_bounded() -> None:
    tok = Tokenizer(decode_memory=100)
    tok.encode("".join(f"{i:04d}" for i in range(1000)))
    assert len(tok._memory) <= 100 and len(tok._ids) == 100


def test_next_chat_turn_extends_the_previous_turns_tokens() -> None:
    tok = Tokenizer()
    turn1 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
    reply = "".join(tok.decode([tok.output_token(i)]) for i in range(7))
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And 3+3?"}]
    a, b = tok.encode(render_chat(turn1)), tok.encode(render_chat(turn2))
    assert b[: len(a) - 1] == a[:-1]
    assert len(b) > len(a) + 7


def test_generated_tokens_decode_to_four_character_pieces() -> None:
    tok = Tokenizer()
    pieces = [tok.decode([tok.output_token(i, seed=3)]) for i in range(20)]
    assert all(len(p) == 4 for p in pieces)
    assert tok.encode("".join(pieces)) == [tok.output_token(i, seed=3) for i in range(20)]


def test_a_developer_message_with_a_non_text_part_renders() -> None:
    """Found by the router's fuzz test (tests/reliability/test_hostile_input.py): a developer
    message merged into the system prompt joined every part with a ``text`` key, and a
    refusal part's list there made the simulator answer 500 (which the router relays)."""
    body = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "developer", "content": [{"type": "text", "text": "be brief"},
                                                           {"type": "refusal", "text": []}]}]}
    ids = chat_ids(Tokenizer(), body)
    assert ids == chat_ids(Tokenizer(), {"messages": [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": "hi"}]})
