"""The agentic APIs through the router, with the official SDKs, against simulated replicas
that keep stored responses (as vLLM 0.32 with VLLM_ENABLE_RESPONSES_API_STORE=1):
Responses (create, stream, a 10-turn previous_response_id chain through two routers taking
turns, retrieve, a background job cancelled) and Anthropic Messages (create, stream, keys
sent as x-api-key), prefix-routed."""

from __future__ import annotations

import anthropic
import openai
import pytest

MODEL = "sim-a"
KEY = "sk-agent-0123456789"
STORE_ARGS = ["--enable-responses-api-store"]


@pytest.fixture
async def fleet(make_sims, start_router, make_routes):
    sims = await make_sims(3, args=STORE_ARGS)
    routes = make_routes([s.url for s in sims], policy="cache_aware",
                         auth={"keys": [{"name": "agent", "key": KEY}]})
    return sims, await start_router(routes), await start_router(routes)


def _openai(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


async def test_responses_chain_of_ten_turns_through_two_routers(fleet) -> None:
    sims, first, second = fleet
    clients = [_openai(first), _openai(second)]
    previous = None
    ids = []
    for turn in range(10):
        client = clients[turn % 2]  # alternating router processes: no shared state
        response = await client.responses.create(
            model=MODEL, input=f"Turn {turn}: continue the plan.", max_output_tokens=8,
            instructions="You are a planning agent. " * 20, previous_response_id=previous)
        assert response.status in ("completed", "incomplete") and response.output_text  # (max_output_tokens)
        previous = response.id
        ids.append(response.id)
    # Every turn of the chain stayed on the replica that holds it (a wrong one answers 404).
    holders = {first.router.api.response_ids.token_of(i) for i in ids}
    assert len(holders) == 1
    for client in clients:
        again = await client.responses.retrieve(ids[-1])
        assert again.id == ids[-1] and again.status == response.status
    # A later turn reuses the chain's cached prefix (the replica's own prefix cache).
    assert response.usage is not None and response.usage.input_tokens_details.cached_tokens > 0


async def test_responses_stream_and_background_cancel(fleet) -> None:
    sims, first, _ = fleet
    client = _openai(first)
    stream = await client.responses.create(model=MODEL, input="Stream me a story.",
                                           max_output_tokens=16, stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    job = await client.responses.create(model=MODEL, input="A long background job.", background=True,
                                        max_output_tokens=4000)
    assert job.status in ("queued", "in_progress")
    cancelled = await client.responses.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert (await client.responses.retrieve(job.id)).status == "cancelled"
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("resp_" + "0" * 16 + "-" + "0" * 32)


async def test_anthropic_messages_create_and_stream(fleet) -> None:
    sims, first, _ = fleet
    client = anthropic.AsyncAnthropic(base_url=first.url, api_key=KEY, max_retries=0)
    system = "You are a careful coding agent. " * 30
    messages: list = [{"role": "user", "content": "Read app.py"}]
    message = await client.messages.create(model=MODEL, max_tokens=8, system=system, messages=messages)
    assert message.type == "message" and message.content[0].type == "text"
    messages += [{"role": "assistant", "content": message.content[0].text},
                 {"role": "user", "content": "Now fix the bug."}]
    async with client.messages.stream(model=MODEL, max_tokens=8, system=system, messages=messages) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text and final.stop_reason in ("end_turn", "max_tokens")
    # The second turn extends the first: prefix routing sent it where that prefix is cached.
    assert (final.usage.cache_read_input_tokens or 0) > 0
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic.AsyncAnthropic(base_url=first.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])


async def test_agent_loops_stay_where_their_prefix_is_through_every_api(fleet) -> None:
    """Agents sharing a tool preamble, each looping with tool calls and their results, one
    after another (no load to balance): through chat, Responses and Messages alike, every
    later call finds most of its previous call's prompt cached (the next turn's routing text
    extends the previous one's, so the prefix index sends it back).  (Concurrent agents are
    the scheduler's business, measured in benchmarks/scenarios/agent_loop_*.yaml.)"""
    sims, first, _ = fleet
    oai = _openai(first)
    claude = anthropic.AsyncAnthropic(base_url=first.url, api_key=KEY, max_retries=0)
    preamble = "Shared tool preamble. " * 40

    async def chat(a: int) -> list[tuple[int, int]]:
        messages: list = [{"role": "system", "content": preamble},
                          {"role": "user", "content": f"Chat agent {a}: " + "task details " * 200}]
        usage = []
        for step in range(4):
            r = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, tools=[
                {"type": "function", "function": {"name": "run", "parameters": {"type": "object"}}}])
            usage.append((r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
            messages += [{"role": "assistant", "content": None, "tool_calls": [
                {"id": f"c{step}", "type": "function", "function": {"name": "run", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": f"c{step}", "content": "ok " * 30}]
        return usage

    async def responses(a: int) -> list[tuple[int, int]]:
        items: list = [{"role": "user", "content": f"Responses agent {a}: " + "task details " * 200}]
        usage = []
        for step in range(4):
            r = await oai.responses.create(model=MODEL, instructions=preamble, input=items, max_output_tokens=4,
                                           tools=[{"type": "function", "name": "run",
                                                   "parameters": {"type": "object"}}])
            usage.append((r.usage.input_tokens, r.usage.input_tokens_details.cached_tokens))
            items += [{"type": "function_call", "call_id": f"c{step}", "name": "run", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": f"c{step}", "output": "ok " * 30}]
        return usage

    async def messages(a: int) -> list[tuple[int, int]]:
        turns: list = [{"role": "user", "content": f"Messages agent {a}: " + "task details " * 200}]
        usage = []
        for step in range(4):
            r = await claude.messages.create(model=MODEL, system=preamble, messages=turns, max_tokens=4)
            cached = r.usage.cache_read_input_tokens or 0
            usage.append((r.usage.input_tokens + cached, cached))
            turns += [{"role": "assistant", "content": [
                {"type": "tool_use", "id": f"t{step}", "name": "run", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{step}",
                                              "content": "ok " * 30}]}]
        return usage

    for loop in (chat, responses, messages):
        for a in range(3):
            usage = await loop(a)
            for (prompt, _), (_, cached) in zip(usage, usage[1:]):
                assert cached >= prompt // 2, (loop.__name__, a, usage)


async def test_an_agentic_stream_commits_at_its_first_token(make_sims, start_router, make_routes, http) -> None:
    """vLLM opens a Responses (or Messages) stream with events sent before the prefill; the
    router commits the answer at the first token's event, so what it learns of a replica's
    prefill rate is the real one (it learned ~10x too fast from the opening events, and the
    agent loops through these APIs lost a fifth of their hit rate to it)."""
    sims = await make_sims(2, time_scale=1.0, args=STORE_ARGS)
    server = await start_router(make_routes([s.url for s in sims], policy="cache_aware"))
    for i in range(6):
        for path, body in (("/v1/responses", {"input": f"agent {i} " + "lorem ipsum dolor " * 400,
                                              "max_output_tokens": 4}),
                           ("/v1/messages", {"max_tokens": 4, "messages": [
                               {"role": "user", "content": f"other {i} " + "lorem ipsum dolor " * 400}]})):
            async with http.post(server.url + path, json={"model": MODEL, "stream": True, **body}) as r:
                assert r.status == 200
                raw = await r.read()
            assert raw.startswith(b"event: ")  # the opening events are relayed, with the first token
    profile = server.router.flow.profile()
    rates = [profile.prefill_rate(r) for r in server.router.fleet]
    assert all(rate is not None and rate < 60_000 for rate in rates), rates  # the prior is 20,000/s
