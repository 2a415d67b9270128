"""Capacity, the memory half (issue 22): settled entries leave memory but for their idempotency records.

A settled entry leaves the engine's memory and snapshots but for a compact idempotency record,
and is read back from the log whenever it is asked for: repeats, reads, history, after a restart
and after Redis is rebuilt.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from tests.api_fixtures import ADMIN, GATEWAY, READ, Api, check_entry, check_error, open_api
from tollway import Engine
from tollway.audit import audit
from tollway.config import Durability, Settings
from tollway.core import commands as cmd
from tollway.core.commands import CreditKind, EntryResult
from tollway.core.decide import Fetch, Loaded, Replay, decide
from tollway.core.lifecycle import EntryState
from tollway.core.state import Snapshot, State, pack_seqs, unpack_seqs
from tollway.housekeeping import archive_once
from tollway.testing import FakeClock, MemoryEngine
from tollway.wal.segments import iter_events

DAY_MS = 24 * 3_600_000
RESPONSE = '{"choices": [{"text": "' + "x" * 2_000 + '"}]}'


@given(st.integers(0, (1 << 48) - 1), st.lists(st.integers(1, 1 << 40), max_size=12, unique=True))
def test_packed_sequences_round_trip(updated_at_ms: int, seqs: list[int]) -> None:
    """A record's time and event sequences come back exactly from their packed bytes."""
    ordered = tuple(sorted(seqs))
    assert (updated_at_ms, ordered) == unpack_seqs(pack_seqs(updated_at_ms, ordered))


def test_settled_entries_leave_memory_but_their_records() -> None:
    """After many commits with stored responses, memory holds no entry and no response, only small records."""
    mem = MemoryEngine()
    mem.execute(cmd.Credit("acct", "seed", CreditKind.MINT, 10**12))
    empty_bytes = len(msgspec.msgpack.encode(mem.state.to_snapshot()))  # an empty table's index segments included
    for i in range(500):
        held = mem.execute(cmd.Reserve("acct", f"r{i}", 1_000))
        assert isinstance(held, EntryResult)
        mem.execute(cmd.Commit(held.entry.billing_entry_id, 700, RESPONSE))
    state = mem.state
    assert (0, 0, 500, 0) == (len(state.entries), len(state.responses), len(state.settled), len(state.requests))
    added_bytes = len(msgspec.msgpack.encode(state.to_snapshot())) - empty_bytes
    assert added_bytes < 500 * 120, added_bytes  # packed rows only (~70 B each): no entry, no 2 KB response


def test_repeats_of_settled_entries_answer_exactly_as_whole_ones() -> None:
    """Replays (with the stored response), key reuse, wrong moves and a void of a settled charge, from the log."""
    mem = MemoryEngine()
    mem.execute(cmd.Credit("acct", "seed", CreditKind.MINT, 100_000))
    held = mem.execute(cmd.Reserve("acct", "r1", 1_000))
    assert isinstance(held, EntryResult)
    entry_id = held.entry.billing_entry_id
    mem.execute(cmd.Extend(entry_id, 600))
    done = mem.execute(cmd.Commit(entry_id, 700, RESPONSE))
    assert isinstance(done, EntryResult)
    assert entry_id in mem.state.settled
    again = mem.execute(cmd.Reserve("acct", "r1", 1_000))
    assert EntryResult(done.entry, replayed=True, response_json=RESPONSE) == again
    assert EntryResult(done.entry, replayed=True, response_json=RESPONSE) == mem.execute(cmd.Commit(entry_id, 700))
    reused = mem.execute(cmd.Reserve("acct", "r1", 999))
    assert isinstance(reused, cmd.Refusal)
    assert cmd.RefusalCode.IDEMPOTENCY_KEY_REUSED == reused.code
    wrong = mem.execute(cmd.Release(entry_id, "user_cancel"))
    assert isinstance(wrong, cmd.Refusal)
    assert (cmd.RefusalCode.INVALID_TRANSITION, "COMMITTED") == (wrong.code, wrong.details["current_state"])
    voided = mem.execute(cmd.Void(entry_id, "refund", "ops"))
    assert isinstance(voided, EntryResult)
    assert (EntryState.VOIDED, RESPONSE, 100_000) == (
        voided.entry.state,
        voided.response_json,
        mem.state.account("acct").available_micro,
    )
    assert EntryResult(voided.entry, replayed=True, response_json=RESPONSE) == mem.execute(
        cmd.Void(entry_id, "refund", "ops")
    )
    assert (voided.entry, RESPONSE) == mem.read_entry(entry_id)
    replayed = mem.fold()  # what a recovery rebuilds: the record, no whole entry
    assert ({}, [entry_id]) == (replayed.entries, list(replayed.settled))


