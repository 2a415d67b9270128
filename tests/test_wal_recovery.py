"""WAL recovery on real files: torn tails, corruption, rotation, the writer lock, snapshots, fail-stop."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from tollway import (
    Commit,
    Credit,
    CreditKind,
    CreditResult,
    Engine,
    EngineStopped,
    EntryResult,
    Release,
    Reserve,
    Settings,
    WalCorrupt,
    WalIOFailure,
    WalLocked,
)
from tollway.config import Durability, WalSyncer
from tollway.core.events import Event
from tollway.core.ledger import Ledger, check_invariants
from tollway.core.state import Snapshot
from tollway.testing import RecordingObserver, fold
from tollway.wal import codec, segments
from tollway.wal.file_log import FileLog
from tollway.wal.log import recover
from tollway.wal.snapshot import decode_snapshot, list_snapshots

ACCOUNT: Final = "acct-1"
MIN_SEGMENT_BYTES: Final = 4096


# -- helpers -------------------------------------------------------------------------------


async def _traffic(engine: Engine, rounds: int, tag: str = "") -> None:
    """Sequential mints, reserve+commit and reserve+release: one or two records per command."""
    for index in range(rounds):
        key = f"{tag}{index}"
        if index % 3 == 0:
            await _mint(engine, f"m{key}", 100_000)
            continue
        held = await engine.execute(Reserve(ACCOUNT, f"r{key}", 5_000))
        assert isinstance(held, EntryResult)
        entry_id = held.entry.billing_entry_id
        command = Commit(entry_id, 4_000 + index) if index % 3 == 1 else Release(entry_id, "user_cancel")
        assert isinstance(await engine.execute(command), EntryResult)


async def _mint(engine: Engine, credit_id: str, amount_micro: int = 1) -> int:
    result = await engine.execute(Credit(ACCOUNT, credit_id, CreditKind.MINT, amount_micro))
    assert isinstance(result, CreditResult)
    return result.wal_sequence


def _events(settings: Settings) -> list[Event]:
    return list(segments.iter_events(settings.wal_dir))


def _snapshot_of(events: list[Event]) -> Snapshot:
    return fold(events).to_snapshot()


def _record_spans(segment: segments.SegmentFile, *, is_last: bool = True) -> list[tuple[int, int, int]]:
    """(start, end, sequence) of every record in ``segment``."""
    records, tail = segments.scan_segment(segment, is_last=is_last)
    starts = [offset for offset, _ in records]
    ends = [*starts[1:], tail.valid_end]
    return [(start, end, event.wal_sequence) for (start, (_, event), end) in zip(starts, records, ends, strict=True)]


def _flip(path: Path, offset: int, mask: int = 0x01) -> bytes:
    """Flip bits of one byte of ``path``; returns the damaged contents."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(data)
    return bytes(data)


def _drop_snapshots(settings: Settings) -> None:
    """Force a full replay: without a snapshot, recovery reads every segment."""
    for path in list_snapshots(settings.snapshot_dir):
        path.unlink()


def _only_segment(settings: Settings) -> segments.SegmentFile:
    found = segments.list_segments(settings.wal_dir)
    assert 1 == len(found)
    return found[0]


async def _build(settings: Settings, rounds: int) -> list[Event]:
    async with Engine.open(settings=settings) as engine:
        await _traffic(engine, rounds)
    return _events(settings)


# -- torn tails ----------------------------------------------------------------------------


@pytest.fixture
async def built(tmp_path: Path) -> tuple[bytes, list[tuple[int, int, int]], list[Event]]:
    """One segment of real records (written with fsync), its bytes, record spans and events."""
    settings = Settings(data_dir=tmp_path / "source")
    events = await _build(settings, 7)
    segment = _only_segment(settings)
    return segment.path.read_bytes(), _record_spans(segment), events


