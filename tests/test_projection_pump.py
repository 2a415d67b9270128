"""The projection pump: the same projection from a child process, and every way it can fail."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from tests.test_projection import KEYS, Rig, pauses_while_redis_refuses_writes, workload
from tollway import Engine, Settings
from tollway.metrics import Metrics
from tollway.redis.parity import differences
from tollway.redis.projector import Projector
from tollway.redis.pump import ProjectionPump, PumpGone
from tollway.redis.server import EmbeddedRedis
from tollway.testing import FakeClock
from tollway.wal import codec
from tollway.wal.segments import iter_events

WAIT_S = 20


@dataclass
class PumpRig(Rig):
    pump: ProjectionPump


@pytest.fixture
async def rig(tmp_path: Path, redis_server: EmbeddedRedis, clock: FakeClock) -> AsyncIterator[PumpRig]:
    """An engine in settlement mode and a projector with a pump, on a private redis-server."""
    settings = Settings(data_dir=tmp_path / "data", settlement_url="http://settlement.invalid")
    client = aioredis.Redis.from_url(redis_server.url)
    async with Engine.open(settings=settings, clock=clock) as engine:
        pump = await ProjectionPump.start(redis_server.url, KEYS, engine.identity)
        projector = Projector(engine, client, KEYS, batch_events_max=7, pump_batch_events_max=7, pump=pump)
        try:
            yield PumpRig(engine, projector, client, redis_server, clock, pump)
        finally:
            await pump.close()
            await client.aclose()


@pytest.mark.parametrize("seed", [1, 2])
async def test_parity_through_the_pump(rig: PumpRig, seed: int) -> None:
    """Random traffic projected through the pump equals the engine's state, and the pump did the work."""
    await rig.projector.sync()  # an empty Redis is built from the state; what follows goes through the pump
    await workload(rig.engine, rig.clock, seed, 150)
    await rig.projector.sync()
    assert [] == await differences(rig.client, KEYS, rig.engine.state)
    assert rig.engine.durable_sequence == rig.projector.applied_seq
    assert rig.projector.pump is rig.pump
    assert "on" == rig.projector.status().pump
    assert rig.pump.usable
    assert rig.pump.batches >= rig.engine.durable_sequence // 7  # every event, in batches of at most 7
    assert not rig.projector._records  # applied records are not kept


async def test_a_dead_pump_is_replaced_by_encoding_here(rig: PumpRig) -> None:
    """kill -9 of the pump: the projector encodes in its own process and stays in parity."""
    await rig.projector.sync()
    await workload(rig.engine, rig.clock, 3, 60)
    await rig.projector.sync()
    assert rig.pump.batches > 0
    os.kill(rig.pump.pid, signal.SIGKILL)
    await workload(rig.engine, rig.clock, 4, 80)
    await rig.projector.sync()
    assert rig.projector.pump is None
    assert "failed" == rig.projector.status().pump
    metrics = Metrics()
    await metrics.collect_from(projector=rig.projector)
    assert b'billing_projection_pump{state="failed"} 1.0' in metrics.render()
    assert not rig.pump.usable
    assert [] == await differences(rig.client, KEYS, rig.engine.state)
    assert rig.engine.durable_sequence == rig.projector.applied_seq


async def test_events_read_back_from_the_wal_are_encoded_here(rig: PumpRig) -> None:
    """Events no longer in memory (no records kept for them) are applied without the pump, then it resumes."""
    await rig.projector.sync()
    await workload(rig.engine, rig.clock, 5, 50)
    rig.projector._buffer.clear()  # as if the bounded buffer had dropped them during an outage
    rig.projector._records.clear()
    await rig.projector.sync()
    assert 0 == rig.pump.batches
    await workload(rig.engine, rig.clock, 6, 50)
    await rig.projector.sync()
    assert rig.pump.batches > 0  # used again once the events are in memory
    assert rig.projector.pump is rig.pump
    assert [] == await differences(rig.client, KEYS, rig.engine.state)