async def _settled_workload(api: Api) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Six settled entries (commits with responses, a release) and one live hold; their bodies as served."""
    await api.mint("acct", 1_000_000)
    ids = []
    for i in range(6):
        entry_id = await api.held("acct", f"req-{i}", 1_000)
        if i == 5:
            await api.http.post(
                f"/v1/reservations/{entry_id}/release", json={"reason": "user_cancel"}, headers=api.auth(GATEWAY)
            )
        else:
            body = {"actual_cost_micro": str(500 + i), "response": {"text": f"answer {i}"}}
            response = await api.http.post(f"/v1/reservations/{entry_id}/commit", json=body, headers=api.auth(GATEWAY))
            assert 200 == response.status_code, response.text
        ids.append(entry_id)
    ids.append(await api.held("acct", "live", 1_000))
    bodies = {}
    for entry_id in ids:
        response = await api.http.get(f"/v1/reservations/{entry_id}", headers=api.auth(READ))
        assert 200 == response.status_code, response.text
        bodies[entry_id] = check_entry(response.json())
    return ids, bodies


async def _history(api: Api, limit: int) -> list[object]:
    """The account's whole history, page by page."""
    items: list[object] = []
    cursor = None
    while True:
        params = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
        page = (await api.http.get("/v1/accounts/acct/entries", params=params, headers=api.auth(READ))).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def test_settled_entries_are_served_from_the_log_after_a_restart_and_a_redis_rebuild(
    tmp_path: object, redis_url: str
) -> None:
    """GET, paged history and repeats of settled entries are the same after a restart and after Redis is rebuilt."""
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url)  # type: ignore[operator]
    clock = FakeClock()
    async with open_api(settings, clock) as api:
        ids, bodies = await _settled_workload(api)
        assert 6 == len(api.service.engine.state.settled)
        history = await _history(api, 2)
        assert [bodies[entry_id] for entry_id in ids] == history
    async with open_api(settings, clock) as api:
        assert {"text": "answer 0"} == bodies[ids[0]]["response"]
        assert history == await _history(api, 3)
        await api.service.redis.flushall()
        await api.service.projector.rebuild()
        for entry_id in ids:
            response = await api.http.get(f"/v1/reservations/{entry_id}", headers=api.auth(READ))
            assert bodies[entry_id] == response.json()
        body = {"account_id": "acct", "request_id": "req-0", "estimated_cost_micro": "1000"}
        replay = await api.http.post("/v1/reservations", json=body, headers=api.auth(GATEWAY))
        assert (200, {**bodies[ids[0]], "replayed": True}) == (replay.status_code, replay.json())
    report = audit(settings.data_dir)
    assert report.ok, report.problems
    assert (5, 1, 1) == (
        report.entries_by_state[EntryState.COMMITTED],
        report.entries_by_state[EntryState.RELEASED],
        report.entries_by_state[EntryState.RESERVE_HELD],
    )


async def test_archived_entries_answer_404_after_the_retention(tmp_path: object, redis_url: str) -> None:
    """Past the retention a settled entry is gone: GET is 404, its request id is new again, history skips it."""
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, entry_retention_hours=24)  # type: ignore[operator]
    clock = FakeClock()
    async with open_api(settings, clock) as api:
        ids, _ = await _settled_workload(api)
        clock.advance(2 * DAY_MS)
        assert (6, 1) == await archive_once(api.service.engine)
    async with open_api(settings, clock) as api:
        check_error(await api.http.get(f"/v1/reservations/{ids[0]}", headers=api.auth(READ)), 404, "not_found")
        assert [ids[-1]] == [item["billing_entry_id"] for item in await _history(api, 2)]  # type: ignore[index]
        fresh = await api.reserve("acct", "req-0", 1_000)
        assert 201 == fresh.status_code
        void = await api.http.post(f"/v1/entries/{ids[0]}/void", json={"reason": "late"}, headers=api.auth(ADMIN))
        check_error(void, 404, "not_found")


