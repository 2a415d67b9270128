"""The LiteLLM callback when things break: the proxy killed mid-call, tollway unreachable.

One stack for the module (:mod:`tests.litellm_support`): the test upstream, ``tollway serve``
and two proxies: ``proxy-ttl``, whose holds live :data:`TTL_S` seconds, and ``proxy-nowhere``,
whose callback points at a loopback port where nothing listens.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from typing import Any, Final

import openai
import pytest

from tests.e2e_support import POLL_S, audit
from tests.litellm_support import Stack, ask, free_port, running_stack, settled

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to follow the embedded redis-server"),
]

TTL_S: Final = 2
HIT_TIMEOUT_S: Final = 30.0
EXPIRY_TIMEOUT_S: Final = 30.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    nowhere = f"http://127.0.0.1:{free_port()}"
    proxies: dict[str, dict[str, Any]] = {"proxy-ttl": {"ttl_s": TTL_S}, "proxy-nowhere": {"billing_url": nowhere}}
    with running_stack(tmp_path_factory.mktemp("litellm-faults"), proxies) as started:
        yield started


async def wait_for_hits(stack: Stack, total: int) -> None:
    deadline = time.monotonic() + HIT_TIMEOUT_S
    while (await stack.upstream.hits()).get("total", 0) < total:
        assert time.monotonic() < deadline, f"the upstream did not get {total} hits"
        await asyncio.sleep(POLL_S)


async def test_proxy_killed_mid_call_leaves_a_hold_that_expires_uncharged(stack: Stack) -> None:
    """kill -9 of the proxy while the upstream works: the hold expires by its TTL, nothing charged, audit clean."""
    proxy = stack.proxies[0]
    async with stack.admin() as admin:
        await admin.credit("killed", "mint-killed", 1_000_000)
    before = (await stack.upstream.hits()).get("total", 0)
    client = proxy.openai()
    call = asyncio.ensure_future(client.chat.completions.create(**ask("delay_ms=20000 out=5", "killed")))
    try:
        await wait_for_hits(stack, before + 1)
        async with stack.gateway() as gateway:
            held = [entry async for entry in gateway.iter_entries("killed")]
        assert ["RESERVE_HELD"] == [entry.state for entry in held]
        proxy.process.popen.kill()
        with pytest.raises(openai.APIConnectionError):
            await call
    finally:
        call.cancel()
        await client.close()
    async with stack.gateway() as gateway:
        entries = await settled(gateway, "killed", timeout_s=EXPIRY_TIMEOUT_S)
        balance = await gateway.balance("killed")
    assert [("RELEASED", 0)] == [(entry.state, entry.charged_micro) for entry in entries]
    assert (1_000_000, 0, 0) == (balance.available_micro, balance.held_micro, balance.charged_micro)
    report = await audit(stack.serve.data_dir, stack.serve.data_dir.parent)
    assert 0 == report.returncode, report.stdout + report.stderr


async def test_tollway_unreachable_refuses_calls_without_reaching_the_upstream(stack: Stack) -> None:
    """A proxy whose tollway cannot be reached fails closed: 503 billing_unavailable, no upstream hit."""
    before = (await stack.upstream.hits()).get("total", 0)
    client = stack.proxies[1].openai()
    try:
        refusals = []
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as refused:
                await client.chat.completions.create(**ask("hello", "anyone", stream=stream))
            body = refused.value.body
            assert isinstance(body, dict)
            refusals.append((refused.value.status_code, body["provider_specific_fields"]["error"]))
    finally:
        await client.close()
    assert [(503, "billing_unavailable")] * 2 == refusals
    assert before == (await stack.upstream.hits()).get("total", 0)
