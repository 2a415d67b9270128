"""The packed table of settled entries (issue 22): exact lookups, order, bytes round trip, hash collisions.

The table keeps hashes of request keys, never the keys: a request-key match is only a candidate,
confirmed against the entry read back from the log. These tests force every request key to
collide and check that a repeat still replays its own entry and a new request is still new.
"""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollway import Engine
from tollway.api.routes_accounts import history_page
from tollway.config import Durability, Settings
from tollway.core import commands as cmd
from tollway.core import settled as settled_module
from tollway.core.commands import CreditKind, EntryResult
from tollway.core.ids import encode_ulid, is_ulid
from tollway.core.lifecycle import EntryState
from tollway.core.settled import ROW_BYTES, Settled, SettledTable
from tollway.core.state import LegacySettled, Snapshot, State, pack_seqs, request_key
from tollway.testing import MemoryEngine

S = EntryState
STATES = (S.COMMITTED, S.FINALIZE_ACKED, S.RELEASED, S.VOIDED)

_ids = st.one_of(st.integers(0, (1 << 128) - 1).map(encode_ulid), st.sampled_from(["e1", "e2", "odd-id", "x"]))
_seqs = st.lists(st.integers(1, 1 << 45), min_size=1, max_size=7, unique=True).map(lambda s: tuple(sorted(s)))
_ops = st.lists(
    st.tuples(st.sampled_from(["add", "replace", "remove", "snapshot"]), _ids, st.sampled_from(STATES), _seqs),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_the_table_behaves_as_a_dict_of_records(ops: list[tuple[str, str, EntryState, tuple[int, ...]]]) -> None:
    """Any sequence of adds, moves and removals reads as an ordered dict would, and survives a bytes round trip."""
    table, model = SettledTable(), dict[str, tuple[str, EntryState, int, tuple[int, ...]]]()
    clock = itertools.count(1)
    for op, entry_id, state, seqs in ops:
        if op == "add" and entry_id not in model:
            now = next(clock)
            table.add(entry_id, "acct", f"req-{entry_id}", state=state, charged_micro=5, updated_at_ms=now, seqs=seqs)
            model[entry_id] = (f"req-{entry_id}", state, now, seqs)
        elif op == "replace" and entry_id in model:
            now, (request_id, _, _, old) = next(clock), model.pop(entry_id)
            new_seqs = (*old, old[-1] + seqs[0])
            table.replace(entry_id, S.VOIDED, 0, now, new_seqs[-1])
            model[entry_id] = (request_id, S.VOIDED, now, new_seqs)
        elif op == "remove" and entry_id in model:
            assert entry_id == table.remove(entry_id).billing_entry_id
            del model[entry_id]
        elif op == "snapshot":
            table = SettledTable.from_bytes(table.to_bytes())
    assert list(model) == list(table)
    assert len(model) == len(table)
    for entry_id, (request_id, state, now, seqs) in model.items():
        record = table.get(entry_id)
        assert record is not None
        assert (entry_id, state, now, seqs) == (
            record.billing_entry_id,
            record.state,
            record.updated_at_ms,
            record.seqs,
        )
        assert record in table.by_request("acct", request_id)
    assert table == SettledTable.from_bytes(table.to_bytes())


def test_growing_and_cutting_the_front_keep_every_lookup() -> None:
    """Thousands of rows (indexes doubled), most removed oldest first (front cut off): the rest still found."""
    table = SettledTable()
    ids = [encode_ulid((1 << 100) + i * 7919) for i in range(5_000)]
    for i, entry_id in enumerate(ids):
        table.add(
            entry_id,
            f"a{i % 3}",
            f"r{i}",
            state=S.FINALIZE_ACKED,
            charged_micro=0,
            updated_at_ms=i,
            seqs=(10 * i + 1, 10 * i + 2),
        )
    for entry_id in ids[:4_000]:
        table.remove(entry_id)
    assert (1_000, ids[4_000:]) == (len(table), list(table))
    assert all(table.get(entry_id) is None for entry_id in ids[:4_000])
    found = table.get(ids[4_500])
    assert found is not None
    assert ((45_001, 45_002), [found]) == (found.seqs, table.by_request("a0", "r4500"))
    assert {S.FINALIZE_ACKED: 1_000} == table.state_counts()
    index_bytes = sum(1 + 4 * len(segment) for segment in (*table._ids, *table._reqs))  # each: its size, its slots
    assert len(table.to_bytes()) < 1_000 * ROW_BYTES + index_bytes + 100  # the cut rows are not written


def test_sequences_too_many_or_too_far_apart_come_back_exact() -> None:
    """An entry with more events than a row holds, or far apart, keeps them all."""
    table = SettledTable()
    table.add(encode_ulid(1), "a", "r1", state=S.VOIDED, charged_micro=0, updated_at_ms=1, seqs=(1, 2, 3, 4, 5, 6))
    table.add(encode_ulid(2), "a", "r2", state=S.COMMITTED, charged_micro=9, updated_at_ms=2, seqs=(5, 5 + (1 << 33)))
    table = SettledTable.from_bytes(table.to_bytes())
    assert [(1, 2, 3, 4, 5, 6), (5, 5 + (1 << 33))] == [record.seqs for record in table.records()]


def test_damaged_table_bytes_are_refused() -> None:
    """Bytes that are not a table, or are cut short, raise ValueError (a snapshot is then skipped)."""
    table = SettledTable()
    table.add(encode_ulid(1), "a", "r1", state=S.COMMITTED, charged_micro=0, updated_at_ms=1, seqs=(1, 2))
    data = table.to_bytes()
    with pytest.raises(ValueError, match="not a settled-entry table"):
        SettledTable.from_bytes(b"XXXX" + data[4:])
    with pytest.raises(ValueError, match="cut short"):
        SettledTable.from_bytes(data[:100])


def _settle(mem: MemoryEngine, request_id: str, estimate: int = 1_000) -> EntryResult:
    held = mem.execute(cmd.Reserve("acct", request_id, estimate))
    assert isinstance(held, EntryResult)
    done = mem.execute(cmd.Commit(held.entry.billing_entry_id, 700, f'{{"r": "{request_id}"}}'))
    assert isinstance(done, EntryResult)
    return done


def test_colliding_request_hashes_never_mix_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request key hashing alike: repeats replay their own entry, new keys are new, reuse is refused."""
    monkeypatch.setattr(settled_module, "request_hash", lambda account_id, request_id: 42)
    mem = MemoryEngine()
    mem.execute(cmd.Credit("acct", "seed", CreditKind.MINT, 10**9))
    done = [_settle(mem, f"r{i}") for i in range(6)]
    assert 6 == len(mem.state.settled)
    for i, original in enumerate(done):
        again = mem.execute(cmd.Reserve("acct", f"r{i}", 1_000))
        assert EntryResult(original.entry, replayed=True, response_json=f'{{"r": "r{i}"}}') == again
    fresh = mem.execute(cmd.Reserve("acct", "r-new", 1_000))
    assert isinstance(fresh, EntryResult)
    assert (True, False) == (fresh.created, fresh.replayed)
    reused = mem.execute(cmd.Reserve("acct", "r3", 999))
    assert isinstance(reused, cmd.Refusal)
    assert (cmd.RefusalCode.IDEMPOTENCY_KEY_REUSED, done[3].entry.billing_entry_id) == (
        reused.code,
        reused.details["billing_entry_id"],
    )


async def test_colliding_request_hashes_on_the_file_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with the engine on the WAL, across a restart: candidates are read back from the segment files."""
    monkeypatch.setattr(settled_module, "request_hash", lambda account_id, request_id: 7)
    settings_ = Settings(data_dir=tmp_path, durability=Durability.NONE)
    ids = {}
    async with Engine.open(settings=settings_) as engine:
        await engine.execute(cmd.Credit("acct", "seed", CreditKind.MINT, 10**9))
        for i in range(4):
            held = await engine.execute(cmd.Reserve("acct", f"r{i}", 1_000 + i))
            assert isinstance(held, EntryResult)
            ids[i] = held.entry.billing_entry_id
            await engine.execute(cmd.Commit(held.entry.billing_entry_id, 700, f"resp-{i}"))
        await engine.snapshot_now()
    async with Engine.open(settings=settings_) as engine:
        assert 4 == len(engine.state.settled)
        for i in (3, 0, 2, 1):
            again = await engine.execute(cmd.Reserve("acct", f"r{i}", 1_000 + i))
            assert isinstance(again, EntryResult)
            assert (ids[i], True, f"resp-{i}") == (again.entry.billing_entry_id, again.replayed, again.response_json)
        fresh = await engine.execute(cmd.Reserve("acct", "r9", 1_000))
        assert isinstance(fresh, EntryResult)
        assert fresh.created


def test_a_snapshot_from_before_the_table_loads_into_it() -> None:
    """Records of the earlier format (with request keys) become rows; the request keys leave memory."""
    mem = MemoryEngine()
    mem.execute(cmd.Credit("acct", "seed", CreditKind.MINT, 10**9))
    done = [_settle(mem, f"r{i}") for i in range(3)]
    now = mem.state.to_snapshot()
    legacy = {}
    for result in done:
        entry = result.entry
        legacy[entry.billing_entry_id] = LegacySettled(
            request_key("acct", entry.request_id),
            entry.state,
            entry.charged_micro,
            pack_seqs(entry.updated_at_ms, entry.event_seqs),
        )
    requests = {request_key("acct", result.entry.request_id): result.entry.billing_entry_id for result in done}
    old = msgspec.structs.replace(now, settled_rows=b"", legacy_settled=legacy, requests=requests)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=Snapshot)
    assert now == State.from_snapshot(decoded).to_snapshot()


