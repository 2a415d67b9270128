"""The assembled service: engine + embedded Redis + projector + sweeper + finalize worker, in real time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from tollway import Settings
from tollway.audit import audit
from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.core.commands import CreditKind, EntryResult
from tollway.core.lifecycle import EntryState
from tollway.redis.parity import differences
from tollway.service import Service, settlement_signing_key
from tollway.settlement.sim_config import SimulatorConfig
from tollway.settlement.simulator import SimulatorServer
from tollway.testing import FakeClock
from tollway.wal.segments import iter_events


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
            await eventually(lambda: engine.state.entry_state(entry_id) is EntryState.FINALIZE_ACKED)
        record = simulator.state.book.get(entry_id)
        assert record is not None
        assert (2_500, 1) == (record.actual_cost_micro, record.calls)


async def test_a_normal_restart_logs_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A restart on existing data rebuilds the embedded Redis's projection at info level: a warning means trouble."""
    settings = Settings(data_dir=tmp_path / "data")
    async with Service.running(settings) as service:
        await service.engine.execute(cmd.Credit("acct", "m", CreditKind.MINT, 10_000))
        await service.engine.execute(cmd.Reserve("acct", "r", 3_000))
    caplog.clear()
    caplog.set_level(logging.INFO, logger="tollway")
    async with Service.running(settings) as service:
        await eventually(lambda: service.projector.applied_seq == service.engine.durable_sequence)
    rebuilt = [r.levelno for r in caplog.records if r.getMessage().startswith("projection rebuilt from the WAL")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert ([logging.INFO], []) == (rebuilt, warnings)


async def test_guard_is_ready_and_metrics_are_scrapeable(tmp_path: Path) -> None:
    """After startup the guard allows holds and one scrape carries transitions, queue depths and the guard."""
    async with Service.running(Settings(data_dir=tmp_path / "data")) as service:
        assert "ready" == service.guard.status().to_dict()["state"]
        await service.engine.execute(cmd.Credit("acct", "m", CreditKind.MINT, 10_000))
        await service.engine.execute(cmd.Reserve("acct", "r", 3_000))
        await service.collect_metrics()
        text = service.metrics.render().decode()
    for name in ("billing_state_transitions_total", "billing_finalize_queue_depth", "billing_guard_state"):
        assert name in text
    assert 'billing_state_transitions_total{from_state="IDLE",to_state="RESERVE_HELD"} 1.0' in text


async def test_guard_bypass_is_recorded_in_the_wal(tmp_path: Path) -> None:
    """Starting with the break-glass bypass writes an audit event and leaves the guard bypassed."""
    settings = Settings(data_dir=tmp_path / "data")
    async with Service.running(settings, guard_bypass=True) as service:
        assert "bypassed" == service.guard.status().to_dict()["state"]
    actions = [e.payload.action for e in iter_events(settings.wal_dir) if isinstance(e.payload, ev.Audit)]
    assert ["guard_bypass"] == actions


async def test_the_archiver_task_drops_old_entries_from_the_engine_and_redis(tmp_path: Path) -> None:
    """A settled entry leaves Redis at once and the engine past the retention (the archiver task); parity holds."""
    clock = FakeClock()
    settings = Settings(data_dir=tmp_path / "data", entry_retention_hours=24, archive_interval_s=1)
    async with Service.running(settings, clock=clock) as service:
        engine = service.engine
        await engine.execute(cmd.Credit("acct", "m", CreditKind.MINT, 10_000))
        held = await engine.execute(cmd.Reserve("acct", "old", 3_000))
        assert isinstance(held, EntryResult)
        old = held.entry.billing_entry_id
        await engine.execute(cmd.Commit(old, 1_000, response_json='{"ok": true}'))
        await eventually(lambda: service.projector.applied_seq == engine.durable_sequence)
        assert 0 == await service.redis.exists(service.keys.entry(old), service.keys.response(old))  # settled
        settled = await engine.get_entry(old)  # its record is still in the engine, until the retention
        assert settled is not None
        assert 1 == settled.charged_micro // 1_000
        clock.advance(25 * 3_600_000)
        live = await engine.execute(cmd.Reserve("acct", "new", 1_000))
        assert isinstance(live, EntryResult)
        await eventually(lambda: engine.state.entry_state(old) is None, timeout_s=5)
        archived_at = engine.state.last_sequence  # the archive event (applied; maybe not yet durable)
        await eventually(lambda: service.projector.applied_seq == archived_at)
        assert await service.redis.exists(service.keys.entry(old), service.keys.response(old)) == 0
        assert [live.entry.billing_entry_id] == list(engine.state.entries)
        assert [] == await differences(service.redis, service.keys, engine.state)
    report = audit(settings.data_dir)
    assert (True, 1) == (report.ok, report.state.archived_entries), report.problems
