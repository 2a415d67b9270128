"""``tollway rebuild`` and ``tollway audit --redis-url`` as real processes against a real redis-server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import redis.asyncio as aioredis

from tollway import Engine, Settings
from tollway.core import commands as cmd
from tollway.core.commands import CreditKind, EntryResult
from tollway.redis.projector import Projector
from tollway.redis.server import EmbeddedRedis
from tollway.service import redis_keys


async def tollway(*args: str) -> tuple[int, str]:
    """Run the CLI in a subprocess; its exit code and everything it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tollway.cli", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def stopped_service(settings: Settings, url: str) -> None:
    """Some billing, projected into Redis, then the engine stops."""
    client = aioredis.Redis.from_url(url)
    try:
        async with Engine.open(settings=settings) as engine:
            projector = Projector(engine, client, redis_keys(settings))
            await engine.execute(cmd.Credit("acct", "m", CreditKind.MINT, 10_000))
            for i in range(5):
                held = await engine.execute(cmd.Reserve("acct", f"r{i}", 1_000))
                assert isinstance(held, EntryResult)
                if i % 2:
                    await engine.execute(cmd.Commit(held.entry.billing_entry_id, 700))
            await projector.sync()
    finally:
        await client.aclose()


async def test_audit_with_redis_passes_then_names_a_tampered_balance(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """The audit compares the projection; a balance changed in Redis makes it exit 1 naming the account."""
    settings = Settings(data_dir=tmp_path / "data")
    await stopped_service(settings, redis_server.url)
    code, output = await tollway("audit", "--data-dir", str(settings.data_dir), "--redis-url", redis_server.url)
    assert 0 == code, output
    assert "projection in parity" in output
    client = aioredis.Redis.from_url(redis_server.url)
    await client.hincrby(redis_keys(settings).account("acct"), "held", 5)
    await client.aclose()
    code, output = await tollway("audit", "--data-dir", str(settings.data_dir), "--redis-url", redis_server.url)
    assert 1 == code
    assert "account acct held" in output


async def test_rebuild_restores_a_flushed_projection(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    """After FLUSHALL, ``tollway rebuild`` recreates the projection in parity with the WAL."""
    settings = Settings(data_dir=tmp_path / "data")
    await stopped_service(settings, redis_server.url)
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    code, output = await tollway("rebuild", "--data-dir", str(settings.data_dir), "--redis-url", redis_server.url)
    assert 0 == code, output
    assert "in parity with the WAL" in output
    code, output = await tollway("audit", "--data-dir", str(settings.data_dir), "--redis-url", redis_server.url)
    assert 0 == code, output


async def test_rebuild_needs_an_external_redis(tmp_path: Path) -> None:
    """Without a Redis URL there is nothing to rebuild offline: a clear error, exit 2."""
    settings = Settings(data_dir=tmp_path / "data")
    async with Engine.open(settings=settings):
        pass
    code, output = await tollway("rebuild", "--data-dir", str(settings.data_dir))
    assert 2 == code
    assert "give --redis-url" in output


async def test_rebuild_against_an_unreachable_or_full_redis_is_a_clear_error(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """No traceback: one line naming the Redis and the cause, exit 2 (the WAL is not touched)."""
    settings = Settings(data_dir=tmp_path / "data")
    await stopped_service(settings, redis_server.url)
    code, output = await tollway("rebuild", "--data-dir", str(settings.data_dir), "--redis-url", "redis://127.0.0.1:1")
    assert 2 == code, output
    assert "could not rebuild the projection in the redis at redis://127.0.0.1:1" in output
    assert "Traceback" not in output
    client = aioredis.Redis.from_url(redis_server.url)
    await client.config_set("maxmemory", "1")
    try:
        code, output = await tollway("rebuild", "--data-dir", str(settings.data_dir), "--redis-url", redis_server.url)
    finally:
        await client.config_set("maxmemory", "0")
        await client.aclose()
    assert 2 == code, output
    assert "maxmemory" in output
    assert "Traceback" not in output