def test_records_are_values() -> None:
    """Two reads of one row are equal records; a move makes a different one (what a Fetch checks)."""
    table = SettledTable()
    table.add(encode_ulid(5), "a", "r", state=S.COMMITTED, charged_micro=10, updated_at_ms=1, seqs=(1, 2))
    first = table.get(encode_ulid(5))
    assert first == table.get(encode_ulid(5))
    table.replace(encode_ulid(5), S.VOIDED, 0, 2, 3)
    moved = table.get(encode_ulid(5))
    assert isinstance(moved, Settled)
    assert first != moved
    assert (S.VOIDED, (1, 2, 3)) == (moved.state, moved.seqs)


async def test_colliding_account_hashes_keep_histories_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every account hashing alike: an account's history still lists its own settled entries only."""
    monkeypatch.setattr(settled_module, "account_hash", lambda account_id: 3)
    async with Engine.open(settings=Settings(data_dir=tmp_path, durability=Durability.NONE)) as engine:
        made: dict[str, list[str]] = {"alice": [], "bob": []}
        for account in ("alice", "bob"):
            await engine.execute(cmd.Credit(account, "seed", CreditKind.MINT, 10**9))
        for i in range(6):
            account = ("alice", "bob")[i % 2]
            held = await engine.execute(cmd.Reserve(account, f"r{i}", 1_000))
            assert isinstance(held, EntryResult)
            await engine.execute(cmd.Commit(held.entry.billing_entry_id, 700))
            made[account].append(held.entry.billing_entry_id)
        for account, ids in made.items():
            page = await history_page(engine, account, frozenset(), None, 100)
            assert ids == [item["billing_entry_id"] for item in page["items"]]  # type: ignore[attr-defined]


