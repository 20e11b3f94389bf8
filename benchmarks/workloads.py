"""Seeded, deterministic workloads: sessions of turns whose prompts share prefixes the way
real traffic does.

Sizes are in tokens of the simulator's tokenizer, which cuts text at about 4 characters a
token, so a size of N tokens is 4*N characters of text here.  The same scenario and seed
give byte-identical prompts on every run and machine (only `random.Random(seed)` is used).

A `Session` is what one user (or one agent) sends: a system prompt, optional earlier
history, and turns.  The load generator keeps each session's conversation: turn k is sent
as system + history + (turn 1, answer 1, ..., turn k), where the answers are the streamed
text the target actually returned, so the next turn's prompt extends the previous one
exactly as in production chat.  Shapes:

- multi_turn: production-stack's multi-round QA: `users` x `rounds`, one system prompt
  shared by everyone, optional per-user history, `think_time_s` between a user's rounds.
- shared_prefix: SGLang's generated-shared-prefix: `groups` x `prompts_per_group`, each
  prompt a long group prefix (the system message) plus a short question; with `zipf` > 0
  the groups' popularity follows Zipf(s) instead of being equal.  Order is shuffled.
- agentic: `agents` long contexts (shared tool spec + own task), each growing by a short
  tool result per step for `steps` calls.
- no_reuse: random prompts that share nothing (the control: prefix routing must not hurt).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from benchmarks.scenario_specs import WorkloadSpec
from engines.sim.tokenizer import render_chat

CHARS_PER_TOKEN = 4

_SYLLABLES = ("ka", "lo", "mi", "ren", "tas", "vo", "qui", "bel", "dor", "fen", "gra", "hul",
              "jin", "pra", "sto", "tur", "wex", "yal", "zon", "mar", "nel", "pos", "rid", "sen")


@dataclass(frozen=True, slots=True)
class Turn:
    text: str  # the new user (or tool-result) message of this turn
    max_tokens: int
    think_s: float = 0.0  # wait after the previous turn's answer before sending this one


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    system: str | None
    history: tuple[tuple[str, str], ...]  # (role, content) before turn 1
    turns: tuple[Turn, ...]
    group: str = ""  # shared_prefix: the group; others: the session id
    model: str | None = None  # lora: the adapter it names; None: the scenario's model
    tool_loop: bool = False  # agentic with tool_calls: turns after the first are tool results
    start_s: float = 0.0  # trace: when its first turn is sent (seconds from the run's start)
    prompt: str | None = None  # trace: the whole prompt, sent as is (api: completions)

    @property
    def requests(self) -> int:
        return len(self.turns)


@dataclass(frozen=True, slots=True)
class Workload:
    kind: str
    sessions: tuple[Session, ...]

    @property
    def total_requests(self) -> int:
        return sum(s.requests for s in self.sessions)


def words(rng: random.Random, tokens: int) -> str:
    """Pseudo-words of exactly tokens*4 characters (ends without a trailing space)."""
    n = tokens * CHARS_PER_TOKEN
    out: list[str] = []
    size = 0
    while size < n:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:n].rstrip().ljust(n, ".")


def build(spec: WorkloadSpec, seed: int) -> Workload:
    """The workload of a scenario: same spec and seed, same sessions."""
    builder = {
        "multi_turn": _multi_turn,
        "shared_prefix": _shared_prefix,
        "agentic": _agentic,
        "no_reuse": _no_reuse,
        "lora": _lora,
        "trace": _trace,
    }[spec.kind]
    rng = random.Random(f"{spec.kind}:{seed}")
    return Workload(spec.kind, tuple(builder(spec, rng)))


def _multi_turn(spec: WorkloadSpec, rng: random.Random) -> list[Session]:
    system = "You are a helpful assistant. " + words(rng, spec.system_prompt_tokens)
    sessions = []
    for u in range(spec.users):
        sid = f"user-{u:04d}"
        history: list[tuple[str, str]] = []
        remaining = spec.history_tokens
        while remaining > 0:  # earlier exchanges of ~question+answer each
            q = min(remaining, spec.question_tokens)
            a = min(remaining - q, spec.answer_tokens)
            history.append(("user", f"[{sid}] " + words(rng, q)))
            if a > 0:
                history.append(("assistant", words(rng, a)))
            remaining -= q + a
        turns = tuple(
            Turn(text=f"[{sid} round {r}] " + words(rng, spec.question_tokens),
                 max_tokens=spec.answer_tokens,
                 think_s=spec.think_time_s if r else 0.0)
            for r in range(spec.rounds)
        )
        sessions.append(Session(sid, system, tuple(history), turns, group=sid))
    return sessions


def zipf_counts(groups: int, total: int, s: float, rng: random.Random) -> list[int]:
    """How many of `total` prompts each group gets: equal when s == 0, else Zipf(s) sampled."""
    if s <= 0:
        base, extra = divmod(total, groups)
        return [base + (1 if g < extra else 0) for g in range(groups)]
    weights = [1.0 / (g + 1) ** s for g in range(groups)]
    counts = [0] * groups
    for g in rng.choices(range(groups), weights=weights, k=total):
        counts[g] += 1
    return counts


def _shared_prefix(spec: WorkloadSpec, rng: random.Random) -> list[Session]:
    prefixes = [f"[group {g}] " + words(rng, spec.prefix_tokens) for g in range(spec.groups)]
    counts = zipf_counts(spec.groups, spec.groups * spec.prompts_per_group, spec.zipf, rng)
    sessions = []
    for g, count in enumerate(counts):
        for p in range(count):
            sid = f"g{g:03d}-p{p:04d}"
            turn = Turn(text=f"[{sid}] " + words(rng, spec.question_tokens), max_tokens=spec.answer_tokens)
            sessions.append(Session(sid, prefixes[g], (), (turn,), group=f"g{g:03d}"))
    rng.shuffle(sessions)
    return sessions


def _agentic(spec: WorkloadSpec, rng: random.Random) -> list[Session]:
    system = "You are an agent. Tools: " + words(rng, spec.system_prompt_tokens)
    sessions = []
    for a in range(spec.agents):
        sid = f"agent-{a:03d}"
        turns = [Turn(text=f"[{sid} task] " + words(rng, spec.context_tokens), max_tokens=spec.answer_tokens)]
        for step in range(1, spec.steps):
            turns.append(Turn(text=f"[tool result {step}] " + words(rng, spec.tool_result_tokens),
                              max_tokens=spec.answer_tokens, think_s=spec.think_time_s))
        sessions.append(Session(sid, system, (), tuple(turns), group=sid,
                                tool_loop=bool(spec.params.get("tool_calls"))))
    return sessions


def adapter_name(k: int) -> str:
    """The name of the lora workload's k-th adapter (the fleet's --lora-modules must serve it)."""
    return f"adapter-{k}"


def _lora(spec: WorkloadSpec, rng: random.Random) -> list[Session]:
    """Requests for Zipf-popular adapters: each adapter's own task instructions (shared by its
    requests, cached per adapter by vLLM) and a unique question."""
    tasks: list[str | None] = [f"[task of {adapter_name(k)}] " + words(rng, spec.prompt_tokens)
                               if spec.prompt_tokens else None for k in range(spec.adapters)]
    counts = zipf_counts(spec.adapters, spec.requests, spec.zipf, rng)
    sessions = []
    for k, count in enumerate(counts):
        for i in range(count):
            sid = f"{adapter_name(k)}-q{i:04d}"
            turn = Turn(text=f"[{sid}] " + words(rng, spec.question_tokens), max_tokens=spec.answer_tokens)
            sessions.append(Session(sid, tasks[k], (), (turn,), group=adapter_name(k), model=adapter_name(k)))
    rng.shuffle(sessions)
    return sessions


def _trace(spec: WorkloadSpec, rng: random.Random) -> list[Session]:
    """A window of a Mooncake trace (benchmarks/trace.py): one session a request, sent at
    its (compressed) timestamp; sessions of the same first block share a group."""
    from pathlib import Path

    from benchmarks.trace import read_mooncake, window

    requests = window(read_mooncake(Path(spec.file)), start_s=spec.start_s, duration_s=spec.duration_s,
                      time_scale=spec.time_scale, token_scale=spec.token_scale,
                      output_scale=spec.output_scale, max_requests=spec.max_requests)
    return [Session(f"t{i:05d}", None, (), (Turn(text=r.prompt, max_tokens=r.output_tokens),),
                    group=f"h{r.hash_ids[0] if r.hash_ids else i}", start_s=r.at_s, prompt=r.prompt)
            for i, r in enumerate(requests)]


def _no_reuse(spec: WorkloadSpec, rng: random.Random) -> list[Session]:
    sessions = []
    for i in range(spec.requests):
        sid = f"r{i:05d}-{rng.getrandbits(32):08x}"
        turn = Turn(text=f"[{sid}] " + words(rng, spec.prompt_tokens), max_tokens=spec.answer_tokens)
        sessions.append(Session(sid, None, (), (turn,), group=sid))
    return sessions


# --- rendering ------------------------------------------------------------------------------

def messages_for(session: Session, answers: list[str], turn_index: int) -> list[dict[str, Any]]:
    """The chat messages of `session`'s turn `turn_index`, given the answers to earlier turns."""
    if session.tool_loop:
        from benchmarks.agent_apis import tool_loop_messages

        return tool_loop_messages(session.system, [t.text for t in session.turns[:turn_index + 1]],
                                  answers[:turn_index])
    msgs: list[dict[str, str]] = []
    if session.system is not None:
        msgs.append({"role": "system", "content": session.system})
    msgs.extend({"role": role, "content": content} for role, content in session.history)
    for k in range(turn_index):
        msgs.append({"role": "user", "content": session.turns[k].text})
        msgs.append({"role": "assistant", "content": answers[k]})
    msgs.append({"role": "user", "content": session.turns[turn_index].text})
    return msgs


def render(messages: list[dict[str, str]]) -> str:
    """The ChatML rendering (the simulator's and the tiny reference model's template), used as
    the prompt for `api: completions`.  The next turn's rendering extends this one's."""
    return render_chat(messages)