async def test_redis_away_and_back_with_the_pump(rig: PumpRig) -> None:
    """While Redis is down the pump answers with the client's ConnectionError; the projector catches up after."""
    task = asyncio.create_task(rig.projector.run())
    try:
        await workload(rig.engine, rig.clock, 10, 40)
        for _ in range(WAIT_S * 100):
            if rig.pump.batches:
                break
            await asyncio.sleep(0.01)
        rig.server.kill()
        await workload(rig.engine, rig.clock, 11, 80)
        await rig.server.restart()
        for _ in range(WAIT_S * 100):
            if rig.projector.connected and rig.projector.applied_seq == rig.engine.durable_sequence:
                break
            await asyncio.sleep(0.01)
        assert rig.engine.durable_sequence == rig.projector.applied_seq
        assert [] == await differences(rig.client, KEYS, rig.engine.state)
        assert rig.projector.pump is rig.pump
        assert rig.pump.batches > 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_full_redis_pauses_the_projection_through_the_pump(rig: PumpRig) -> None:
    """The pump's answer for a Redis at maxmemory pauses the projection as the in-process path does."""
    await pauses_while_redis_refuses_writes(rig, flushed=False)
    assert rig.projector.pump is rig.pump
    assert rig.pump.batches > 0


async def test_the_pump_answers_in_order_and_reports_redis_errors(rig: PumpRig) -> None:
    """Overlapping requests are answered in order; a Redis that is gone is the client's ConnectionError."""
    await workload(rig.engine, rig.clock, 7, 40)
    await rig.projector.sync()  # applied_seq exists: the projection is built
    events = list(iter_events(rig.engine.settings.wal_dir))
    records = [codec.encode(event) for event in events]
    first, second = rig.pump.submit(b"".join(records[:5])), rig.pump.submit(b"".join(records[5:9]))
    assert [b"duplicate", str(events[-1].wal_sequence).encode()] == await asyncio.wait_for(first, WAIT_S)
    assert [b"duplicate", str(events[-1].wal_sequence).encode()] == await asyncio.wait_for(second, WAIT_S)
    rig.server.kill()
    with pytest.raises(redis.exceptions.ConnectionError):
        await asyncio.wait_for(rig.pump.apply(records[0]), WAIT_S)
    assert rig.pump.usable  # Redis being away is not the pump's failure


async def test_records_that_do_not_scan_retire_the_pump(rig: PumpRig) -> None:
    """A corrupt record (a bug: records come from the WAL just written) makes the pump unusable, not Redis."""
    await workload(rig.engine, rig.clock, 8, 5)
    event = next(iter_events(rig.engine.settings.wal_dir))
    record = bytearray(codec.encode(event))
    record[-2] ^= 0xFF
    with pytest.raises(PumpGone, match="checksum mismatch"):
        await asyncio.wait_for(rig.pump.apply(bytes(record)), WAIT_S)
    assert not rig.pump.usable
    with pytest.raises(PumpGone):
        await rig.pump.apply(codec.encode(event))


async def test_the_pump_ignores_stop_signals_and_exits_when_closed(redis_server: EmbeddedRedis) -> None:
    """SIGINT/SIGTERM (Ctrl-C, a signal to the group) leave it running; close() ends it cleanly."""
    pump = await ProjectionPump.start(redis_server.url, KEYS, "0" * 32)
    try:
        assert [b"missing"] == await asyncio.wait_for(pump.apply(b""), WAIT_S)  # up and serving
        os.kill(pump.pid, signal.SIGINT)
        os.kill(pump.pid, signal.SIGTERM)
        await asyncio.sleep(0.1)
        assert pump._process.returncode is None
    finally:
        await pump.close()
    assert 0 == pump._process.returncode
    with pytest.raises(PumpGone, match="stopped"):
        await pump.apply(b"")