def test_row_numbers_wrap_around_past_two_to_the_32() -> None:
    """Rows numbered across 2³² (and past the number that marks an empty slot) are all found."""
    table = SettledTable()
    table._base = table._head = table._tail = (1 << 32) - 3  # as after ~4.3 billion settled entries
    ids = [encode_ulid(1_000 + i) for i in range(6)]
    for i, entry_id in enumerate(ids):
        table.add(entry_id, "a", f"r{i}", state=S.COMMITTED, charged_micro=i, updated_at_ms=i, seqs=(i + 1,))
    table = SettledTable.from_bytes(table.to_bytes())
    assert ids == list(table)
    assert list(range(6)) == [table.get(entry_id).charged_micro for entry_id in ids]  # type: ignore[union-attr]
    assert [[ids[2]]] == [[record.billing_entry_id for record in table.by_request("a", "r2")]]
    table.remove(ids[0])
    assert ids[1:] == list(table)


def test_segments_grown_across_the_wrap_keep_row_order() -> None:
    """Segments doubling while row numbers wrap past 2³² take their rows in row order: same bytes, every row found."""
    eager, late = SettledTable(), SettledTable()
    ids = [encode_ulid(99 + i * 7_919) for i in range(12_000)]
    for table in (eager, late):
        table._base = table._head = table._tail = (1 << 32) - 6_000
        for i, entry_id in enumerate(ids):
            table.add(entry_id, "a", f"r{i}", state=S.COMMITTED, charged_micro=i, updated_at_ms=i, seqs=(i + 1,))
            if table is eager:
                table.catch_up()
    assert eager.to_bytes() == late.to_bytes()
    assert all(late.get(entry_id).charged_micro == i for i, entry_id in enumerate(ids))  # type: ignore[union-attr]


