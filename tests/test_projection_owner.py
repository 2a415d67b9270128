"""Whose projection is it: every projection belongs to one data directory, and no other engine touches it.

Two engines configured with the same Redis prefix and shard used to overwrite each other's
balances, and each one's worker dropped the other's finalize messages as unknown entries. The
data directory's identity (``<wal>/IDENTITY``) now marks the projection it writes; another
engine's projector, pump, worker and service refuse it and say so.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.test_cli_projection import stopped_service, tollway
from tests.test_service import eventually
from tollway import Engine, Settings
from tollway.core import commands as cmd
from tollway.core.commands import CreditKind
from tollway.finalizer import FinalizeWorker
from tollway.redis.keys import Keys
from tollway.redis.projector import ProjectionForeign, Projector
from tollway.redis.pump import ProjectionPump
from tollway.redis.queue import FinalizeQueue
from tollway.redis.server import EmbeddedRedis
from tollway.service import Service, redis_keys
from tollway.settlement.client import SettlementAuth, SettlementClient
from tollway.tokens import generate_signing_key
from tollway.wal.identity import IDENTITY_FILE

KEYS = Keys("tw", "shared")


async def _dump(client: aioredis.Redis) -> dict[object, object]:
    out: dict[object, object] = {}
    for key in sorted(await client.keys("*")):
        kind = await client.type(key)
        out[key] = await client.hgetall(key) if kind == b"hash" else await client.dump(key)
    return out


async def test_a_data_directory_keeps_one_identity(tmp_path: Path) -> None:
    """The identity is made once, kept in the WAL directory, and the same after a reopen."""
    async with Engine.open(tmp_path / "data") as engine:
        first = engine.identity
    async with Engine.open(tmp_path / "data") as engine:
        assert (first, 32) == (engine.identity, len(first))
    assert first == (tmp_path / "data" / "wal" / IDENTITY_FILE).read_text().strip()


async def test_a_second_engine_never_writes_the_first_ones_projection(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """Same prefix and shard: the second projector (and its pump) is refused, and the first projection is untouched."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with (
            Engine.open(tmp_path / "one") as one,
            Engine.open(tmp_path / "two") as two,
        ):
            await one.execute(cmd.Credit("acct", "m", CreditKind.MINT, 1_000))
            await Projector(one, client, KEYS).sync()
            before = await _dump(client)
            await two.execute(cmd.Credit("acct", "m", CreditKind.MINT, 9_999))
            second = Projector(two, client, KEYS)
            with pytest.raises(ProjectionForeign, match=one.identity):
                await second.sync()
            with pytest.raises(ProjectionForeign, match="give this service its own redis_prefix or shard"):
                await second.rebuild()
            pump = await ProjectionPump.start(redis_server.url, KEYS, two.identity)
            try:
                records = b"".join(await asyncio.to_thread(_records, two))
                assert [b"foreign", one.identity.encode()] == await pump.apply(records)
            finally:
                await pump.close()
            assert before == await _dump(client)
    finally:
        await client.aclose()


def _records(engine: Engine) -> list[bytes]:
    from tollway.wal import codec  # noqa: PLC0415
    from tollway.wal.segments import iter_events  # noqa: PLC0415

    return [codec.encode(event) for event in iter_events(engine.settings.wal_dir)]


async def test_another_data_directorys_worker_takes_no_message(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    """A worker whose queue belongs to another data directory leaves every message where it is."""
    client = aioredis.Redis.from_url(redis_server.url)
    key = generate_signing_key()
    settlement = SettlementClient.from_url("http://127.0.0.1:9", SettlementAuth(signing_key=key))
    try:
        settings = Settings(data_dir=tmp_path / "one", settlement_url="http://127.0.0.1:9")
        async with Engine.open(settings=settings) as one, Engine.open(tmp_path / "two") as two:
            await one.execute(cmd.Credit("acct", "m", CreditKind.MINT, 1_000))
            held = await one.execute(cmd.Reserve("acct", "r", 100))
            assert isinstance(held, cmd.EntryResult)
            await one.execute(cmd.Commit(held.entry.billing_entry_id, 100))
            await Projector(one, client, KEYS).sync()
            assert 1 == await client.xlen(KEYS.finalize)
            queue = FinalizeQueue(client, KEYS, "intruder", owner=two.identity)
            assert one.identity == await queue.foreign_owner()
            worker = FinalizeWorker(two, queue, settlement)
            task = asyncio.create_task(worker.run())
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (1, 0, 0) == (
                await client.xlen(KEYS.finalize),
                worker.calls,
                len(await client.xinfo_consumers(KEYS.finalize, "billing_finalize_group")),
            )
    finally:
        await settlement.aclose()
        await client.aclose()


async def test_a_service_refuses_to_start_on_another_ones_keys(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    """The second service with the same Redis prefix and shard stops at startup naming both identities and the fix."""
    first = Settings(data_dir=tmp_path / "one", redis_url=redis_server.url)
    second = first.replace(data_dir=tmp_path / "two")
    async with Service.running(first) as service:
        await service.engine.execute(cmd.Credit("acct", "m", CreditKind.MINT, 1_000))
        await eventually(lambda: service.projector.applied_seq == service.engine.durable_sequence)
        with pytest.raises(ProjectionForeign, match=service.engine.identity) as refused:
            async with Service.running(second):
                pass
        assert "TOLLWAY_REDIS_PREFIX" in str(refused.value)
        assert [] == await _parity(service)


async def _parity(service: Service) -> list[str]:
    from tollway.redis.parity import differences  # noqa: PLC0415

    return await differences(service.redis, service.keys, service.engine.state)


async def test_rebuild_takes_over_only_when_told(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    """``tollway rebuild`` refuses another data directory's keys (exit 2, the fix named); --take-over claims them."""
    gone = Settings(data_dir=tmp_path / "gone")
    await stopped_service(gone, redis_server.url)
    heir = Settings(data_dir=tmp_path / "heir")
    await stopped_service(heir.replace(redis_prefix="elsewhere"), redis_server.url)
    args = ("rebuild", "--data-dir", str(heir.data_dir), "--redis-url", redis_server.url)
    code, output = await tollway(*args)
    assert (2, True) == (code, "--take-over" in output)
    code, output = await tollway(*args, "--take-over")
    assert 0 == code, output
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with Engine.open(settings=heir) as engine:
            assert engine.identity.encode() == await client.hget(redis_keys(heir).meta, "owner")
    finally:
        await client.aclose()
