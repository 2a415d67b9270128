"""The audit's comparisons with the Redis projection and with settlement's finalized list (SPEC §9)."""

from __future__ import annotations

from tests.settlement_fixtures import KEYS, Loop, commit, funded, loop
from tollway.audit import audit
from tollway.audit_live import redis_section, settlement_section
from tollway.housekeeping import archive_once
from tollway.redis.server import EmbeddedRedis
from tollway.settlement.contract import FinalizeRequest
from tollway.settlement.store import FinalizedBook

__all__ = ["loop"]


async def settled_loop(loop: Loop) -> list[str]:
    """Three charges finalized, one still pending (settlement down), the projection caught up."""
    await funded(loop)
    done = [await commit(loop, "acct", f"r{i}", 5_000, 1_000 + i) for i in range(3)]
    await loop.drain()
    loop.faults(outage=True)
    await commit(loop, "acct", "late", 5_000, 900)
    await loop.drain()
    loop.faults()
    await loop.engine.wait_durable(loop.engine.state.last_sequence)
    return done


async def test_clean_projection_and_settlement_pass(loop: Loop, redis_server: EmbeddedRedis) -> None:
    """With everything consistent both sections are clean."""
    await settled_loop(loop)
    report = audit(loop.engine.settings.data_dir)
    redis = await redis_section(report, redis_server.url, KEYS)
    settlement = await settlement_section(report, loop.settlement)
    assert ((), ()) == (redis.problems, settlement.problems)
    assert "3 charge(s) finalized at settlement" in settlement.notes


async def test_a_tampered_redis_balance_is_named(loop: Loop, redis_server: EmbeddedRedis) -> None:
    """A balance changed behind tollway's back shows up as a redis problem naming the account."""
    await settled_loop(loop)
    await loop.client.hincrby(KEYS.account("acct"), "available", 1)
    report = audit(loop.engine.settings.data_dir)
    section = await redis_section(report, redis_server.url, KEYS)
    assert any("account acct available" in problem for problem in section.problems)
    assert not report.with_section(section).ok


async def test_projection_at_another_sequence_is_not_called_parity(loop: Loop, redis_server: EmbeddedRedis) -> None:
    """If the projection lags the log, the audit says parity was not shown instead of passing."""
    await settled_loop(loop)
    report = audit(loop.engine.settings.data_dir)
    await loop.client.hset(KEYS.meta, "applied_seq", str(report.last_sequence - 1))
    section = await redis_section(report, redis_server.url, KEYS)
    assert not section.ok
    assert "parity cannot be shown" in section.problems[0]


async def test_settlement_records_unknown_here_are_problems(loop: Loop) -> None:
    """A reservation settlement finalized but tollway never charged is a reconciliation problem."""
    await settled_loop(loop)
    stranger = FinalizeRequest("01ARZ3NDEKTSV4RRFFQ69G5FAV", "acct", 777)
    assert 200 == (await loop.settlement.finalize(stranger)).status
    report = audit(loop.engine.settings.data_dir)
    section = await settlement_section(report, loop.settlement)
    assert ("settlement finalized 01ARZ3NDEKTSV4RRFFQ69G5FAV, which is unknown here",) == section.problems


async def test_acked_here_but_missing_at_settlement_is_a_problem(loop: Loop) -> None:
    """An entry recorded as FINALIZE_ACKED that settlement does not know is named."""
    done = await settled_loop(loop)
    amnesiac = FinalizedBook()  # settlement lost the record of the first charge
    for entry_id in done[1:]:
        entry = await loop.engine.get_entry(entry_id)
        assert entry is not None
        amnesiac.finalize(FinalizeRequest(entry_id, "acct", entry.charged_micro), loop.clock())
    loop.simulator.state.book = amnesiac
    report = audit(loop.engine.settings.data_dir)
    section = await settlement_section(report, loop.settlement)
    assert (f"{done[0]} is FINALIZE_ACKED but settlement has no record of it",) == section.problems


async def test_finalized_charges_archived_here_still_reconcile(loop: Loop) -> None:
    """Settlement's list keeps charges tollway archived past the retention: amounts are still compared."""
    done = await settled_loop(loop)
    loop.clock.advance(8 * 24 * 3_600_000)  # past the default 7-day retention
    assert 3 == (await archive_once(loop.engine)).entries
    assert not set(done) & set(loop.engine.state.entries)
    report = audit(loop.engine.settings.data_dir)
    section = await settlement_section(report, loop.settlement)
    assert () == section.problems
    assert "3 of them acknowledged and since archived here (past the retention)" in section.notes
    book = FinalizedBook()  # settlement recorded another amount for the first archived charge
    for entry_id in done:
        book.finalize(FinalizeRequest(entry_id, "acct", report.archived_acked[entry_id] + (entry_id == done[0])), 0)
    loop.simulator.state.book = book
    section = await settlement_section(report, loop.settlement)
    charged = report.archived_acked[done[0]]
    assert (f"{done[0]}: settlement has {charged + 1}, tollway charged {charged}",) == section.problems