_ulid_like = st.one_of(
    st.integers(0, (1 << 130) - 1).map(lambda v: encode_ulid(v & ((1 << 128) - 1)) if v < 1 << 128 else f"{v:026X}"),
    st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcxyz_+- \n\u00e9\u0660", min_size=24, max_size=28),
    st.text(max_size=30),
)


@settings(max_examples=500, deadline=None)
@given(_ulid_like)
def test_an_id_is_kept_as_a_ulid_exactly_when_ids_calls_it_one(entry_id: str) -> None:
    """The table's fast ULID parse accepts what ``is_ulid`` accepts, with the value ``encode_ulid`` inverts."""
    value = settled_module._ulid_value(entry_id)
    assert is_ulid(entry_id) == (value is not None)
    if value is not None:
        assert entry_id == encode_ulid(value)


def test_indexes_caught_up_late_equal_indexes_kept_up_at_every_row() -> None:
    """Indexes filled once, at every row, or now and then (segments doubling on the way) hold the same bytes."""
    tables = SettledTable(), SettledTable(), SettledTable()
    ids = [encode_ulid((1 << 100) + i * 7919) for i in range(30_000)] + ["odd-1", "odd-2"]
    for kind, table in enumerate(tables):
        for i, entry_id in enumerate(ids):
            table.add(
                entry_id, f"a{i % 5}", f"r{i}", state=S.COMMITTED, charged_micro=i, updated_at_ms=i, seqs=(i + 1,)
            )
            if kind == 0 or (kind == 2 and (i % 7 == 0 or i % 997 == 0)):
                table.catch_up()  # every row (one at a time); now and then (a few rows, or a thousand at once)
            if i in {1_500, 20_000}:  # removals in between: the rows after them still go in, in order
                table.remove(ids[i - 1_490])
                table.replace(ids[i - 1_480], S.VOIDED, 0, i, 100_000 + i)
    eager, late, irregular = (table.to_bytes() for table in tables)
    assert eager == late == irregular
    assert max(len(segment) for segment in tables[1]._ids) >= 64  # segments did double, some more than once
    assert [[ids[29_999]]] == [[record.billing_entry_id for record in tables[1].by_request("a4", "r29999")]]


def test_growing_rebuilds_one_segment_not_the_whole_index() -> None:
    """Growth costs one segment's rows: a row that makes its segment double leaves every other segment's array alone."""
    table = SettledTable()
    for i in range(20_000):
        table.add(
            encode_ulid(i * 104_729 + 1), "a", f"r{i}", state=S.COMMITTED, charged_micro=0, updated_at_ms=i, seqs=(i,)
        )
        before = list(table._reqs)
        table.catch_up()
        replaced = [number for number, segment in enumerate(table._reqs) if segment is not before[number]]
        assert len(replaced) <= 1
    assert all(table.get(encode_ulid(i * 104_729 + 1)) is not None for i in range(0, 20_000, 37))


