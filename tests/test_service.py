"""The assembled service: engine + embedded Redis + projector + sweeper + finalize worker, in real time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from tollway import Settings
from tollway.core import commands as cmd
from tollway.core.commands import CreditKind, EntryResult
from tollway.core.lifecycle import EntryState
from tollway.redis.parity import differences
from tollway.service import Service, settlement_signing_key
from tollway.settlement.sim_config import SimulatorConfig
from tollway.settlement.simulator import SimulatorServer


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait (polling) until ``condition()`` holds; fail after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polling state owned by other tasks
            await asyncio.sleep(0.01)


async def test_standalone_service_projects_into_its_embedded_redis(tmp_path: Path) -> None:
    """With no Redis URL the service starts a private redis-server and keeps the projection in parity."""
    settings = Settings(data_dir=tmp_path / "data")
    async with Service.running(settings) as service:
        assert service.embedded is not None
        await service.engine.execute(cmd.Credit("acct", "m", CreditKind.MINT, 10_000))
        held = await service.engine.execute(cmd.Reserve("acct", "r", 3_000))
        assert isinstance(held, EntryResult)
        await service.engine.execute(cmd.Commit(held.entry.billing_entry_id, 1_000))
        await eventually(lambda: service.projector.applied_seq == service.engine.durable_sequence)
        assert [] == await differences(service.redis, service.keys, service.engine.state)
        socket = service.embedded.socket_path
    assert not socket.exists()


async def test_settlement_mode_finalizes_in_the_background(tmp_path: Path) -> None:
    """A commit in settlement mode reaches FINALIZE_ACKED through the background worker and a real simulator."""
    data = tmp_path / "data"
    key, _ = settlement_signing_key(Settings(data_dir=data))
    async with SimulatorServer(SimulatorConfig(keys={key.kid: key.public()})) as simulator:
        settings = Settings(data_dir=data, settlement_url=simulator.url)
        async with Service.running(settings) as service:
            engine = service.engine
            await engine.execute(cmd.Credit("acct", "m", CreditKind.MINT, 10_000))
            held = await engine.execute(cmd.Reserve("acct", "r", 3_000))
            assert isinstance(held, EntryResult)
            entry_id = held.entry.billing_entry_id
            await engine.execute(cmd.Commit(entry_id, 2_500))
            await eventually(lambda: engine.state.entries[entry_id].state is EntryState.FINALIZE_ACKED)
        record = simulator.state.book.get(entry_id)
        assert record is not None
        assert (2_500, 1) == (record.actual_cost_micro, record.calls)
