"""The smallest end-to-end loop: mint, reserve, commit, reopen."""

from __future__ import annotations

from tollway import Commit, Credit, CreditKind, Engine, EntryResult, EntryState, Reserve, Settings
from tollway.testing import FakeClock


async def test_reserve_commit_survives_restart(settings: Settings, clock: FakeClock) -> None:
    """A committed charge is still there, with the same balances, after the engine is reopened."""
    async with Engine.open(settings=settings, clock=clock) as engine:
        await engine.execute(Credit("acct-1", "mint-1", CreditKind.MINT, 1_000))
        held = await engine.execute(Reserve("acct-1", "req-1", 300))
        assert isinstance(held, EntryResult)
        done = await engine.execute(Commit(held.entry.billing_entry_id, 120))
        assert isinstance(done, EntryResult)
        assert EntryState.COMMITTED == done.entry.state
    async with Engine.open(settings=settings, clock=clock) as engine:
        balance = engine.balance("acct-1")
        assert (880, 0, 120) == (balance.available_micro, balance.held_micro, balance.charged_micro)
        assert 3 == engine.state.last_sequence
