"""The finalize loop end to end: engine → projection → Redis stream → worker → real settlement simulator (SPEC §8)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from pathlib import Path

import msgspec
import pytest

from tests.settlement_fixtures import KEYS, Loop, S, commit, finalized, funded, loop
from tollway import Engine
from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.core.breaker import BreakerState
from tollway.core.commands import EntryResult, Refusal, RefusalCode
from tollway.finalizer import ESCALATION_WINDOW_MS
from tollway.redis.parity import differences
from tollway.redis.queue import FinalizeQueue
from tollway.redis.server import EmbeddedRedis
from tollway.wal.segments import iter_events

__all__ = ["loop"]


async def test_commits_reach_finalize_acked_exactly_once(loop: Loop) -> None:
    """Every committed charge is finalized once with its charged amount, and the queue ends empty."""
    await funded(loop)
    ids = [await commit(loop, "acct", f"r{i}", 5_000, 1_000 + i) for i in range(12)]
    await loop.drain()
    assert dict.fromkeys(ids, S.FINALIZE_ACKED) == loop.states()
    assert {entry_id: (1_000 + i, 1) for i, entry_id in enumerate(ids)} == finalized(loop)
    assert {"stream": 0, "pending": 0, "delayed": 0, "poison": 0} == await loop.queue.depths()
    assert [] == await differences(loop.client, KEYS, loop.engine.state)


async def test_outage_opens_breaker_spends_no_attempts_and_recovers(loop: Loop) -> None:
    """During an outage the breaker opens and no attempt is spent; afterwards every entry is acked once."""
    await funded(loop)
    ids = [await commit(loop, "acct", f"r{i}", 5_000, 2_000) for i in range(8)]
    loop.faults(outage=True)
    await loop.drain()
    assert BreakerState.OPEN == loop.worker.breaker_state()
    calls_when_opened = loop.worker.calls
    assert 5 <= calls_when_opened <= 8  # calls already in flight when the fifth failure came back
    for _ in range(10):  # time passes inside the cooldown: no call, no attempt spent
        loop.clock.advance(2_000)
        await loop.drain()
    assert calls_when_opened == loop.worker.calls
    assert all(state is S.FINALIZE_PENDING for state in loop.states().values())
    members: list[bytes] = await loop.client.zrange(KEYS.delayed, 0, -1)  # type: ignore[assignment]
    delayed = [msgspec.json.decode(m)["attempt"] for m in members]
    messages: list[tuple[bytes, dict[bytes, bytes]]] = await loop.client.xrange(KEYS.finalize)  # type: ignore[assignment]
    queued = [fields[b"attempt"].decode() for _, fields in messages]
    assert ["2"] * 8 == delayed + queued  # one real attempt each, none spent while OPEN
    loop.faults(outage=False)
    await loop.drain(advance_ms=5_000, rounds=40)
    assert BreakerState.CLOSED == loop.worker.breaker_state()
    assert dict.fromkeys(ids, S.FINALIZE_ACKED) == loop.states()
    assert dict.fromkeys(ids, (2000, 1)) == finalized(loop)
    assert [] == loop.alerts


async def test_an_outage_leaves_a_trace_in_the_log_and_a_next_probe_time(
    loop: Loop, caplog: pytest.LogCaptureFixture
) -> None:
    """Each failing call logs a line; each breaker change logs once with its reason; the view shows the next probe."""
    caplog.set_level(logging.INFO, logger="tollway.finalizer")
    await funded(loop)
    for i in range(8):
        await commit(loop, "acct", f"r{i}", 5_000, 2_000)
    loop.faults(outage=True)
    await loop.drain()
    opened_at, cooldown_ms = loop.worker.breaker.opened_at_ms, loop.worker.breaker.config.cooldown_ms
    assert opened_at is not None
    view = loop.worker.breaker_view()
    assert ("OPEN", opened_at + cooldown_ms) == (view["state"], view["next_probe_at_ms"])
    loop.faults(outage=False)
    await loop.drain(advance_ms=5_000, rounds=40)
    lines = [record.getMessage() for record in caplog.records if record.name == "tollway.finalizer"]
    changes = [line.split(": ")[0] for line in lines if line.startswith("settlement breaker")]
    expected = [f"settlement breaker {move}" for move in ("CLOSED -> OPEN", "OPEN -> HALF_OPEN", "HALF_OPEN -> CLOSED")]
    assert expected == changes
    opened = next(line for line in lines if line.startswith("settlement breaker CLOSED -> OPEN"))
    assert f"5 failures within 60000 ms (threshold 5); next probe in {cooldown_ms} ms" in opened
    assert loop.worker.calls - 8 == sum("failed: HTTP 503" in line for line in lines)  # the 8 successes log nothing
    assert (None, "CLOSED") == (loop.worker.breaker_view()["next_probe_at_ms"], loop.worker.breaker_view()["state"])


async def test_terminal_status_is_poison_at_once_and_bulk_replay_acks(loop: Loop) -> None:
    """A 422 dead-letters the entry after one attempt with one alert; bulk replay later acks it."""
    await funded(loop)
    ids = [await commit(loop, "acct", f"r{i}", 5_000, 3_000) for i in range(3)]
    loop.faults(status_override=422)
    await loop.drain()
    assert dict.fromkeys(ids, S.FINALIZE_FAILED) == loop.states()
    assert 3 == loop.worker.calls
    assert ["finalize_poison"] * 3 == [kind for kind, _ in loop.alerts]
    assert 3 == (await loop.queue.depths())["poison"]
    loop.faults()
    report = await loop.worker.replay_dead_letters()
    await loop.project()
    assert (3, 3, 0, 0) == (report.examined, report.acked, report.still_failing, report.skipped)
    assert dict.fromkeys(ids, S.FINALIZE_ACKED) == loop.states()
    assert 0 == (await loop.queue.depths())["poison"]
    assert [] == await differences(loop.client, KEYS, loop.engine.state)


async def test_retries_follow_backoff_then_poison(loop: Loop) -> None:
    """A settlement that keeps failing is retried on the backoff schedule, then dead-lettered with one alert."""
    await funded(loop)
    entry_id = await commit(loop, "acct", "r", 5_000, 4_000)
    loop.faults(error_rate=1.0)
    calls = []
    for _ in range(40):
        await loop.drain()
        calls.append(loop.worker.calls)
        loop.clock.advance(500)
    assert S.FINALIZE_FAILED == loop.states()[entry_id]
    assert 5 == loop.worker.calls
    first_call_round = [calls.index(n) for n in range(1, 6)]
    gaps_ms = [(b - a) * 500 for a, b in itertools.pairwise(first_call_round)]
    assert [1_000, 2_000, 4_000, 8_000] == gaps_ms
    assert [("finalize_poison", entry_id)] == [(kind, d["billing_entry_id"]) for kind, d in loop.alerts]


async def test_escalation_fires_once_per_entry_even_across_restarts(loop: Loop, tmp_path: Path) -> None:
    """24 h after failing, a dead letter raises one escalation alert, recorded so it never repeats."""
    await funded(loop)
    entry_id = await commit(loop, "acct", "r", 5_000, 1_000)
    loop.faults(status_override=400)
    await loop.drain()
    loop.clock.advance(ESCALATION_WINDOW_MS - 1)
    await loop.drain()
    assert ["finalize_poison"] == [kind for kind, _ in loop.alerts]
    loop.clock.advance(1)
    await loop.drain()
    await loop.drain()
    assert ["finalize_poison", "finalize_escalation"] == [kind for kind, _ in loop.alerts]
    assert entry_id in loop.engine.state.escalations
    settings = loop.engine.settings
    await loop.engine.close()
    async with Engine.open(settings=settings, clock=loop.clock) as reopened:
        assert entry_id in reopened.state.escalations


async def test_a_message_held_by_a_dead_consumer_is_reclaimed(loop: Loop, redis_server: EmbeddedRedis) -> None:
    """A worker that read a message and died leaves it pending; another consumer claims and acks it once."""
    await funded(loop)
    entry_id = await commit(loop, "acct", "r", 5_000, 1_500)
    await loop.project()
    dead = FinalizeQueue(loop.client, KEYS, "worker-dead")
    delivered = await dead.read()
    assert [entry_id] == [fields[b"billing_entry_id"].decode() for _, fields in delivered]  # type: ignore[index]
    assert 0 == await loop.worker.run_once()  # nothing new to read; not idle long enough yet
    await asyncio.sleep(0.06)  # XAUTOCLAIM measures idleness on the Redis server's clock
    assert 1 == await loop.worker.run_once()
    await loop.project()
    assert S.FINALIZE_ACKED == loop.states()[entry_id]
    assert {entry_id: (1_500, 1)} == finalized(loop)
    assert {"stream": 0, "pending": 0, "delayed": 0, "poison": 0} == await loop.queue.depths()


async def test_risk_cap_refuses_new_holds_until_settled(loop: Loop) -> None:
    """Unsettled exposure above 500 CU blocks new holds (402); settling lifts it."""
    await funded(loop)
    loop.faults(outage=True)
    for i in range(6):  # 6 × $1 = 600 CU unsettled
        await commit(loop, "acct", f"big{i}", 1_000_000, 1_000_000)
    refused = await loop.engine.execute(cmd.Reserve("acct", "next", 1))
    assert isinstance(refused, Refusal)
    assert RefusalCode.PENDING_SETTLEMENT_LIMIT == refused.code
    loop.faults()
    await loop.drain(advance_ms=5_000, rounds=20)
    assert isinstance(await loop.engine.execute(cmd.Reserve("acct", "next", 1)), EntryResult)


async def test_reconciliation_cap_refuses_new_holds_until_replayed(loop: Loop) -> None:
    """When dead letters reach the cap, new holds get 503 billing_service_unavailable; replay lifts it."""
    await funded(loop)
    loop.faults(status_override=403)
    for i in range(3):
        await commit(loop, "acct", f"r{i}", 1_000, 1_000)
    await loop.drain()
    refused = await loop.engine.execute(cmd.Reserve("acct", "blocked", 1))
    assert isinstance(refused, Refusal)
    assert (RefusalCode.BILLING_SERVICE_UNAVAILABLE, 30) == (refused.code, refused.details["retry_after_seconds"])
    loop.faults()
    await loop.worker.replay_dead_letters()
    assert isinstance(await loop.engine.execute(cmd.Reserve("acct", "blocked", 1)), EntryResult)


async def test_flushed_redis_requeues_pending_and_nothing_is_finalized_twice(loop: Loop) -> None:
    """After a FLUSHALL the rebuild requeues every pending charge; each is still finalized exactly once."""
    await funded(loop)
    first = [await commit(loop, "acct", f"a{i}", 5_000, 1_000) for i in range(4)]
    await loop.drain()
    loop.faults(outage=True)
    second = [await commit(loop, "acct", f"b{i}", 5_000, 2_000) for i in range(4)]
    await loop.drain()
    await loop.client.flushall()
    loop.faults()
    loop.worker.reset_breaker()
    await loop.queue.ensure_group()
    await loop.drain(advance_ms=5_000, rounds=20)
    assert dict.fromkeys(first + second, S.FINALIZE_ACKED) == loop.states()
    assert all(calls == 1 for _, calls in finalized(loop).values())
    assert 8 == len(finalized(loop))


async def test_a_full_redis_does_not_stop_the_worker(loop: Loop) -> None:
    """At maxmemory the worker cannot even create its consumer group: it waits, then finalizes as usual."""
    await funded(loop)
    await loop.client.flushall()
    await loop.client.config_set("maxmemory", "1")  # every write that may grow memory is refused now
    task = asyncio.create_task(loop.worker.run())
    try:
        await asyncio.sleep(0.5)
        assert not task.done()
        await loop.client.config_set("maxmemory", "0")
        entry = await commit(loop, "acct", "after", 5_000, 1_000)
        async with asyncio.timeout(20):
            while loop.states()[entry] is not S.FINALIZE_ACKED:
                await loop.project()
                await asyncio.sleep(0.05)
        assert {entry: (1_000, 1)} == finalized(loop)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_void_during_a_replays_settlement_call_is_recorded_as_a_discrepancy(loop: Loop) -> None:
    """Settlement confirms a dead letter voided mid-call: the ack is refused, counted apart, recorded and alerted."""
    await funded(loop)
    entry_id = await commit(loop, "acct", "r", 5_000, 3_000)
    loop.faults(status_override=422)
    await loop.drain()
    assert S.FINALIZE_FAILED == loop.states()[entry_id]
    loop.faults(latency_ms=300)
    replay = asyncio.create_task(loop.worker.replay_dead_letters())
    for _ in range(200):
        if entry_id in loop.worker.in_flight:
            break
        await asyncio.sleep(0.005)
    assert {entry_id} == loop.worker.in_flight
    voided = await loop.engine.execute(cmd.Void(entry_id, "customer refund", "ops"))
    assert isinstance(voided, EntryResult)
    report = await replay
    assert (1, 0, 0, 0, 1) == (report.examined, report.acked, report.still_failing, report.skipped, report.refused)
    assert S.VOIDED == loop.states()[entry_id]
    assert {entry_id: (3_000, 1)} == finalized(loop)  # settled there, refunded here: the discrepancy
    notes = [
        event.payload
        for event in iter_events(loop.engine.settings.wal_dir)
        if isinstance(event.payload, ev.BillingReconciliation) and event.billing_entry_id == entry_id
    ]
    assert ["settled_after_void"] == [note.kind for note in notes]
    assert ("finalize_discrepancy", entry_id) == (loop.alerts[-1][0], loop.alerts[-1][1]["billing_entry_id"])
