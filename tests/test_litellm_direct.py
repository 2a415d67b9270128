"""tollway's LiteLLM callback in a Python app that calls ``litellm.acompletion`` itself (``litellm.callbacks``).

A real ``tollway serve`` and the test upstream (:mod:`tests.litellm_support`, no proxy); LiteLLM
runs in the test process. The tests share one event loop (LiteLLM's logging worker, which runs
the success and failure callbacks, lives on the loop it first started on).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import litellm
import pytest
import pytest_asyncio

from tests.litellm_support import Stack, charge, free_port, input_tokens, running_stack, settled
from tollway.integrations.litellm import BillingRefused, TollwayBilling

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to follow the embedded redis-server"),
]

MINT_MICRO: Final = 1_000_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("litellm-direct"), {}) as started:
        yield started


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def billing(stack: Stack) -> AsyncIterator[TollwayBilling]:
    """The callback registered in ``litellm.callbacks`` for the module.

    One instance for all the tests, as in an app: LiteLLM keeps the first instance of a callback
    class it saw for its success and failure events and ignores later ones of the same class.
    """
    callback = TollwayBilling(stack.serve.url, stack.gateway_token)
    saved = list(litellm.callbacks)
    litellm.callbacks = [callback]
    try:
        yield callback
    finally:
        litellm.callbacks = saved
        await callback.aclose()


async def complete(stack: Stack, text: str, account_id: str, **extra: Any) -> Any:
    return await litellm.acompletion(
        model="gpt-4o-mini",
        custom_llm_provider="openai",
        api_base=f"{stack.upstream.url}/v1",
        api_key="none",
        messages=[{"role": "user", "content": text}],
        metadata={"tollway_account": account_id},
        **extra,
    )


async def fund(stack: Stack, account_id: str) -> None:
    async with stack.admin() as admin:
        await admin.credit(account_id, f"mint-{account_id}", MINT_MICRO)


async def test_a_call_is_reserved_then_charged_its_usage(stack: Stack, billing: TollwayBilling) -> None:
    """``acompletion`` with the callback: one hold before the call, committed at the reported usage."""
    await fund(stack, "direct-ok")
    answer = await complete(stack, "hello out=6", "direct-ok", max_tokens=40)
    assert "tok tok tok tok tok tok" == answer.choices[0].message.content
    async with stack.gateway() as gateway:
        entries = await settled(gateway, "direct-ok")
    estimate = charge("gpt-4o-mini", input_tokens("hello out=6"), 40)
    expected = [("COMMITTED", estimate, charge("gpt-4o-mini", 12, 6))]
    assert expected == [(entry.state, entry.estimated_cost_micro, entry.charged_micro) for entry in entries]


async def test_a_stream_is_charged_its_final_usage(stack: Stack, billing: TollwayBilling) -> None:
    """A streamed ``acompletion`` is committed at the end of the stream from its final usage."""
    await fund(stack, "direct-stream")
    stream = await complete(stack, "out=4", "direct-stream", stream=True, stream_options={"include_usage": True})
    parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "tok tok tok tok" == "".join(parts)
    async with stack.gateway() as gateway:
        entries = await settled(gateway, "direct-stream")
    assert [("COMMITTED", charge("gpt-4o-mini", 12, 4))] == [(entry.state, entry.charged_micro) for entry in entries]


async def test_short_funds_raise_402_before_the_upstream_is_called(stack: Stack, billing: TollwayBilling) -> None:
    """Without funds ``acompletion`` raises BillingRefused 402 with tollway's body; the upstream is not called."""
    before = (await stack.upstream.hits()).get("total", 0)
    with pytest.raises(BillingRefused) as refused:
        await complete(stack, "hello", "direct-broke", max_tokens=10)
    assert (402, "insufficient_funds") == (refused.value.status_code, refused.value.body["error"])
    assert before == (await stack.upstream.hits()).get("total", 0)


async def test_a_failed_call_releases_its_hold(stack: Stack, billing: TollwayBilling) -> None:
    """An upstream 500 before any output: the hold is released and nothing is charged."""
    await fund(stack, "direct-fail")
    with pytest.raises(litellm.InternalServerError):
        await complete(stack, "fail=500", "direct-fail", max_tokens=10)
    async with stack.gateway() as gateway:
        entries = await settled(gateway, "direct-fail")
        balance = await gateway.balance("direct-fail")
    assert [("RELEASED", 0)] == [(entry.state, entry.charged_micro) for entry in entries]
    assert (MINT_MICRO, 0) == (balance.available_micro, balance.held_micro)


async def test_unreachable_tollway_refuses_the_call(stack: Stack, billing: TollwayBilling) -> None:
    """A callback whose tollway cannot be reached raises BillingRefused 503 and the upstream is not called."""
    before = (await stack.upstream.hits()).get("total", 0)
    callback = TollwayBilling(f"http://127.0.0.1:{free_port()}", stack.gateway_token, timeout_s=2.0)
    litellm.callbacks = [callback]  # the reserve (deployment hook) reads litellm.callbacks itself
    try:
        with pytest.raises(BillingRefused) as refused:
            await complete(stack, "hello", "direct-nowhere")
    finally:
        litellm.callbacks = [billing]
        await callback.aclose()
    assert (503, "billing_unavailable") == (refused.value.status_code, refused.value.body["error"])
    assert before == (await stack.upstream.hits()).get("total", 0)
