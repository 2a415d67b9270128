"""Entry retention: settled entries and credit records past ``entry_retention_hours`` leave the state.

The archiver writes ``entries_archived`` events; the fold drops the listed entries with their
idempotency keys and stored responses, and the listed credit idempotency records; the conservation
checks account for what the entries charged.
"""

from __future__ import annotations

import json

import msgspec
import pytest

from tollway import (
    Charge,
    Commit,
    Credit,
    CreditKind,
    CreditResult,
    Engine,
    EntryResult,
    EntryState,
    Refusal,
    RefusalCode,
    Reserve,
    Settings,
    housekeeping,
)
from tollway.audit import audit
from tollway.core import events as ev
from tollway.core.commands import Archive, ArchiveResult, FinalizeAck, FinalizeFail, Policy, Release, Void
from tollway.core.decide import Write, decide
from tollway.core.errors import ConfigError, InvalidInput, InvariantViolation
from tollway.core.ledger import Ledger, check_invariants
from tollway.core.state import State, request_key
from tollway.core.validate import validate
from tollway.housekeeping import archive_once
from tollway.testing import FakeClock
from tollway.wal import codec
from tollway.wal.segments import iter_events
from tollway.wal.snapshot import decode_snapshot, frame_snapshot

HOUR_MS = 3_600_000


async def mint(engine: Engine, account: str, amount: int) -> None:
    assert not isinstance(await engine.execute(Credit(account, f"mint-{account}", CreditKind.MINT, amount)), Refusal)


async def held(engine: Engine, account: str, request_id: str, estimate: int, **kwargs: object) -> str:
    result = await engine.execute(Reserve(account, request_id, estimate, **kwargs))  # type: ignore[arg-type]
    assert isinstance(result, EntryResult), result
    return result.entry.billing_entry_id


def ledger_problems(engine: Engine) -> list[str]:
    return check_invariants(engine.state, Ledger().post_all(iter_events(engine.settings.wal_dir)))


def balances(engine: Engine, account: str) -> tuple[int, int, int, int]:
    a = engine.balance(account)
    return a.available_micro, a.held_micro, a.charged_micro, a.unsettled_micro


async def test_settled_entries_past_retention_are_archived_and_live_ones_kept(
    settings: Settings, clock: FakeClock
) -> None:
    """Committed, released, charged and voided entries go after 24 h; a live hold stays; money stays."""
    async with Engine.open(settings=settings.replace(entry_retention_hours=24), clock=clock) as engine:
        await mint(engine, "acct", 100_000)
        committed = await held(engine, "acct", "r-commit", 1_000)
        assert isinstance(await engine.execute(Commit(committed, 700, response_json='{"n": 1}')), EntryResult)
        released = await held(engine, "acct", "r-release", 500)
        assert isinstance(await engine.execute(Release(released, "user_cancel")), EntryResult)
        charge = await engine.execute(Charge("acct", "r-charge", 300))
        assert isinstance(charge, EntryResult)
        voided = await held(engine, "acct", "r-void", 200)
        assert isinstance(await engine.execute(Commit(voided, 200)), EntryResult)
        assert isinstance(await engine.execute(Void(voided, "refund", "admin")), EntryResult)
        live = await held(engine, "acct", "r-live", 400, ttl_s=3600)
        before = balances(engine, "acct")

        clock.advance(23 * HOUR_MS)
        assert (0, 0) == await archive_once(engine)  # not old enough yet: idempotency keys still answer
        replay = await engine.execute(Reserve("acct", "r-commit", 1_000))
        assert isinstance(replay, EntryResult)
        assert replay.replayed
        assert '{"n": 1}' == replay.response_json

        clock.advance(2 * HOUR_MS)
        assert (4, 1) == await archive_once(engine)  # and the mint's credit record
        assert (0, 0) == await archive_once(engine)
        state = engine.state
        assert {live} == set(state.entries)
        assert EntryState.RESERVE_HELD is state.entries[live].state
        assert [request_key("acct", "r-live")] == list(state.requests)
        assert {} == state.responses
        assert (4, {"acct": 700 + 300}) == (state.archived_entries, state.archived_charged)
        assert before == balances(engine, "acct")  # archiving moves no money
        assert [] == ledger_problems(engine)  # charged = live entries + archived_charged

        gone = await engine.execute(Commit(committed, 700))
        assert isinstance(gone, Refusal)
        assert RefusalCode.NOT_FOUND is gone.code
        assert await engine.get_entry(committed) is None
        again = await engine.execute(Reserve("acct", "r-commit", 1_000))  # past retention: a new request
        assert isinstance(again, EntryResult)
        assert again.created
        assert again.entry.billing_entry_id != committed

    archived = [e for e in iter_events(settings.wal_dir) if isinstance(e.payload, ev.EntriesArchived)]
    assert 1 == len(archived)
    assert {(committed, "COMMITTED"), (released, "RELEASED"), (charge.entry.billing_entry_id, "COMMITTED")} | {
        (voided, "VOIDED")
    } == {(item.billing_entry_id, item.state) for item in archived[0].payload.entries}  # type: ignore[attr-defined]
    report = audit(settings.data_dir)
    assert report.ok, report.problems
    assert 4 == report.state.archived_entries


