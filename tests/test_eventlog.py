"""The engine behind its log interface with a log shaped like a database adapter: ``async def append``.

The file WAL returns a future from ``append``; a PostgreSQL log will be a coroutine that returns
once its transaction committed. These tests put such a log, in memory, behind the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from tollway import Credit, CreditKind, Engine, EngineStopped, Reserve, Settings
from tollway.core.errors import TollwayError
from tollway.core.events import Event
from tollway.core.state import State
from tollway.testing import FakeClock, RecordingObserver
from tollway.wal import codec


class Fenced(TollwayError):
    """The lease was lost: another writer owns the log now."""


class MemoryLog:
    """An ``EventLog`` in memory whose appends are coroutines, each one held until released."""

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.appends: list[tuple[int, int]] = []  # (first sequence, records) of each append
        self.gate = asyncio.Event()
        self.gate.set()
        self.failure: TollwayError | None = None
        self.closed = False

    async def append(self, records: Sequence[bytes], first_seq: int) -> None:
        """Durable once the gate is open (a transaction that commits), or raise the failure."""
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        assert first_seq == len(self.records) + 1
        self.appends.append((first_seq, len(records)))
        self.records.extend(records)

    async def read(self, after_seq: int, limit: int) -> list[Event]:
        """Decode the records after ``after_seq``."""
        data = b"".join(self.records[after_seq : after_seq + limit])
        return [event for _, event in codec.scan(data, 0, after_seq + 1, [])]

    async def close(self) -> None:
        """Nothing to release."""
        self.closed = True

    async def abort(self) -> None:
        """Nothing to release."""
        self.closed = True


@pytest.fixture
async def memory(tmp_path: Path) -> AsyncIterator[tuple[Engine, MemoryLog]]:
    """An engine writing through a MemoryLog (snapshots still go to files in tmp_path)."""
    settings = Settings(data_dir=tmp_path / "data")
    settings.snapshot_dir.mkdir(parents=True)
    log = MemoryLog()
    engine = Engine(settings, State(), log, clock=FakeClock(), observer=RecordingObserver(), random80=lambda: 7)
    try:
        yield engine, log
    finally:
        await engine.abort()


async def test_commands_are_answered_once_the_async_append_returned(memory: tuple[Engine, MemoryLog]) -> None:
    """A command waits for the coroutine that appends its batch, and the log holds its record afterwards."""
    engine, log = memory
    await engine.execute(Credit("acct", "mint-1", CreditKind.MINT, 1_000))
    log.gate.clear()  # the next transaction does not commit yet
    task = asyncio.create_task(engine.execute(Reserve("acct", "r1", 10)))
    for _ in range(20):
        await asyncio.sleep(0)
    assert (False, 1) == (task.done(), engine.durable_sequence)
    log.gate.set()
    await task
    assert [(1, 1), (2, 1)] == log.appends
    assert [1, 2] == [event.wal_sequence for event in await log.read(0, 10)]
    assert 2 == engine.durable_sequence


async def test_concurrent_commands_share_one_append(memory: tuple[Engine, MemoryLog]) -> None:
    """Commands arriving while an append is in flight are appended together, in one batch."""
    engine, log = memory
    await engine.execute(Credit("acct", "mint-1", CreditKind.MINT, 1_000))
    log.gate.clear()
    first = asyncio.create_task(engine.execute(Reserve("acct", "r0", 10)))
    await asyncio.sleep(0.01)  # its append is in flight
    rest = [asyncio.create_task(engine.execute(Reserve("acct", f"r{i}", 10))) for i in range(1, 6)]
    await asyncio.sleep(0.01)
    log.gate.set()
    await asyncio.gather(first, *rest)
    assert [(1, 1), (2, 1), (3, 5)] == log.appends


async def test_a_failed_append_stops_the_engine(memory: tuple[Engine, MemoryLog]) -> None:
    """An append that raises (a lost lease) wakes its callers with that error and refuses everything after."""
    engine, log = memory
    fatal: list[BaseException] = []
    engine.on_fatal = fatal.append
    log.failure = Fenced("lease lost")
    with pytest.raises(Fenced):
        await engine.execute(Credit("acct", "mint-1", CreditKind.MINT, 1_000))
    with pytest.raises(EngineStopped):
        await engine.execute(Credit("acct", "mint-2", CreditKind.MINT, 1_000))
    assert ([Fenced], []) == ([type(exc) for exc in fatal], log.records)
