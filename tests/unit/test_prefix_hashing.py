"""Chained block hashes: the invariants prefix routing stands on."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from router.prefix.hashing import (
    DEFAULT_BLOCK_CHARS,
    chain_seed,
    hash_text,
    hash_tokens,
    prefix_hashes,
)

texts = st.text(min_size=0, max_size=600)
token_lists = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=120)


@settings(max_examples=200, deadline=None)
@given(texts, texts)
def test_a_prompts_hashes_are_a_prefix_of_its_extensions(prompt: str, more: str) -> None:
    short = hash_text(prompt, "m")
    long = hash_text(prompt + more, "m")
    assert long[: len(short)] == short


@settings(max_examples=200, deadline=None)
@given(token_lists, token_lists)
def test_token_hashes_are_a_prefix_of_the_extensions(prompt: list[int], more: list[int]) -> None:
    short = hash_tokens(prompt, "m")
    assert hash_tokens(prompt + more, "m")[: len(short)] == short


@settings(max_examples=200, deadline=None)
@given(texts, texts)
def test_equal_hashes_mean_equal_prefixes(a: str, b: str) -> None:
    ha, hb = hash_text(a, "m", block_chars=8), hash_text(b, "m", block_chars=8)
    ba, bb = a.encode(), b.encode()
    for k in range(min(len(ha), len(hb))):
        assert (ha[k] == hb[k]) == (ba[: 8 * (k + 1)] == bb[: 8 * (k + 1)])


def test_only_full_blocks_are_hashed() -> None:
    assert hash_text("x" * (DEFAULT_BLOCK_CHARS - 1), "m") == ()
    assert len(hash_text("x" * DEFAULT_BLOCK_CHARS, "m")) == 1
    assert len(hash_text("x" * (3 * DEFAULT_BLOCK_CHARS + 5), "m")) == 3
    assert len(hash_tokens(list(range(33)), "m")) == 2


def test_a_block_changes_every_hash_from_there_on() -> None:
    base = "".join(chr(ord("a") + i % 26) for i in range(640))
    changed = base[:200] + "Z" + base[201:]
    hb, hc = hash_text(base, "m"), hash_text(changed, "m")
    assert hb[:3] == hc[:3]
    assert all(x != y for x, y in zip(hb[3:], hc[3:]))


def test_different_models_adapters_and_salts_never_share_a_chain() -> None:
    text = "You are a helpful assistant. " * 20
    chains = [
        hash_text(text, "llama"),
        hash_text(text, "llama-2"),
        hash_text(text, "llama", lora="sql"),
        hash_text(text, "llama", cache_salt="tenant-a"),
        hash_text(text, "llama", cache_salt="tenant-b"),
        hash_text(text, "llama", lora="", cache_salt=None),
    ]
    seen: set[int] = set()
    for chain in chains:
        assert chain and not seen.intersection(chain)
        seen.update(chain)
    # Seeds come from an injective encoding: shifting text between fields changes them.
    assert chain_seed("ab", lora="c") != chain_seed("a", lora="bc")
    assert chain_seed("m", lora=None) != chain_seed("m", lora="")


def test_text_and_token_chains_are_separate() -> None:
    tokens = list(range(64))
    assert not set(hash_tokens(tokens, "m")) & set(hash_text(bytes(tokens).decode("latin-1"), "m"))


def test_large_token_ids_use_a_wider_separate_chain() -> None:
    small = hash_tokens([1] * 16, "m")
    big = hash_tokens([2**40] * 16, "m")
    assert len(big) == 1 and big != small


def test_prefix_hashes_prefers_tokens_then_text() -> None:
    assert prefix_hashes("m", tokens=[1] * 32) == hash_tokens([1] * 32, "m")
    assert prefix_hashes("m", text="y" * 128) == hash_text("y" * 128, "m")
    assert prefix_hashes("m") == ()
    assert prefix_hashes("m", text="z" * 128, cache_salt="s") == hash_text("z" * 128, "m", cache_salt="s")


def test_non_ascii_text_is_cut_on_utf8_bytes() -> None:
    text = "é" * 64  # 128 UTF-8 bytes
    assert len(hash_text(text, "m")) == 2
    assert hash_text(text + "more", "m")[:2] == hash_text(text, "m")