async def test_archived_state_survives_restart_from_snapshot_and_from_the_log(
    settings: Settings, clock: FakeClock
) -> None:
    """Reopening gives the same state whether it starts from the snapshot or replays every event."""
    retained = settings.replace(entry_retention_hours=24)
    async with Engine.open(settings=retained, clock=clock) as engine:
        await mint(engine, "acct", 10_000)
        for i in range(5):
            entry_id = await held(engine, "acct", f"r{i}", 100)
            assert isinstance(await engine.execute(Commit(entry_id, 60 + i)), EntryResult)
        clock.advance(25 * HOUR_MS)
        await held(engine, "acct", "fresh", 100)
        assert (5, 1) == await archive_once(engine)
        expected = engine.state.to_snapshot()
    async with Engine.open(settings=retained, clock=clock) as engine:  # from the snapshot close() wrote
        assert expected == engine.state.to_snapshot()
    for snapshot in settings.snapshot_dir.iterdir():
        snapshot.unlink()
    async with Engine.open(settings=retained, clock=clock) as engine:  # the whole log replayed
        assert expected == engine.state.to_snapshot()
        assert [] == ledger_problems(engine)


async def test_unsettled_charges_and_dead_letters_are_never_archived(settings: Settings, clock: FakeClock) -> None:
    """In settlement mode only confirmed charges go; pending and failed ones wait however old they are."""
    finalizing = settings.replace(entry_retention_hours=24, settlement_url="http://settlement.invalid")
    async with Engine.open(settings=finalizing, clock=clock) as engine:
        await mint(engine, "acct", 10_000)
        pending = await held(engine, "acct", "pending", 100)
        failed = await held(engine, "acct", "failed", 100)
        acked = await held(engine, "acct", "acked", 100)
        for entry_id in (pending, failed, acked):
            assert isinstance(await engine.execute(Commit(entry_id, 50)), EntryResult)
        assert isinstance(await engine.execute(FinalizeFail(failed, "gave up", 8)), EntryResult)
        assert isinstance(await engine.execute(FinalizeAck(acked)), EntryResult)
        clock.advance(30 * 24 * HOUR_MS)
        assert (1, 1) == await archive_once(engine)
        assert {pending: EntryState.FINALIZE_PENDING, failed: EntryState.FINALIZE_FAILED} == {
            entry_id: entry.state for entry_id, entry in engine.state.entries.items()
        }
        assert isinstance(await engine.execute(FinalizeAck(failed, source="admin")), EntryResult)
        assert (0, 0) == await archive_once(engine)  # just acknowledged: its retention starts now
        clock.advance(25 * HOUR_MS)
        assert (1, 0) == await archive_once(engine)
        assert [pending] == list(engine.state.entries)
        assert (100, 50) == (engine.state.archived_charged["acct"], engine.balance("acct").unsettled_micro)
        assert [] == ledger_problems(engine)


async def test_credit_records_past_retention_are_archived_and_their_ids_answer_until_then(
    settings: Settings, clock: FakeClock
) -> None:
    """A credit id replays (or refuses other parameters) for the retention, then the engine forgets it.

    Only the idempotency record goes: the balance and the ledger keep the money it moved.
    """
    async with Engine.open(settings=settings.replace(entry_retention_hours=24), clock=clock) as engine:
        old = Credit("acct", "topup-old", CreditKind.MINT, 5_000)
        deduct = Credit("acct", "fix-old", CreditKind.DEDUCT, 1_000)
        assert not isinstance(await engine.execute(old), Refusal)
        assert not isinstance(await engine.execute(deduct), Refusal)
        clock.advance(20 * HOUR_MS)
        recent = Credit("acct", "topup-new", CreditKind.CREDIT_NOTE, 300)
        assert not isinstance(await engine.execute(recent), Refusal)
        clock.advance(5 * HOUR_MS)  # the first two are 25 h old, the third 5 h

        replay = await engine.execute(old)  # before the archiver runs, a retry still replays
        assert isinstance(replay, CreditResult)
        assert replay.replayed
        assert (0, 2) == await archive_once(engine)
        assert [request_key("acct", "topup-new")] == list(engine.state.credits)
        assert 4_300 == engine.balance("acct").available_micro  # archiving moves no money
        assert [] == ledger_problems(engine)

        reused = await engine.execute(Credit("acct", "topup-new", CreditKind.CREDIT_NOTE, 301))
        assert isinstance(reused, Refusal)
        assert RefusalCode.IDEMPOTENCY_KEY_REUSED is reused.code
        again = await engine.execute(old)  # past the retention the id is new again, like a request id
        assert isinstance(again, CreditResult)
        assert not again.replayed
        assert 9_300 == engine.balance("acct").available_micro
        expected = engine.state.to_snapshot()
    async with Engine.open(settings=settings.replace(entry_retention_hours=24), clock=clock) as engine:
        assert expected == engine.state.to_snapshot()
    archived = [e.payload for e in iter_events(settings.wal_dir) if isinstance(e.payload, ev.EntriesArchived)]
    assert [((), ("topup-old", "fix-old"))] == [
        (p.entries, tuple(item.credit_id for item in p.credits)) for p in archived
    ]
    report = audit(settings.data_dir)
    assert report.ok, report.problems