async def test_log_reads_through_the_sparse_index_equal_a_scan(tmp_path: Path) -> None:
    """Reads of any range, across segments and in a growing active segment, equal a scan of the files."""
    settings = Settings(data_dir=tmp_path / "data", segment_bytes=4096, durability=Durability.NONE)
    rng = random.Random(22)
    async with Engine.open(settings=settings, clock=FakeClock()) as engine:
        await engine.execute(cmd.Credit("acct", "seed", CreditKind.MINT, 10**9))
        for round_ in range(3):  # the index grows with the log between rounds
            for i in range(150):
                held = await engine.execute(cmd.Reserve("acct", f"r{round_}-{i}", 100))
                assert isinstance(held, EntryResult)
                await engine.execute(cmd.Commit(held.entry.billing_entry_id, 50, f'{{"n": {i}}}'))
            last = engine.durable_sequence
            scanned = list(iter_events(settings.wal_dir))
            assert last == len(scanned)
            for after, limit in [(0, 1), (0, last), (last - 1, 5), (last, 3)] + [
                (rng.randrange(last), rng.randrange(1, 300)) for _ in range(40)
            ]:
                assert scanned[after : after + limit] == await engine.log.read(after, limit)


def test_decide_asks_for_a_settled_entry_then_answers_from_what_was_read() -> None:
    """decide stays pure: a repeat of a settled entry is a Fetch of its events' sequences, then the usual replay."""
    mem = MemoryEngine()
    mem.execute(cmd.Credit("acct", "seed", CreditKind.MINT, 10_000))
    held = mem.execute(cmd.Reserve("acct", "r1", 1_000))
    assert isinstance(held, EntryResult)
    entry_id = held.entry.billing_entry_id
    mem.execute(cmd.Commit(entry_id, 700, RESPONSE))
    repeat = cmd.Reserve("acct", "r1", 1_000)
    fetch = decide(mem.state, repeat, 0, mem.policy, lambda: "unused")
    assert isinstance(fetch, Fetch)
    assert (entry_id, (2, 3)) == (fetch.billing_entry_id, fetch.sequences)  # reserve, commit (response: after it)
    read = mem.read_entry(entry_id)
    assert read is not None
    loaded = {entry_id: Loaded(fetch.record, read[0], read[1])}
    replay = decide(mem.state, repeat, 0, mem.policy, lambda: "unused", loaded=loaded)
    assert isinstance(replay, Replay)
    assert (True, read[0]) == (replay.outcome.replayed, replay.outcome.entry)  # type: ignore[union-attr]


def test_entries_from_an_older_snapshot_stay_whole_until_archived() -> None:
    """An entry without recorded sequences (as older snapshots hold) settles whole and answers as before."""
    mem = MemoryEngine()
    mem.execute(cmd.Credit("acct", "seed", CreditKind.MINT, 10_000))
    held = mem.execute(cmd.Reserve("acct", "r1", 1_000))
    assert isinstance(held, EntryResult)
    entry_id = held.entry.billing_entry_id
    old = msgspec.structs.replace(held.entry, event_seqs=())  # as an older snapshot decodes it
    mem.state.entries[entry_id] = old
    snapshot = msgspec.msgpack.decode(msgspec.msgpack.encode(mem.state.to_snapshot()), type=Snapshot)
    mem.state = State.from_snapshot(snapshot)
    done = mem.execute(cmd.Commit(entry_id, 700, RESPONSE))
    assert isinstance(done, EntryResult)
    assert (EntryState.COMMITTED, RESPONSE, {}) == (
        mem.state.entries[entry_id].state,
        mem.state.responses[entry_id],
        dict.fromkeys(mem.state.settled),
    )
    again = mem.execute(cmd.Reserve("acct", "r1", 1_000))
    assert EntryResult(done.entry, replayed=True, response_json=RESPONSE) == again
    mem.clock.advance(2 * DAY_MS)
    archived = mem.execute(cmd.Archive(mem.clock() - DAY_MS, 500))
    assert isinstance(archived, cmd.ArchiveResult)
    assert (1, None) == (archived.archived, mem.state.entry_state(entry_id))
