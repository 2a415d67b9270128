"""The whole loop with real processes: ``tollway serve``, its Redis, ``tollway settlement-sim``; outage and recovery.

The breaker's cooldown is shortened to :data:`COOLDOWN_MS` with ``TOLLWAY_BREAKER_COOLDOWN_MS``
(the default is SPEC §8's 30 s), long enough for the checks made while it is OPEN to end before
the half-open probe — the test asserts that they did — and short enough to keep the test quick.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final

import pytest

from tests.e2e_gateway import all_entries
from tests.e2e_support import POLL_S, Simulator, audit, sdk, serving
from tollway.client import AsyncClient, Entry

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to follow the embedded redis-server")

ACCOUNTS: Final = ("team-a", "team-b", "team-c")
MINT_MICRO: Final = 5_000_000
TASKS: Final = 12
ESTIMATE_MICRO_MAX: Final = 5_000
SEED: Final = 20_260_402
BREAKER_OPEN_TIMEOUT_S: Final = 20.0
SIM_SETTLED_TIMEOUT_S: Final = 10.0
RECOVERY_TIMEOUT_S: Final = 60.0  # the cooldown, the probe, the postponed retries, a loaded machine
SIM_QUIET_S: Final = 0.2  # two equal stats reads this far apart: no settlement call is in flight
COOLDOWN_MS: Final = 8_000
SERVE_ENV: Final = {"TOLLWAY_BREAKER_COOLDOWN_MS": str(COOLDOWN_MS)}


async def _burst(gateway: AsyncClient, label: str, rounds: int, rng: random.Random) -> list[Entry]:
    """``TASKS`` concurrent gateways, each ``rounds`` × (reserve, commit at or under the estimate); the commits."""

    async def one(task: int) -> list[Entry]:
        account, local = ACCOUNTS[task % len(ACCOUNTS)], random.Random(rng.randrange(1 << 32))
        done = []
        for index in range(rounds):
            estimate = local.randint(1, ESTIMATE_MICRO_MAX)
            hold = await gateway.reserve(account, f"{label}-{task}-{index}", estimated_cost_micro=estimate)
            done.append(await gateway.commit(hold.billing_entry_id, actual_cost_micro=local.randint(0, estimate)))
        return done

    return [entry for entries in await asyncio.gather(*(one(task) for task in range(TASKS))) for entry in entries]


async def _quiet_stats(sim: Simulator) -> dict[str, Any]:
    """The simulator's stats once two reads ``SIM_QUIET_S`` apart agree (nothing in flight)."""
    deadline = time.monotonic() + SIM_SETTLED_TIMEOUT_S
    previous = await sim.stats()
    while True:
        await asyncio.sleep(SIM_QUIET_S)
        current = await sim.stats()
        if current == previous or time.monotonic() > deadline:
            return current
        previous = current


async def _commit_until_breaker_opens(
    gateway: AsyncClient, admin: AsyncClient, rng: random.Random
) -> tuple[list[Entry], float]:
    """Keep committing during the outage until the breaker says OPEN; the commits, and when it was last CLOSED."""
    committed: list[Entry] = []
    deadline = time.monotonic() + BREAKER_OPEN_TIMEOUT_S
    for burst in range(1_000):  # a bound; the deadline ends it first
        closed_at = time.monotonic()  # the breaker was not OPEN yet when this burst began
        committed += await _burst(gateway, f"outage-{burst}", 1, rng)
        if await admin.breaker() == "OPEN":
            return committed, closed_at
        assert time.monotonic() < deadline, f"the breaker did not open within {BREAKER_OPEN_TIMEOUT_S} s"
        await asyncio.sleep(POLL_S)
    raise AssertionError("the breaker did not open")


async def _wait_all_acked(admin: AsyncClient, count: int) -> list[Entry]:
    """Poll until ``count`` entries exist and all are FINALIZE_ACKED; the entries."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while True:
        entries = await all_entries(admin, ACCOUNTS)
        states = Counter(entry.state for entry in entries)
        if {"FINALIZE_ACKED": count} == states:
            return entries
        assert time.monotonic() < deadline, f"not all finalized within {RECOVERY_TIMEOUT_S} s: {states}"
        await asyncio.sleep(POLL_S * 10)


@pytest.mark.slow
async def test_settlement_outage_and_recovery_finalizes_every_commit_once(tmp_path: Path) -> None:
    """Commits go on through an outage (breaker OPEN, no calls), then every one is acked and settled exactly once."""
    rng, data = random.Random(SEED), tmp_path / "d"
    sim = Simulator(data, tmp_path)
    try:
        await sim.ready()
        async with serving(data, tmp_path, "serve", settlement_url=sim.url, env=SERVE_ENV) as serve:
            admin_token, gateway_token = serve.printed_token("admin"), serve.printed_token("gateway")
            async with sdk(serve.url, gateway_token) as gateway, sdk(serve.url, admin_token) as admin:
                for account in ACCOUNTS:
                    await admin.credit(account, f"mint-{account}", MINT_MICRO)
                committed = await _burst(gateway, "healthy", 5, rng)
                assert "CLOSED" == await admin.breaker()

                await sim.set_faults(outage=True)
                during, closed_at = await _commit_until_breaker_opens(gateway, admin, rng)
                quiet = await _quiet_stats(sim)
                during += await _burst(gateway, "open", 3, rng)  # the breaker is OPEN: commits still succeed
                assert quiet == await _quiet_stats(sim), "settlement was called while the breaker was OPEN"
                elapsed_s = time.monotonic() - closed_at
                assert elapsed_s < COOLDOWN_MS / 1000, f"OPEN checks took {elapsed_s:.1f} s: the probe may have run"
                assert quiet["finalize_calls"].get("503", 0) > 0
                assert {"FINALIZE_PENDING"} == {entry.state for entry in during}
                by_id = {entry.billing_entry_id: entry for entry in await all_entries(admin, ACCOUNTS)}
                assert {"FINALIZE_PENDING"} == {by_id[entry.billing_entry_id].state for entry in during}
                assert "OPEN" == await admin.breaker()

                await sim.set_faults(outage=False)
                committed += during
                settled = await _wait_all_acked(admin, len(committed))
                assert "CLOSED" == await admin.breaker()
                assert [] == list((await admin.dead_letters()).items)
                charged = {entry.billing_entry_id: entry.charged_micro for entry in committed}
                assert charged == {entry.billing_entry_id: entry.charged_micro for entry in settled}
                balances = [await admin.balance(account) for account in ACCOUNTS]
                assert [0] * len(ACCOUNTS) == [balance.unsettled_micro for balance in balances]
            assert 0 == await serve.sigterm()

        finalized = await sim.finalized()
        assert [] == [key for key, n in Counter(item.reservation_id for item in finalized).items() if n > 1]
        assert charged == {item.reservation_id: item.actual_cost_micro for item in finalized}
        stats = await sim.stats()
        assert (len(committed), 0) == (stats["finalized"], stats["conflicts"])
    finally:
        await sim.close()
    result = await audit(data, tmp_path)
    assert 0 == result.returncode, result.stdout + result.stderr