def _cuts(spans: list[tuple[int, int, int]], size: int) -> Iterator[tuple[int, int, int]]:
    """(cut, sequence kept, end of the last kept record) for every offset in the last three records."""
    first_cut = spans[-3][0]
    for cut in range(first_cut, size + 1):
        kept = [(end, seq) for _, end, seq in spans if end <= cut]
        end, seq = kept[-1]
        yield cut, seq, end


def _write_cut(root: Path, cut: int, data: bytes) -> Settings:
    settings = Settings(data_dir=root / f"cut-{cut}")
    settings.wal_dir.mkdir(parents=True)
    (settings.wal_dir / segments.segment_name(1)).write_bytes(data[:cut])
    return settings


async def _reopen_cut(
    root: Path, data: bytes, cut_point: tuple[int, int, int], expected: Snapshot
) -> tuple[int, int, int, bool]:
    """Open an engine on ``data[:cut]``, append one record; returns what it found."""
    cut, seq, _ = cut_point
    settings = _write_cut(root, cut, data)
    segment_path = settings.wal_dir / segments.segment_name(1)
    async with Engine.open(settings=settings) as engine:
        found = (engine.state.last_sequence, segment_path.stat().st_size)
        same_state = expected == engine.state.to_snapshot()
        appended = await _mint(engine, f"after-{cut}")
    assert list(range(1, seq + 2)) == [event.wal_sequence for event in _events(settings)], f"cut {cut}"
    report = segments.verify(settings.wal_dir)
    assert (True, None) == (report.ok, report.torn_tail), f"cut {cut}"
    return (*found, appended, same_state)


async def test_engine_cuts_a_torn_tail_at_every_offset(
    tmp_path: Path, built: tuple[bytes, list[tuple[int, int, int]], list[Event]], caplog: pytest.LogCaptureFixture
) -> None:
    """Cut anywhere in the last three records, the engine keeps exactly the whole records and appends after them."""
    data, spans, events = built
    boundaries = {end for _, end, _ in spans}
    expected_states = {seq: _snapshot_of(events[:seq]) for _, _, seq in spans}
    caplog.set_level(logging.WARNING, logger="tollway.engine")
    cuts = list(_cuts(spans, len(data)))
    for chunk_start in range(0, len(cuts), 32):  # independent engines (no shared state), so their syncs overlap
        chunk = cuts[chunk_start : chunk_start + 32]
        found = await asyncio.gather(
            *(_reopen_cut(tmp_path, data, point, expected_states[point[1]]) for point in chunk)
        )
        for (cut, seq, end), result in zip(chunk, found, strict=True):
            assert (seq, end, seq + 1, True) == result, f"cut {cut}"
    expected_logs = sorted(
        f"{segments.segment_name(1)} at byte offset {end}" for cut, _, end in cuts if cut not in boundaries
    )
    torn_logged = sorted(
        message[message.index("wal-") : message.index(" (")]
        for message in (record.getMessage() for record in caplog.records)
        if "torn tail" in message
    )
    assert expected_logs == torn_logged


def test_recover_cuts_a_torn_tail_at_every_offset(
    tmp_path: Path, built: tuple[bytes, list[tuple[int, int, int]], list[Event]]
) -> None:
    """wal.log.recover replays exactly the whole records before any cut, truncates durably, and is idempotent."""
    data, spans, events = built
    boundaries = {end for _, end, _ in spans}
    for cut, seq, end in _cuts(spans, len(data)):
        settings = _write_cut(tmp_path, cut, data)
        segment_path = settings.wal_dir / segments.segment_name(1)
        replayed: list[Event] = []
        recovery = recover(settings.wal_dir, 0, replayed.append)
        assert events[:seq] == replayed, f"cut {cut}"
        assert (seq, end, segment_path) == (
            recovery.last_seq,
            recovery.end_offset,
            recovery.segment and recovery.segment.path,
        )
        assert end == segment_path.stat().st_size
        assert (cut in boundaries) == (recovery.torn_tail is None), f"cut {cut}"
        if recovery.torn_tail is not None:
            assert f"at byte offset {end}" in recovery.torn_tail
        again = recover(settings.wal_dir, 0, lambda _: None)
        assert (seq, None) == (again.last_seq, again.torn_tail)


