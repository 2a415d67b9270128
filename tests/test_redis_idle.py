"""A Redis that dies or comes back empty while nobody bills is noticed and rebuilt without a write.

A caught-up projector used to sleep until the engine's next durable batch, so an embedded
redis-server killed during a quiet spell was restarted empty and stayed empty: the finalize
queue of every charge still waiting for settlement was gone until some gateway billed again,
and with an external Redis ``/readyz`` kept saying ``connected`` while it was unreachable. Now
an idle projector looks at Redis every :data:`~tollway.redis.projector.IDLE_CHECK_MS`.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from tests.test_metrics import scrape, value
from tests.test_service import eventually
from tollway import Settings
from tollway.core import commands as cmd
from tollway.core.commands import CreditKind, EntryResult
from tollway.core.lifecycle import EntryState
from tollway.redis.server import EmbeddedRedis
from tollway.service import Service, settlement_signing_key
from tollway.settlement.sim_config import Faults, SimulatorConfig
from tollway.settlement.simulator import SimulatorServer

WAIT_S = 20.0


async def _applied_seq(service: Service) -> int | None:
    raw = await service.redis.hget(service.keys.meta, "applied_seq")
    return None if raw is None else int(raw)


async def test_an_embedded_redis_killed_while_idle_is_rebuilt_and_pending_charges_are_finalized(tmp_path: Path) -> None:
    """kill -9 of the embedded Redis with charges awaiting settlement and no traffic: each is finalized once."""
    data = tmp_path / "data"
    key, _ = settlement_signing_key(Settings(data_dir=data))
    async with SimulatorServer(SimulatorConfig(keys={key.kid: key.public()})) as simulator:
        simulator.state.faults = Faults(outage=True)  # the charges wait in Redis for a retry
        settings = Settings(data_dir=data, settlement_url=simulator.url)
        async with Service.running(settings) as service:
            engine, worker, watch = service.engine, service.worker, service.redis_watch
            assert worker is not None
            assert watch is not None
            await engine.execute(cmd.Credit("acct", "m", CreditKind.MINT, 10_000))
            charged = {}
            for n in range(2):  # two failed calls: the breaker (5 failures) stays closed
                held = await engine.execute(cmd.Reserve("acct", f"r{n}", 1_000))
                assert isinstance(held, EntryResult)
                await engine.execute(cmd.Commit(held.entry.billing_entry_id, 500 + n))
                charged[held.entry.billing_entry_id] = 500 + n
            await eventually(lambda: worker.calls >= len(charged), WAIT_S)
            last = engine.durable_sequence
            os.kill(watch.server.pid or 0, signal.SIGKILL)  # their retries were only in Redis
            simulator.state.faults = Faults()
            await eventually(lambda: watch.restarts == 1, WAIT_S)
            await eventually(
                lambda: all(engine.state.entry_state(i) is EntryState.FINALIZE_ACKED for i in charged), WAIT_S
            )
            assert last + len(charged) == engine.state.last_sequence  # nothing but the acks was written since
        page, _ = simulator.state.book.page(None, 100)
        assert charged == {record.reservation_id: record.actual_cost_micro for record in page}


async def test_an_external_redis_gone_while_idle_is_reported_and_rebuilt_when_back(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """No traffic: an unreachable external Redis shows as not connected; back empty, it is rebuilt without a write."""
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_server.url)
    async with Service.running(settings) as service:
        await service.engine.execute(cmd.Credit("acct", "m", CreditKind.MINT, 10_000))
        last = service.engine.durable_sequence
        await eventually(lambda: service.projector.applied_seq == last, WAIT_S)
        await asyncio.sleep(0.2)  # caught up and idle
        await redis_server.stop()
        await eventually(lambda: not service.projector.status().connected, WAIT_S)
        await service.collect_metrics()
        assert 0 == value(scrape(service.metrics)[1], "billing_projection_connected")
        await redis_server.restart()  # an empty server on the same socket
        async with asyncio.timeout(WAIT_S):
            while await _applied_seq(service) != last:  # noqa: ASYNC110 - polling another task's work
                await asyncio.sleep(0.05)
        assert (True, last) == (service.projector.status().connected, service.engine.durable_sequence)
