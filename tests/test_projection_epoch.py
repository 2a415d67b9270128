"""The epoch guard of a cluster shard's projection and worker (CLUSTER.md §5), against a real redis-server.

In cluster mode a projector writes under its shard's lease epoch: the projection's meta hash
records the owner (cluster and shard) and the newest epoch that wrote it, and a writer with an
older epoch, or from another cluster, changes nothing — neither a batch (``apply_batch.lua``)
nor a rebuild (``claim_projection.lua``). Single-node projectors record no epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest
import redis.asyncio as aioredis

from tollway import Engine
from tollway.core import commands as cmd
from tollway.core.commands import CreditKind
from tollway.finalizer import FinalizeWorker
from tollway.redis.keys import Keys
from tollway.redis.projector import ProjectionForeign, ProjectionStale, Projector
from tollway.redis.queue import FinalizeQueue
from tollway.redis.server import EmbeddedRedis
from tollway.settlement.client import SettlementAuth, SettlementClient
from tollway.tokens import generate_signing_key

KEYS: Final = Keys("tw", "5")
OWNER: Final = "cluster c-1 shard 5"


async def _dump(client: aioredis.Redis) -> dict[object, object]:
    out: dict[object, object] = {}
    for key in sorted(await client.keys("*")):
        kind = await client.type(key)
        out[key] = await client.hgetall(key) if kind == b"hash" else await client.dump(key)
    return out


async def _mint(engine: Engine, credit_id: str, amount_micro: int) -> None:
    await engine.execute(cmd.Credit("acct", credit_id, CreditKind.MINT, amount_micro))


async def test_a_newer_epoch_takes_the_projection_and_an_older_one_changes_nothing(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """Epoch 3 syncs; epoch 2 (even with new events) is refused on sync and on rebuild, the projection untouched."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with Engine.open(tmp_path / "d") as engine:
            await _mint(engine, "m1", 1_000)
            newer = Projector(engine, client, KEYS, owner=OWNER, epoch=3)
            assert engine.durable_sequence == await newer.sync()
            meta = await client.hgetall(KEYS.meta)
            assert (b"3", OWNER.encode(), b"5") == (meta[b"epoch"], meta[b"owner"], meta[b"shard"])
            before = await _dump(client)
            await _mint(engine, "m2", 5_000)  # events the old writer would project
            older = Projector(engine, client, KEYS, owner=OWNER, epoch=2)
            with pytest.raises(ProjectionStale, match="epoch 3"):
                await older.sync()
            with pytest.raises(ProjectionStale):
                await older.rebuild()
            assert before == await _dump(client)
            assert engine.durable_sequence == await newer.sync()  # the owner goes on
            assert b"6000" == await client.hget(KEYS.account("acct"), "available")
    finally:
        await client.aclose()


async def test_a_batch_of_an_older_epoch_is_refused_by_the_script(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    """Past the projector's own check: a batch sent with an older epoch is refused inside apply_batch.lua."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with Engine.open(tmp_path / "d") as engine:
            await _mint(engine, "m1", 1_000)
            older = Projector(engine, client, KEYS, owner=OWNER, epoch=1)
            await older.sync()
            await Projector(engine, client, KEYS, owner=OWNER, epoch=2).sync()  # a new owner claims it
            await _mint(engine, "m2", 5_000)
            before = await _dump(client)
            events = engine.state.last_sequence
            with pytest.raises(ProjectionStale, match="epoch 2"):
                await older._apply_events(await engine.log.read(events - 1, 1))
            assert before == await _dump(client)
    finally:
        await client.aclose()


async def test_another_cluster_never_writes_the_projection(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    """Same prefix and shard, another cluster id: refused as foreign, whatever its epoch."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with Engine.open(tmp_path / "d") as engine:
            await _mint(engine, "m1", 1_000)
            await Projector(engine, client, KEYS, owner=OWNER, epoch=1).sync()
            before = await _dump(client)
            other = Projector(engine, client, KEYS, owner="cluster c-2 shard 5", epoch=99)
            with pytest.raises(ProjectionForeign, match=OWNER):
                await other.sync()
            with pytest.raises(ProjectionForeign):
                await other.rebuild()
            assert before == await _dump(client)
    finally:
        await client.aclose()


async def test_a_single_node_projection_records_no_epoch(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    """Without an epoch (single-node mode) the meta hash is what it always was: no epoch, no shard field."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with Engine.open(tmp_path / "d") as engine:
            await _mint(engine, "m1", 1_000)
            await Projector(engine, client, Keys()).sync()
            meta = await client.hgetall(Keys().meta)
            assert {b"applied_seq", b"owner", b"rebuilt_at_ms"} == set(meta)
    finally:
        await client.aclose()


async def test_a_worker_that_no_longer_owns_its_shard_leaves_the_messages_to_the_owner(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """A worker whose node lost the shard handles nothing: a message its stale engine does not know stays queued."""
    client = aioredis.Redis.from_url(redis_server.url)
    owner = {"still": False}
    settlement = SettlementClient.from_url("http://127.0.0.1:9", SettlementAuth(signing_key=generate_signing_key()))
    try:
        async with Engine.open(tmp_path / "d") as engine:
            queue = FinalizeQueue(client, KEYS, consumer="node-a", owner=OWNER)
            await queue.ensure_group()
            await client.xadd(KEYS.finalize, {"billing_entry_id": "01J9Z3NDEK1A3V4RRFFQ69G5FA", "account_id": "acct"})
            worker = FinalizeWorker(engine, queue, settlement, still_owner=lambda: owner["still"])
            assert 0 == await worker.run_once()
            assert (1, 0) == (await client.xlen(KEYS.finalize), worker.calls)
            owner["still"] = True  # the same worker, owning the shard: its engine knows no such entry
            assert 1 == await worker.run_once()
            assert 0 == await client.xlen(KEYS.finalize)
    finally:
        await settlement.aclose()
        await client.aclose()