def test_verify_reports_a_torn_tail_without_cutting(
    tmp_path: Path, built: tuple[bytes, list[tuple[int, int, int]], list[Event]]
) -> None:
    """verify() calls a cut final record a torn tail (not corruption) and leaves the file alone."""
    data, spans, _ = built
    cut = spans[-1][0] + 5
    settings = _write_cut(tmp_path, cut, data)
    report = segments.verify(settings.wal_dir)
    assert (True, spans[-2][2]) == (report.ok, report.last_seq)
    assert report.torn_tail is not None
    assert f"{segments.segment_name(1)} at byte offset {spans[-1][0]}" in report.torn_tail
    assert cut == (settings.wal_dir / segments.segment_name(1)).stat().st_size


@pytest.mark.parametrize(
    "tail",
    [b"\x00" * MIN_SEGMENT_BYTES, random.Random(7).randbytes(100), b"half-record"],
    ids=["zero-filled", "random-bytes", "partial-record"],
)
async def test_garbage_after_the_last_record_is_a_torn_tail(tmp_path: Path, tail: bytes) -> None:
    """A zero-filled, random or half-written tail after the last record is cut, and appending continues."""
    settings = Settings(data_dir=tmp_path / "data")
    events = await _build(settings, 4)
    segment = _only_segment(settings)
    valid_end = segment.path.stat().st_size
    if tail == b"half-record":
        first = codec.encode(events[0])
        tail = first[: len(first) // 2]
    with segment.path.open("ab") as handle:
        handle.write(tail)
    assert segments.verify(settings.wal_dir).ok
    _drop_snapshots(settings)
    async with Engine.open(settings=settings) as engine:
        assert len(events) == engine.state.last_sequence
        assert valid_end == segment.path.stat().st_size
        assert len(events) + 1 == await _mint(engine, "after")
    assert list(range(1, len(events) + 2)) == [event.wal_sequence for event in _events(settings)]


# -- corruption ----------------------------------------------------------------------------


async def test_flipped_byte_in_the_middle_refuses_to_start(tmp_path: Path) -> None:
    """Any flipped byte in a record followed by valid ones: WalCorrupt naming the segment and offset."""
    settings = Settings(data_dir=tmp_path / "data")
    await _build(settings, 6)
    _drop_snapshots(settings)
    segment = _only_segment(settings)
    spans = _record_spans(segment)
    start, end, _ = spans[len(spans) // 2]
    original = segment.path.read_bytes()
    for offset in range(start, end):
        damaged = _flip(segment.path, offset)
        with pytest.raises(WalCorrupt) as raised:
            async with Engine.open(settings=settings):
                pass
        assert (segment.name, start) == (raised.value.segment, raised.value.offset), f"byte {offset}"
        assert f"segment {segment.name}, byte offset {start}" in str(raised.value)
        assert damaged == segment.path.read_bytes()  # fail closed: nothing was cut
        report = segments.verify(settings.wal_dir)
        assert report.problem is not None
        assert (segment.name, start) == (report.problem.segment, report.problem.offset)
        segment.path.write_bytes(original)
    async with Engine.open(settings=settings) as engine:  # restored: the lock was released each time
        assert spans[-1][2] == engine.state.last_sequence


async def test_bad_segment_header_is_corruption(tmp_path: Path) -> None:
    """A segment that does not start with the WAL magic is refused at offset 0."""
    settings = Settings(data_dir=tmp_path / "data")
    await _build(settings, 2)
    _drop_snapshots(settings)
    segment = _only_segment(settings)
    _flip(segment.path, 3)
    with pytest.raises(WalCorrupt) as raised:
        async with Engine.open(settings=settings):
            pass
    assert (segment.name, 0) == (raised.value.segment, raised.value.offset)


async def _rotated(settings: Settings, rounds: int) -> list[segments.SegmentFile]:
    await _build(settings, rounds)
    found = segments.list_segments(settings.wal_dir)
    assert len(found) >= 3
    return found


@pytest.mark.parametrize("damage", ["flip", "truncate"])
async def test_bad_end_of_an_earlier_segment_is_corruption(tmp_path: Path, damage: str) -> None:
    """A bad final record of a segment that is not the last is corruption, never a torn tail."""
    settings = Settings(data_dir=tmp_path / "data", segment_bytes=MIN_SEGMENT_BYTES)
    found = await _rotated(settings, 30)
    _drop_snapshots(settings)
    first = found[0]
    last_start, last_end, _ = _record_spans(first, is_last=False)[-1]
    if damage == "flip":
        _flip(first.path, last_end - 1)
    else:
        os.truncate(first.path, last_end - 1)
    size = first.path.stat().st_size
    with pytest.raises(WalCorrupt) as raised:
        async with Engine.open(settings=settings):
            pass
    assert (first.name, last_start) == (raised.value.segment, raised.value.offset)
    assert size == first.path.stat().st_size
    report = segments.verify(settings.wal_dir)
    assert report.problem is not None
    assert (first.name, last_start) == (report.problem.segment, report.problem.offset)


# -- rotation ------------------------------------------------------------------------------


async def test_segments_rotate_and_recover_across_files(tmp_path: Path) -> None:
    """Small segments rotate at the size limit, are named by first sequence and replay as one log."""
    settings = Settings(data_dir=tmp_path / "data", segment_bytes=MIN_SEGMENT_BYTES)
    async with Engine.open(settings=settings) as engine:
        await _traffic(engine, 30)
        live = engine.state.to_snapshot()
        last = engine.state.last_sequence
    found = segments.list_segments(settings.wal_dir)
    assert len(found) >= 3
    assert sorted(path.name for path in settings.wal_dir.glob("*.seg")) == [seg.name for seg in found]
    for segment in found:
        data = segment.path.read_bytes()
        assert codec.SEGMENT_MAGIC == data[: len(codec.SEGMENT_MAGIC)]
        assert len(data) <= MIN_SEGMENT_BYTES, segment.name
        assert segments.segment_name(segment.first_seq) == segment.name
        assert segment.first_seq == _record_spans(segment, is_last=segment is found[-1])[0][2]
    assert 1 == found[0].first_seq
    assert list(range(1, last + 1)) == [event.wal_sequence for event in _events(settings)]
    _drop_snapshots(settings)
    observer = RecordingObserver()
    async with Engine.open(settings=settings, observer=observer) as engine:
        assert [(last, 0)] == observer.recoveries
        assert live == engine.state.to_snapshot()
        await _traffic(engine, 6, tag="more-")
    assert list(range(1, engine.state.last_sequence + 1)) == [event.wal_sequence for event in _events(settings)]


async def test_gap_between_segments_is_corruption(tmp_path: Path) -> None:
    """A missing segment is found by recovery, verify() and iter_events, naming the segment after the gap."""
    settings = Settings(data_dir=tmp_path / "data", segment_bytes=MIN_SEGMENT_BYTES)
    found = await _rotated(settings, 30)
    _drop_snapshots(settings)
    found[1].path.unlink()
    message = f"segment starts at {found[2].first_seq}, expected {found[1].first_seq}"
    with pytest.raises(WalCorrupt, match=message) as raised:
        async with Engine.open(settings=settings):
            pass
    assert (found[2].name, 0) == (raised.value.segment, raised.value.offset)
    report = segments.verify(settings.wal_dir)
    assert report.problem is not None
    assert (found[2].name, 0) == (report.problem.segment, report.problem.offset)
    with pytest.raises(WalCorrupt, match=message):
        _events(settings)


@pytest.mark.parametrize("kept", [0, 5, 15, 16])
async def test_segment_created_by_a_crashed_rotation(tmp_path: Path, kept: int) -> None:
    """A last segment cut inside its header (crash while rotating) is repaired; appends after it survive a restart."""
    settings = Settings(data_dir=tmp_path / "data")
    await _build(settings, 3)
    last = _events(settings)[-1].wal_sequence
    (settings.wal_dir / segments.segment_name(last + 1)).write_bytes(codec.SEGMENT_MAGIC[:kept])
    async with Engine.open(settings=settings) as engine:
        assert last + 1 == await _mint(engine, "after-rotation-crash")
    async with Engine.open(settings=settings) as engine:
        assert last + 1 == engine.state.last_sequence
    assert segments.verify(settings.wal_dir).ok


# -- the single-writer lock ----------------------------------------------------------------

_TRY_OPEN = """
import asyncio, sys
from tollway import Engine, WalLocked

async def main():
    try:
        async with Engine.open(sys.argv[1]):
            print("opened")
    except WalLocked as exc:
        print(f"WalLocked: {exc}")

asyncio.run(main())
"""

_HOLD_OPEN = """
import asyncio, sys
from tollway import Engine

async def main():
    async with Engine.open(sys.argv[1]):
        print("holding", flush=True)
        await asyncio.Event().wait()  # until killed

asyncio.run(main())
"""


async def test_second_writer_in_the_same_process_is_refused(settings: Settings) -> None:
    """A second Engine.open on a locked data directory fails with WalLocked naming this pid."""
    async with Engine.open(settings=settings) as engine:
        for _ in range(2):
            with pytest.raises(WalLocked, match=f"pid {os.getpid()}\\b"):
                async with Engine.open(settings=settings):
                    pass
        assert 1 == await _mint(engine, "still-writing")
    async with Engine.open(settings=settings) as engine:
        assert 1 == engine.state.last_sequence


async def test_second_writer_in_another_process_is_refused(settings: Settings) -> None:
    """A subprocess cannot open a data directory this process writes; the message names our pid."""
    async with Engine.open(settings=settings):
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _TRY_OPEN, str(settings.data_dir), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await child.communicate()
    assert 0 == child.returncode
    assert f"(pid {os.getpid()})" in out.decode()
    assert out.decode().startswith("WalLocked: another tollway process")


async def test_lock_held_by_another_process_until_it_dies(settings: Settings) -> None:
    """While a subprocess holds the lock we get WalLocked naming its pid; once it is killed we can open."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HOLD_OPEN,
        str(settings.data_dir),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert b"holding\n" == await asyncio.wait_for(child.stdout.readline(), 30)
        with pytest.raises(WalLocked, match=f"pid {child.pid}\\b"):
            async with Engine.open(settings=settings):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        await child.communicate()
    async with Engine.open(settings=settings) as engine:
        assert 1 == await _mint(engine, "after-holder-died")


# -- snapshots -----------------------------------------------------------------------------


async def test_periodic_snapshots_match_the_log(tmp_path: Path) -> None:
    """With a small snapshot_every_events, snapshots appear and each equals the replay of the log up to it."""
    settings = Settings(data_dir=tmp_path / "data", snapshot_every_events=5, snapshots_kept=3)
    async with Engine.open(settings=settings) as engine:
        await _traffic(engine, 30)
        last = engine.state.last_sequence
    events = _events(settings)
    files = list_snapshots(settings.snapshot_dir)
    assert 3 == len(files)
    sequences = []
    for path in files:
        sequence, snap = decode_snapshot(path.read_bytes())
        assert _snapshot_of(events[:sequence]) == snap, path.name
        sequences.append(sequence)
    assert last == sequences[-1]  # the one close() writes
    assert 0 < sequences[0] < sequences[1] < last  # the older ones were written while running


async def test_failed_periodic_snapshot_is_logged_and_tried_again_an_interval_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk fails the periodic snapshot: billing goes on, and the next try waits a whole interval.

    Before, the failed task was started again by the very next batch, so every command re-encoded
    the whole state while the disk stayed full.
    """
    every = 10
    settings = Settings(data_dir=tmp_path / "data", snapshot_every_events=every)
    attempts: list[int] = []

    def full_disk(snap_dir: Path, sequence: int, *args: object, **kwargs: object) -> Path:
        attempts.append(sequence)
        raise OSError(errno.ENOSPC, "No space left on device")

    caplog.set_level(logging.ERROR, logger="tollway.engine")
    async with Engine.open(settings=settings) as engine:
        monkeypatch.setattr("tollway.snapshots.write_snapshot", full_disk)
        await _traffic(engine, 60)  # sequential: one or two events per batch
        last = engine.state.last_sequence
        assert engine._snapshots.task is not None
        await engine._snapshots.task
        monkeypatch.undo()  # the disk has room again
    assert 2 <= len(attempts) <= last // every  # one per interval, not one per batch after the first failure
    failures = [r for r in caplog.records if "snapshot failed" in r.getMessage()]
    assert len(attempts) == len(failures)
    assert failures[0].exc_info is not None
    assert "No space left on device" in str(failures[0].exc_info[1])
    sequence, snap = decode_snapshot(list_snapshots(settings.snapshot_dir)[-1].read_bytes())
    assert last == sequence  # close() still wrote one, the disk having room again
    assert _snapshot_of(_events(settings)) == snap


async def test_close_hurries_a_background_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A periodic snapshot paces its encoder (at most a fifth of the loop) until close() waits for it.

    Shutting down, the loop has nothing else to do: the encoder stops pausing between slices.
    """
    settings = Settings(data_dir=tmp_path / "data", durability=Durability.NONE, snapshot_every_events=10**9)
    pauses: list[tuple[bool, float]] = []  # (closing, requested pause) of each sleep of the encoder
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float, result: object = None) -> object:
        pauses.append((engine._snapshots.closing, delay))
        return await real_sleep(delay, result)

    async with Engine.open(settings=settings) as engine:
        await _mint(engine, "funds", 10**12)
        for start in range(0, 12_000, 1_000):  # 12,000 entries: several slices to encode
            await asyncio.gather(*(engine.execute(Reserve(ACCOUNT, f"r{i}", 5)) for i in range(start, start + 1_000)))
        monkeypatch.setattr(asyncio, "sleep", recording_sleep)
        engine._snapshots.task = asyncio.get_running_loop().create_task(engine._snapshots.periodic())
        while not pauses:  # the encoder has taken its first slice and paused
            await real_sleep(0.001)
    monkeypatch.undo()
    paced = [delay for closing, delay in pauses if not closing]
    hurried = [delay for closing, delay in pauses if closing]
    assert paced, "the encoder never paused while paced"
    assert all(delay > 0 for delay in paced)
    assert hurried, "close() found the snapshot already done: nothing to hurry"
    assert all(delay == 0 for delay in hurried)
    sequence, snap = decode_snapshot(list_snapshots(settings.snapshot_dir)[-1].read_bytes())
    assert 12_001 == sequence == snap.last_sequence
    assert 12_000 == len(snap.entries)


@pytest.fixture
async def crash_image(tmp_path: Path) -> tuple[Settings, Snapshot, tuple[int, int]]:
    """A copy of a running engine's data directory (snapshots at two sequences, then 5 more records).

    Copying while the engine runs captures exactly what a crash would leave: every acknowledged
    record, no final snapshot.
    """
    settings = Settings(data_dir=tmp_path / "live")
    image = settings.replace(data_dir=tmp_path / "image")
    async with Engine.open(settings=settings) as engine:
        await _traffic(engine, 6)
        older = await engine.snapshot_now()
        await _traffic(engine, 6, tag="b")
        newer = await engine.snapshot_now()
        for index in range(5):
            await _mint(engine, f"tail-{index}")
        shutil.copytree(settings.data_dir, image.data_dir)
        live = engine.state.to_snapshot()
        assert 2 == len(list_snapshots(image.snapshot_dir))
        return image, live, (older, newer)


def _damage_snapshot(path: Path, how: str) -> None:
    if how == "flip":
        _flip(path, path.stat().st_size // 2)
    elif how == "flip-header":
        _flip(path, 17)  # inside the sequence number
    else:
        os.truncate(path, path.stat().st_size - 1)


async def test_recovery_uses_newest_snapshot_and_tail(crash_image: tuple[Settings, Snapshot, tuple[int, int]]) -> None:
    """After a crash, recovery loads the newest snapshot and replays only the records after it."""
    image, live, (_, newer) = crash_image
    last = live.last_sequence
    observer = RecordingObserver()
    async with Engine.open(settings=image, observer=observer) as engine:
        assert [(last - newer, newer)] == observer.recoveries
        assert live == engine.state.to_snapshot()
        assert _snapshot_of(_events(image)) == engine.state.to_snapshot()


@pytest.mark.parametrize("how", ["flip", "flip-header", "truncate"])
async def test_damaged_newest_snapshot_is_skipped(
    crash_image: tuple[Settings, Snapshot, tuple[int, int]], how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged newest snapshot is skipped (and logged); the older one plus a longer tail gives the same state."""
    image, live, (older, newer) = crash_image
    newest = list_snapshots(image.snapshot_dir)[-1]
    _damage_snapshot(newest, how)
    observer = RecordingObserver()
    caplog.set_level(logging.WARNING, logger="tollway.engine")
    async with Engine.open(settings=image, observer=observer) as engine:
        assert [(live.last_sequence - older, older)] == observer.recoveries
        assert live == engine.state.to_snapshot()
    assert any(newest.name in record.getMessage() for record in caplog.records)
    assert older < newer


async def test_all_snapshots_damaged_means_full_replay(crash_image: tuple[Settings, Snapshot, tuple[int, int]]) -> None:
    """With every snapshot damaged, recovery replays the whole log and reaches the same state."""
    image, live, _ = crash_image
    for path in list_snapshots(image.snapshot_dir):
        _damage_snapshot(path, "flip")
    observer = RecordingObserver()
    async with Engine.open(settings=image, observer=observer) as engine:
        assert [(live.last_sequence, 0)] == observer.recoveries
        assert live == engine.state.to_snapshot()
        events = _events(image)
        assert [] == check_invariants(engine.state, Ledger().post_all(events))


async def test_snapshot_ahead_of_the_log_refuses_to_start(
    crash_image: tuple[Settings, Snapshot, tuple[int, int]],
) -> None:
    """A sound snapshot newer than the end of the log means acknowledged records are gone: refuse (fail closed)."""
    image, _, (_, newer) = crash_image
    segment = _only_segment(image)
    spans = _record_spans(segment)
    os.truncate(segment.path, next(start for start, _, seq in spans if seq == newer))
    with pytest.raises(WalCorrupt, match=f"before the snapshot at {newer}"):
        async with Engine.open(settings=image):
            pass


# -- fail-stop on WAL I/O errors -----------------------------------------------------------


def _fail_fdatasync(fd: int) -> None:
    raise OSError(errno.EIO, "injected fdatasync failure")


def _file_log(engine: Engine) -> FileLog:
    assert isinstance(engine.log, FileLog)
    return engine.log


def _fail_wal_writes(patch: pytest.MonkeyPatch, engine: Engine) -> None:
    """``os.write`` fails with ENOSPC on the active WAL segment (and only there)."""
    real_write, segment_fd = os.write, _file_log(engine).writer.fd

    def write(fd: int, data: bytes | memoryview) -> int:
        if fd == segment_fd:
            raise OSError(errno.ENOSPC, "injected write failure")
        return real_write(fd, data)

    patch.setattr(os, "write", write)


FAILURES: Final = [
    pytest.param("fdatasync", WalSyncer.THREAD, id="fdatasync-in-thread"),
    pytest.param("write", WalSyncer.THREAD, id="write-thread"),
    pytest.param("write", WalSyncer.PROCESS, id="write-process"),
    pytest.param("helper killed", WalSyncer.PROCESS, id="sync-helper-killed"),
]
"""Where a WAL I/O failure is injected, with each way of syncing: ``fdatasync`` raising in the
I/O thread, ``os.write`` failing (ENOSPC), and the sync helper process dying (``kill -9``)."""


def _inject(patch: pytest.MonkeyPatch, failure: str, engine: Engine) -> None:
    if failure == "fdatasync":
        patch.setattr(os, "fdatasync", _fail_fdatasync)
    elif failure == "write":
        _fail_wal_writes(patch, engine)
    else:
        syncer = _file_log(engine).syncer
        assert syncer is not None
        os.kill(syncer.pid, signal.SIGKILL)


async def _until_fatal(engine: Engine, commands: int) -> tuple[list[asyncio.Task[object]], list[BaseException]]:
    """Start ``commands`` mints that join one failing batch; return once on_fatal was called."""
    fatal: list[BaseException] = []
    called = asyncio.Event()

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        called.set()

    engine.on_fatal = on_fatal
    tasks: list[asyncio.Task[object]] = [
        asyncio.create_task(engine.execute(Credit(ACCOUNT, f"lost-{index}", CreditKind.MINT, 1)))
        for index in range(commands)
    ]
    await asyncio.wait_for(called.wait(), 30)
    return tasks, fatal


@pytest.mark.parametrize(("failure", "syncer"), FAILURES)
async def test_wal_io_failure_is_fail_stop(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
    syncer: WalSyncer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed WAL write or sync calls on_fatal, refuses every later command, and a restart keeps all acked records."""
    settings = settings.replace(wal_syncer=syncer)
    async with Engine.open(settings=settings) as engine:
        acked = [await _mint(engine, f"acked-{index}", 1_000) for index in range(5)]
        with monkeypatch.context() as patch:
            _inject(patch, failure, engine)
            tasks, fatal = await _until_fatal(engine, 10)
        assert [WalIOFailure] == [type(exc) for exc in fatal]
        with pytest.raises(EngineStopped):
            await _mint(engine, "after-failure")
        with pytest.raises(EngineStopped):
            await engine.snapshot_now()
        for task in tasks:  # see test_waiting_callers_get_wal_io_failure: they may never be answered
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert any(record.levelno == logging.CRITICAL for record in caplog.records)
    async with Engine.open(settings=settings) as engine:
        assert [1, 2, 3, 4, 5] == acked
        assert acked == [engine.state.credits[f"{ACCOUNT} acked-{index}"].wal_sequence for index in range(5)]
        if failure == "write":  # nothing of the failed batch reached the file
            assert 5 == engine.state.last_sequence
        # after a failed sync the unacknowledged records may or may not be there; both are correct
        assert engine.state.last_sequence in {5, 15}
        assert [] == check_invariants(engine.state, Ledger().post_all(_events(settings)))
        assert engine.state.last_sequence + 1 == await _mint(engine, "after-restart")


@pytest.mark.parametrize(("failure", "syncer"), FAILURES)
async def test_waiting_callers_get_wal_io_failure(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, failure: str, syncer: WalSyncer
) -> None:
    """Every caller waiting on the batch whose write or sync failed is answered with WalIOFailure."""
    async with Engine.open(settings=settings.replace(wal_syncer=syncer)) as engine:
        await _mint(engine, "acked")
        with monkeypatch.context() as patch:
            _inject(patch, failure, engine)
            tasks, _ = await _until_fatal(engine, 10)
        try:
            _, pending = await asyncio.wait(tasks, timeout=1)  # answered within a few loop turns when correct
            assert set() == pending
            assert [WalIOFailure] * 10 == [type(task.exception()) for task in tasks]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