def _first_format(table: SettledTable) -> bytes:
    """``table`` as the first format wrote it (STB1: one array per index, ``2^bits`` slots each)."""
    table.catch_up()
    header = struct.pack("<4sQQQQBB", b"STB1", table._head, table._head, table._tail, len(table), 12, 12)
    start = (table._head - table._base) * ROW_BYTES
    stale_indexes = b"\xff" * (2 * 4 << 12)  # what they held does not matter: the rows are indexed anew
    return header + bytes(table._rows[start:]) + stale_indexes + msgspec.msgpack.encode(table._extras)


def test_a_table_of_the_first_format_loads_and_is_indexed_anew() -> None:
    """Snapshots written before the segmented indexes (STB1) load: every live row found, removed ones not."""
    table = SettledTable()
    ids = [encode_ulid(7_000 + i) for i in range(2_000)] + ["odd-id"]
    for i, entry_id in enumerate(ids):
        seqs = tuple(range(i + 1, i + 8)) if i == 3 else (i + 1, i + 2)
        table.add(entry_id, f"a{i % 3}", f"r{i}", state=S.COMMITTED, charged_micro=i, updated_at_ms=i, seqs=seqs)
    for entry_id in ids[:50]:
        table.remove(entry_id)
    loaded = SettledTable.from_bytes(_first_format(table))
    assert list(table) == list(loaded)
    assert all(loaded.get(entry_id) == table.get(entry_id) for entry_id in ids)
    assert [ids[1_999]] == [record.billing_entry_id for record in loaded.by_request("a1", "r1999")]
    assert loaded.get(ids[10]) is None
    assert loaded == SettledTable.from_bytes(loaded.to_bytes())


def _add_rows(table: SettledTable, first: int, count: int) -> None:
    for i in range(first, first + count):
        table.add(
            encode_ulid(i * 15_485_863 + 11),
            "a",
            f"r{i}",
            state=S.COMMITTED,
            charged_micro=1,
            updated_at_ms=i,
            seqs=(i,),
        )


def test_a_burst_of_settlements_after_a_read_goes_into_the_indexes_at_once() -> None:
    """Live work reads, then settles a group of commits with no read between: none of those rows waits for a catch-up.

    A replay reads nothing: rows appended long after the last read wait, and the bytes are the same either way.
    """
    live, kept_up = SettledTable(), SettledTable()
    _add_rows(live, 0, 1)
    live.by_request("a", "r0")  # a read: a reserve looking its request key up
    _add_rows(live, 1, 500)  # the commits of 500 callers, one after another
    assert live._unindexed == 0
    _add_rows(live, 501, 5_000)  # no read for thousands of rows: a replay
    assert live._unindexed > 0
    for i in range(5_501):
        _add_rows(kept_up, i, 1)
        kept_up.catch_up()
    assert live.to_bytes() == kept_up.to_bytes()


def test_segments_smaller_than_a_new_table_s_load_and_grow(monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot written when new segments had one slot loads, answers every lookup and keeps growing."""
    with monkeypatch.context() as patched:
        patched.setattr(settled_module, "_BITS_MIN", 0)
        old = SettledTable()
        _add_rows(old, 0, 3_000)
        data = old.to_bytes()
    assert min(len(segment) for segment in old._ids) < 1 << settled_module._BITS_MIN
    loaded = SettledTable.from_bytes(data)
    _add_rows(loaded, 3_000, 3_000)
    assert all(loaded.get(encode_ulid(i * 15_485_863 + 11)) is not None for i in range(6_000))
    assert [record.billing_entry_id for record in loaded.by_request("a", "r5999")] == [
        encode_ulid(5_999 * 15_485_863 + 11)
    ]
    assert loaded == SettledTable.from_bytes(loaded.to_bytes())