async def test_a_backlog_is_archived_in_bounded_events(
    settings: Settings, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each event lists at most ARCHIVE_BATCH records, entries then credits, oldest first; one call drains all."""
    monkeypatch.setattr(housekeeping, "ARCHIVE_BATCH", 3)
    async with Engine.open(settings=settings.replace(entry_retention_hours=24), clock=clock) as engine:
        await mint(engine, "acct", 10_000)
        ids = []
        for i in range(7):
            ids.append(await held(engine, "acct", f"r{i}", 10))
            assert isinstance(await engine.execute(Release(ids[-1], "user_cancel")), EntryResult)
            clock.advance(1)
        for i in range(4):
            assert not isinstance(await engine.execute(Credit("acct", f"c{i}", CreditKind.MINT, 1)), Refusal)
        clock.advance(25 * HOUR_MS)
        assert (7, 5) == await archive_once(engine)  # 12 records: four full events, then nothing left
    events = [e.payload for e in iter_events(settings.wal_dir) if isinstance(e.payload, ev.EntriesArchived)]
    assert [ids[:3], ids[3:6], ids[6:], []] == [[item.billing_entry_id for item in p.entries] for p in events]
    assert [[], [], ["mint-acct", "c0"], ["c1", "c2", "c3"]] == [[item.credit_id for item in p.credits] for p in events]


async def test_retention_zero_keeps_every_entry(settings: Settings, clock: FakeClock) -> None:
    """``entry_retention_hours = 0`` turns the archiver off."""
    async with Engine.open(settings=settings.replace(entry_retention_hours=0), clock=clock) as engine:
        await mint(engine, "acct", 1_000)
        entry_id = await held(engine, "acct", "r", 10)
        assert isinstance(await engine.execute(Release(entry_id, "user_cancel")), EntryResult)
        clock.advance(10 * 365 * 24 * HOUR_MS)
        assert (0, 0) == await archive_once(engine)
        assert [entry_id] == [*engine.state.entries, *engine.state.settled]
        assert [request_key("acct", "mint-acct")] == list(engine.state.credits)


def _state_with_a_hold() -> tuple[State, str]:
    state = State()
    rate = ev.RateSnapshot(1000, 1_000_000, 0)
    state.apply(ev.Event(1, 0, "mint", "c", ev.CreditMint("acct", "m", 1_000)))
    state.apply(ev.Event(2, 0, "e1", "c", ev.BillingReserve("acct", "r1", 100, 60_000, rate, "f")))
    return state, "e1"


@pytest.mark.parametrize(
    ("released", "items", "refusal"),
    [
        (False, [("e1", "acct", "r1", "RESERVE_HELD")], "archive of RESERVE_HELD"),
        (True, [("e1", "other", "r1", "RELEASED")], "does not match"),
        (True, [("e1", "acct", "r1", "RELEASED")] * 2, "twice"),
        (False, [("nope", "acct", "r1", "RELEASED")], "unknown entry"),
    ],
    ids=["live_hold", "mismatched_record", "listed_twice", "unknown_entry"],
)
def test_the_fold_refuses_an_unsound_archive(released: bool, items: list[tuple[str, ...]], refusal: str) -> None:
    """Archiving what must stay, a record that does not describe its entry, a repeat or a stranger: a violation."""
    state, entry_id = _state_with_a_hold()
    if released:
        state.apply(ev.Event(3, 0, entry_id, "c", ev.BillingRelease("acct", 100, "user_cancel")))
    archive = ev.EntriesArchived(0, tuple(ev.ArchivedEntry(*item) for item in items))
    with pytest.raises(InvariantViolation, match=refusal):
        state.apply(ev.Event(state.last_sequence + 1, 0, "a1", "archiver", archive))
    assert state.entry_state(entry_id) is not None
    assert 0 == state.archived_before_ms


@pytest.mark.parametrize(
    ("items", "refusal"),
    [
        ([("acct", "m", "other-event")], "does not match"),
        ([("acct", "m", "mint")] * 2, "twice"),
        ([("acct", "nope", "mint")], "unknown credit"),
        ([("acct", "m", "mint"), ("bob", "m", "mint")], "unknown credit"),
    ],
    ids=["mismatched_record", "listed_twice", "unknown_credit", "one_of_two_unknown"],
)
def test_the_fold_refuses_an_unsound_credit_archive(items: list[tuple[str, ...]], refusal: str) -> None:
    """A credit archive naming a record that is not there, or not that one: a violation, nothing dropped."""
    state, _ = _state_with_a_hold()
    archive = ev.EntriesArchived(0, (), tuple(ev.ArchivedCredit(*item) for item in items))
    with pytest.raises(InvariantViolation, match=refusal):
        state.apply(ev.Event(state.last_sequence + 1, 0, "a1", "archiver", archive))
    assert [request_key("acct", "m")] == list(state.credits)
    assert 0 == state.archived_before_ms


def test_an_archive_event_from_before_credit_retention_decodes_with_no_credits() -> None:
    """``entries_archived`` records written before the ``credits`` field read as archiving none."""
    body = json.dumps(
        {
            "schema_version": ev.BILLING_WAL_SCHEMA_VERSION,
            "event_type": "entries_archived",
            "wal_sequence": 7,
            "timestamp_ms": 5,
            "billing_entry_id": "a1",
            "correlation_id": "archiver",
            "payload": {
                "older_than_ms": 3,
                "entries": [{"billing_entry_id": "e1", "account_id": "acct", "request_id": "r1", "state": "RELEASED"}],
            },
        }
    ).encode()
    event = codec.decode_body(body)
    assert ev.EntriesArchived(3, (ev.ArchivedEntry("e1", "acct", "r1", "RELEASED"),), ()) == event.payload


@pytest.mark.parametrize("limit", [0, -1, 1001, True])
def test_an_archive_command_out_of_bounds_is_refused(limit: int) -> None:
    with pytest.raises(InvalidInput):
        validate(Archive(0, limit))


def test_an_archive_command_with_nothing_to_archive_is_not_found() -> None:
    """Nothing made before the cutoff: NOT_FOUND. Later, the mint's record goes and the live hold stays."""
    state, _ = _state_with_a_hold()
    decision = decide(state, Archive(0, 10), 10**12, Policy(), lambda: "id")
    assert isinstance(decision, Refusal)
    assert RefusalCode.NOT_FOUND is decision.code
    assert not isinstance(decision, ArchiveResult)
    later = decide(state, Archive(10**12, 10), 10**12, Policy(), lambda: "id")
    assert isinstance(later, Write)
    assert (ev.EntriesArchived(10**12, (), (ev.ArchivedCredit("acct", "m", "mint"),)),) == later.payloads


@pytest.mark.parametrize(("hours", "ok"), [(0, True), (24, True), (23, False), (1, False), (168, True)])
def test_retention_is_off_or_at_least_a_day(hours: int, ok: bool) -> None:
    """Idempotency records must outlive retries (SPEC §6: at least 24 h)."""
    if ok:
        assert hours == Settings(entry_retention_hours=hours).entry_retention_hours
    else:
        with pytest.raises(ConfigError, match="entry_retention_hours"):
            Settings(entry_retention_hours=hours)


def test_a_snapshot_from_before_retention_reads_as_nothing_archived() -> None:
    """Snapshot files without the archive fields (written by earlier versions) still load: empty and zero."""
    state, _ = _state_with_a_hold()
    old = msgspec.to_builtins(state.to_snapshot(), builtin_types=(bytes, memoryview))
    for name in ("archived_charged", "archived_uncollected_micro", "archived_entries", "archived_before_ms"):
        del old[name]
    sequence, snap = decode_snapshot(frame_snapshot(state.last_sequence, [msgspec.msgpack.encode(old)]))
    loaded = State.from_snapshot(snap)
    assert (2, {}, 0, 0, 0) == (
        sequence,
        loaded.archived_charged,
        loaded.archived_uncollected_micro,
        loaded.archived_entries,
        loaded.archived_before_ms,
    )
    assert state.to_snapshot() == loaded.to_snapshot()
