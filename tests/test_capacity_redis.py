"""Redis holds live work only: a small embedded Redis carries many times its size in billing, flat.

A settled entry leaves the projection when it settles, and stored responses are not projected,
so the embedded Redis, capped here at its smallest (16 MiB), never fills with history: billing
and settlement go on and Redis memory stays flat over a workload that used to fill it several
times over (about 0.6–0.9 KB per settled entry, plus its stored response).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.test_service import eventually
from tollway import Settings
from tollway.api import Authenticator, create_app
from tollway.core import commands as cmd
from tollway.core.commands import CreditKind, EntryResult
from tollway.core.lifecycle import EntryState
from tollway.redis.parity import differences
from tollway.service import Service

MEMORY_MAX = 16 << 20
PAIRS = 12_000
GATEWAYS = 24
RESPONSE = '{"text": "' + "x" * 2_000 + '"}'  # 12,000 of these alone are 24 MB: more than the cap
WAIT_S = 120.0


async def _used_memory(service: Service) -> int:
    info = await service.redis.info("memory")
    return int(info["used_memory"])


async def test_a_small_redis_stays_flat_under_many_times_its_size_of_billing(tmp_path: Path) -> None:
    """12,000 committed charges with 2 KB responses through a 16 MiB Redis: memory flat, in parity, ready."""
    settings = Settings(data_dir=tmp_path / "data", redis_memory_bytes_max=MEMORY_MAX)
    async with Service.running(settings) as service:
        engine = service.engine
        await engine.execute(cmd.Credit("acct", "m", CreditKind.MINT, 10_000_000_000))
        committed: list[str] = []
        samples: list[int] = []

        async def gateway(index: int) -> None:
            for step in range(index, PAIRS, GATEWAYS):
                held = await engine.execute(cmd.Reserve("acct", f"r{step}", 1_000))
                assert isinstance(held, EntryResult), held
                entry_id = held.entry.billing_entry_id
                done = await engine.execute(cmd.Commit(entry_id, 900, response_json=RESPONSE))
                assert isinstance(done, EntryResult), done
                committed.append(entry_id)
                if step % 500 == 0:
                    samples.append(await _used_memory(service))

        await asyncio.gather(*(gateway(index) for index in range(GATEWAYS)))
        await eventually(lambda: service.projector.applied_seq == engine.durable_sequence, WAIT_S)
        end = await _used_memory(service)
        status = service.projector.status()
        assert (None, True, 0) == (status.redis_error, engine.policy.holds_allowed, status.divergences)
        assert [] == await differences(service.redis, service.keys, engine.state)
        pattern = service.keys.entry("*").replace("{", "\\{").replace("}", "\\}")
        assert [] == [key async for key in service.redis.scan_iter(match=pattern)]  # nothing live is left
        assert end < samples[0] + (2 << 20), (samples[0], end, samples)  # flat: live work only, never history
        assert PAIRS == len(committed)
        assert {EntryState.COMMITTED} == {engine.state.entry_state(i) for i in committed}


async def test_a_redis_refusing_writes_says_so_at_once_and_the_projection_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis at maxmemory: billing goes on, /readyz, a metric and a log line say so; room back, it catches up."""
    settings = Settings(data_dir=tmp_path / "data")
    async with Service.running(settings) as service:
        engine, app = service.engine, create_app(service, authenticator=Authenticator.from_settings(settings))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tollway") as http:
            await engine.execute(cmd.Credit("acct", "m", CreditKind.MINT, 10_000_000))
            await eventually(lambda: service.projector.applied_seq == engine.durable_sequence, WAIT_S)
            await service.redis.config_set("maxmemory", "1")  # every write that may grow memory is refused
            try:
                for step in range(20):  # billing goes on
                    held = await engine.execute(cmd.Reserve("acct", f"r{step}", 1_000))
                    assert isinstance(held, EntryResult), held
                    assert isinstance(await engine.execute(cmd.Commit(held.entry.billing_entry_id, 900)), EntryResult)
                await eventually(lambda: service.projector.status().redis_error is not None, WAIT_S)
                ready = (await http.get("/readyz")).json()
                await service.collect_metrics()
                refusing = service.metrics.projection_redis_refusing._value.get()  # the gauge's value
                assert ("OOM" in ready["redis"]["error"], True, 1.0) == (True, ready["ready"], refusing)
                assert any("projection paused" in record.getMessage() for record in caplog.records)
            finally:
                await service.redis.config_set("maxmemory", str(MEMORY_MAX))
            await eventually(lambda: service.projector.applied_seq == engine.durable_sequence, WAIT_S)
            await eventually(lambda: service.projector.status().redis_error is None, WAIT_S)
            await service.collect_metrics()
            assert 0.0 == service.metrics.projection_redis_refusing._value.get()
            assert None is (await http.get("/readyz")).json()["redis"]["error"]
            assert [] == await differences(service.redis, service.keys, engine.state)
