"""1,000 concurrent reserves over real HTTP against ``tollway serve``: exactly the funded hundred succeed."""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Final

import httpx
import pytest

from tests.e2e_support import audit, sdk, serving
from tollway.client import AsyncClient, Entry, InsufficientFunds
from tollway.config import REDIS_NICE

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to follow the embedded redis-server")

RESERVES: Final = 1_000
FUNDED_FOR: Final = 100
ESTIMATE_MICRO: Final = 10_000
ACCOUNT: Final = "acct-rush"


class CountingTransport(httpx.AsyncBaseTransport):
    """A transport that counts the HTTP statuses it received (the SDK returns entries, not statuses)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.statuses: Counter[int] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        self.statuses[response.status_code] += 1
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.slow
async def test_1000_concurrent_reserves_over_http_exactly_100_succeed(tmp_path: Path) -> None:
    """1,000 reserves at once on 1,000 connections for an account funded for 100: 100 × 201, 900 × 402, 0 left."""
    data = tmp_path / "d"
    async with serving(data, tmp_path, "serve") as serve:
        service_nice = os.getpriority(os.PRIO_PROCESS, serve.process.pid)
        redis_nice = os.getpriority(os.PRIO_PROCESS, serve.redis_pids[0])
        assert min(19, service_nice + REDIS_NICE) == redis_nice, "the embedded Redis yields to the billing path"
        async with sdk(serve.url, serve.printed_token("admin")) as admin:
            await admin.credit(ACCOUNT, "fund", FUNDED_FOR * ESTIMATE_MICRO)
            pool = httpx.Limits(max_connections=RESERVES, max_keepalive_connections=RESERVES)
            counting = CountingTransport(httpx.AsyncHTTPTransport(limits=pool))
            async with AsyncClient(serve.url, serve.printed_token("gateway"), transport=counting, timeout_s=60) as rush:
                results = await asyncio.gather(
                    *(rush.reserve(ACCOUNT, f"r-{n}", estimated_cost_micro=ESTIMATE_MICRO) for n in range(RESERVES)),
                    return_exceptions=True,
                )
            balance = await admin.balance(ACCOUNT)
        assert {201: FUNDED_FOR, 402: RESERVES - FUNDED_FOR} == dict(counting.statuses)
        held = {result.billing_entry_id for result in results if isinstance(result, Entry)}
        deficits = Counter(result.deficit_micro for result in results if isinstance(result, InsufficientFunds))
        assert (FUNDED_FOR, {ESTIMATE_MICRO: RESERVES - FUNDED_FOR}) == (len(held), dict(deficits))
        assert (0, FUNDED_FOR * ESTIMATE_MICRO) == (balance.available_micro, balance.held_micro)
        assert 0 == await serve.sigterm()
    result = await audit(data, tmp_path)
    assert 0 == result.returncode, result.stdout + result.stderr
