"""tollway's LiteLLM callback in two real LiteLLM proxies sharing one real ``tollway serve``, called with ``openai``.

One stack for the module (:mod:`tests.litellm_support`): the test upstream, ``tollway serve``
with whole-micro-USD prices, and two proxy replicas with the callback in their config. Each test
bills its own accounts, so the tests are independent; the upstream's hit counter is read before
and after each test's calls (the tests of a module run one after another).
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any, Final

import litellm
import openai
import pytest

from tests.litellm_support import (
    Proxy,
    Stack,
    ask,
    charge,
    input_tokens,
    running_stack,
    self_counting,
    settled,
)
from tollway.client import Price

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to follow the embedded redis-server"),
]

BURST: Final = 200
FUNDED_CALLS: Final = 50
OUT: Final = 8


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("litellm"), {"proxy-a": {}, "proxy-b": {}}) as started:
        yield started


async def fund(stack: Stack, account_id: str, amount_micro: int) -> None:
    async with stack.admin() as admin:
        await admin.credit(account_id, f"mint-{account_id}", amount_micro)


async def outcome(client: openai.AsyncOpenAI, **request: Any) -> int | str:
    """200 and the text of a call (a stream's text joined), or the HTTP status of its error."""
    try:
        if request.get("stream"):
            parts: list[str] = []
            async for chunk in await client.chat.completions.create(**request):
                parts.extend(choice.delta.content or "" for choice in chunk.choices)
            return "".join(parts)
        answer = await client.chat.completions.create(**request)
        return answer.choices[0].message.content or ""
    except openai.APIStatusError as exc:
        return exc.status_code


async def burst(proxies: list[Proxy], account_id: str, text: str) -> Counter[int | str]:
    """``BURST`` concurrent calls spread over ``proxies``: how many got each outcome (text → 200)."""
    clients = [proxy.openai() for proxy in proxies]
    try:
        request = ask(text, account_id, max_tokens=OUT)
        results = await asyncio.gather(*(outcome(clients[i % len(clients)], **request) for i in range(BURST)))
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    return Counter(200 if isinstance(result, str) else result for result in results)


async def check_burst(stack: Stack, proxies: list[Proxy], account_id: str) -> None:
    text, counted = self_counting(f"burst out={OUT}")
    estimate = charge("gpt-4o-mini", counted, OUT)
    await fund(stack, account_id, FUNDED_CALLS * estimate)
    before = (await stack.upstream.hits()).get("total", 0)
    outcomes = await burst(proxies, account_id, text)
    assert {200: FUNDED_CALLS, 402: BURST - FUNDED_CALLS} == dict(outcomes)
    assert FUNDED_CALLS == (await stack.upstream.hits())["total"] - before
    async with stack.gateway() as gateway:
        entries = await settled(gateway, account_id)
        balance = await gateway.balance(account_id)
    assert [("COMMITTED", estimate)] * FUNDED_CALLS == [(entry.state, entry.charged_micro) for entry in entries]
    assert (0, 0, FUNDED_CALLS * estimate) == (balance.available_micro, balance.held_micro, balance.charged_micro)


async def test_burst_of_200_against_funds_for_50_reaches_the_upstream_50_times(stack: Stack) -> None:
    """200 concurrent calls through one proxy against funds for 50: 50 answered and charged, 150 get 402 unsent."""
    await check_burst(stack, stack.proxies[:1], "burst-one")


async def test_two_replicas_sharing_one_tollway_still_allow_exactly_50(stack: Stack) -> None:
    """The same burst split over two proxy replicas: still exactly 50 reach the upstream."""
    await check_burst(stack, stack.proxies, "burst-two")


async def test_refusal_is_402_with_tollways_body_and_no_upstream_call(stack: Stack) -> None:
    """An account without funds gets 402 whose error carries tollway's insufficient_funds body; no upstream hit."""
    before = (await stack.upstream.hits()).get("total", 0)
    client = stack.proxies[0].openai()
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(**ask("hello", "broke", max_tokens=10))
    finally:
        await client.close()
    assert 402 == refused.value.status_code
    body = refused.value.body
    assert isinstance(body, dict)
    tollway_body = body["provider_specific_fields"]
    expected_requested = charge("gpt-4o-mini", input_tokens("hello"), 10)
    assert ("insufficient_funds", str(expected_requested), "0") == (
        tollway_body["error"],
        tollway_body["requested_micro"],
        tollway_body["available_micro"],
    )
    assert before == (await stack.upstream.hits()).get("total", 0)


async def test_request_without_an_account_is_refused_and_never_sent(stack: Stack) -> None:
    """A request naming no billing account gets 403 billing_account_missing and never reaches the upstream."""
    before = (await stack.upstream.hits()).get("total", 0)
    client = stack.proxies[0].openai()
    try:
        status = await outcome(client, **ask("hello", None))
    finally:
        await client.close()
    assert 403 == status
    assert before == (await stack.upstream.hits()).get("total", 0)


async def mixed_calls(client: openai.AsyncOpenAI, account_id: str) -> list[int | str]:
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    return [
        await outcome(client, **ask("normal out=7", account_id, max_tokens=50)),
        await outcome(client, **ask("streamed out=5", account_id, max_tokens=50, **stream)),
        await outcome(client, **ask("failing fail=500", account_id, max_tokens=50)),
        await outcome(client, **ask("failing stream fail=503", account_id, max_tokens=50, **stream)),
        await outcome(client, **ask("normal again out=3", account_id)),
    ]


def priced(prices: dict[str, Price], model: str, input_tokens: int, output_tokens: int) -> int:
    """A charge computed from ``GET /v1/prices`` and the tokens alone (what an invoice would do)."""
    price = prices[model]
    return (input_tokens * price.input_micro_per_mtok + output_tokens * price.output_micro_per_mtok) // 1_000_000


async def test_balances_exact_after_normal_streaming_and_failing_calls(stack: Stack) -> None:
    """Normal and streamed calls are charged their reported usage at GET /v1/prices, failed ones nothing: exact."""
    await fund(stack, "mix", 1_000_000)
    client = stack.proxies[0].openai()
    try:
        outcomes = await mixed_calls(client, "mix")
    finally:
        await client.close()
    assert [" ".join(["tok"] * 7), " ".join(["tok"] * 5), 500, 503, " ".join(["tok"] * 3)] == outcomes
    async with stack.gateway() as gateway:
        prices = await gateway.prices()
        entries = await settled(gateway, "mix")
        balance = await gateway.balance("mix")
    mini = "gpt-4o-mini"
    expected = [priced(prices, mini, 12, 7), priced(prices, mini, 12, 5), 0, 0, priced(prices, mini, 12, 3)]
    states = ["COMMITTED", "COMMITTED", "RELEASED", "RELEASED", "COMMITTED"]
    assert list(zip(states, expected, strict=True)) == [(entry.state, entry.charged_micro) for entry in entries]
    total = sum(expected)
    assert (1_000_000 - total, 0, total) == (balance.available_micro, balance.held_micro, balance.charged_micro)


async def test_litellm_retry_after_5xx_charges_once(stack: Stack) -> None:
    """LiteLLM retries after an upstream 500 and the retry answers: one hold, one charge, two upstream hits."""
    await fund(stack, "retry", 1_000_000)
    before = (await stack.upstream.hits()).get("up-mini", 0)
    client = stack.proxies[0].openai()
    try:
        text = await outcome(client, **ask("fail_first=1 key=retry-1 out=4", "retry"))
    finally:
        await client.close()
    assert "tok tok tok tok" == text
    assert 2 == (await stack.upstream.hits())["up-mini"] - before
    async with stack.gateway() as gateway:
        entries = await settled(gateway, "retry")
    assert [("COMMITTED", charge("gpt-4o-mini", 12, 4))] == [(entry.state, entry.charged_micro) for entry in entries]


async def test_fallback_to_second_model_charges_the_model_that_answered(stack: Stack) -> None:
    """The small model fails (and its retry), the fallback answers: one charge, at the fallback model's price."""
    await fund(stack, "fallback", 1_000_000)
    before = await stack.upstream.hits()
    client = stack.proxies[0].openai()
    try:
        text = await outcome(client, **ask("fail_model=up-mini out=6", "fallback", max_tokens=20))
    finally:
        await client.close()
    assert " ".join(["tok"] * 6) == text
    after = await stack.upstream.hits()
    assert (2, 1) == (after["up-mini"] - before.get("up-mini", 0), after["up-big"] - before.get("up-big", 0))
    async with stack.gateway() as gateway:
        entries = await settled(gateway, "fallback")
    assert [("COMMITTED", charge("gpt-4o", 12, 6))] == [(entry.state, entry.charged_micro) for entry in entries]


async def test_failure_before_output_releases_the_hold(stack: Stack) -> None:
    """An upstream that fails every attempt before any output: the hold is released, nothing charged."""
    await fund(stack, "failing", 1_000_000)
    client = stack.proxies[0].openai()
    try:
        status = await outcome(client, **ask("fail=500", "failing", max_tokens=30))
    finally:
        await client.close()
    assert 500 == status
    async with stack.gateway() as gateway:
        entries = await settled(gateway, "failing")
        balance = await gateway.balance("failing")
    assert [("RELEASED", "pre_stream_failure", 0)] == [(e.state, e.reason, e.charged_micro) for e in entries]
    assert (1_000_000, 0, 0) == (balance.available_micro, balance.held_micro, balance.charged_micro)


async def test_stream_cut_midway_charges_the_input_and_the_delivered_output(stack: Stack) -> None:
    """A stream the upstream drops after 3 chunks: charged the counted input plus the 3 delivered tokens' count."""
    await fund(stack, "cut", 1_000_000)
    client = stack.proxies[0].openai()
    text = "cut=3 out=9"
    try:
        status = await outcome(client, **ask(text, "cut", max_tokens=9, stream=True))
    except openai.APIError as exc:  # the stream breaks after it began: the client sees a broken stream
        status = type(exc).__name__
    finally:
        await client.close()
    assert isinstance(status, str)
    delivered = litellm.token_counter(model="gpt-4o-mini", text="tok tok tok")
    async with stack.gateway() as gateway:
        entries = await settled(gateway, "cut")
    expected = charge("gpt-4o-mini", input_tokens(text), delivered)
    assert [("COMMITTED", expected)] == [(entry.state, entry.charged_micro) for entry in entries]


async def test_client_leaving_a_stream_midway_is_charged_for_what_was_delivered(stack: Stack) -> None:
    """A client that closes a slow stream after 3 chunks: charged the input plus the delivered tokens, not all 40."""
    await fund(stack, "gone", 1_000_000)
    text = "chunk_ms=150 out=40"
    client = stack.proxies[0].openai()
    received = 0
    try:
        stream = await client.chat.completions.create(**ask(text, "gone", max_tokens=40, stream=True))
        async for chunk in stream:
            received += sum(1 for choice in chunk.choices if choice.delta.content)
            if received == 3:
                break
        await stream.close()
    finally:
        await client.close()
    async with stack.gateway() as gateway:
        entries = await settled(gateway, "gone")
    assert [("COMMITTED", None)] == [(entry.state, entry.reason) for entry in entries]
    counted = input_tokens(text)
    delivered_max = 39  # fewer than the 40 the upstream would have sent: the stream stopped early
    assert (
        charge("gpt-4o-mini", counted, 3) <= entries[0].charged_micro <= charge("gpt-4o-mini", counted, delivered_max)
    )


async def test_a_client_retry_with_the_same_call_id_is_never_billed_twice(stack: Stack) -> None:
    """The same x-litellm-call-id sent again after the call was charged: 409 request_already_billed, no upstream hit."""
    await fund(stack, "same-id", 1_000_000)
    headers = {"x-litellm-call-id": "client-retry-1"}
    client = stack.proxies[0].openai()
    try:
        first = await outcome(client, **ask("out=2", "same-id", max_tokens=5, extra_headers=headers))
        async with stack.gateway() as gateway:
            await settled(gateway, "same-id")
        before = (await stack.upstream.hits()).get("total", 0)
        with pytest.raises(openai.APIStatusError) as again:
            await client.chat.completions.create(**ask("out=2", "same-id", max_tokens=5, extra_headers=headers))
    finally:
        await client.close()
    assert "tok tok" == first
    body = again.value.body
    assert isinstance(body, dict)
    assert (409, "request_already_billed", "COMMITTED") == (
        again.value.status_code,
        body["provider_specific_fields"]["error"],
        body["provider_specific_fields"]["state"],
    )
    assert before == (await stack.upstream.hits()).get("total", 0)
    async with stack.gateway() as gateway:
        entries = await settled(gateway, "same-id")
    expected = [("COMMITTED", "litellm-client-retry-1", charge("gpt-4o-mini", 12, 2))]
    assert expected == [(entry.state, entry.request_id, entry.charged_micro) for entry in entries]
