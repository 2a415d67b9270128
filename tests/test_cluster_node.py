"""Two nodes in one process on the test's PostgreSQL: a zombie's batch is fenced, its caller told to retry.

Node ``a`` takes every shard, then its monotonic clock stops (as a paused process's would
look to itself), so it still believes its leases fresh. The leases expire by PostgreSQL's
clock and node ``b`` takes them with new epochs. A reserve sent to ``a`` is decided and applied
in ``a``'s memory, but its batch is refused by the fence: nothing is written, the caller gets
503 ``shard_moved`` with ``Retry-After``, ``a`` stops serving the shard, and the same request
sent to ``b`` takes effect exactly once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from tests.in_process_node import node_client
from tests.test_service import eventually
from tollway import Settings
from tollway.api.auth import Authenticator, Scope, development_key, issue_token
from tollway.cluster.node import Node
from tollway.cluster.shard_redis import RedisSide
from tollway.core import commands as cmd
from tollway.core.errors import LogUnavailable
from tollway.core.lease import LeaseTiming
from tollway.pg.log import PgLog
from tollway.pg.schema import init_cluster, open_cluster
from tollway.pricing import default_prices
from tollway.redis.server import EmbeddedRedis
from tollway.settlement.client import SettlementAuth, SettlementClient
from tollway.tokens import generate_signing_key

TIMING = LeaseTiming(
    ttl_ms=3_000, renew_every_ms=600, margin_ms=300
)  # the mint must land before a's leases expire, on a loaded machine too
SHARDS = 2


async def test_a_zombies_batch_is_fenced_and_the_retry_lands_once(pg_pool: asyncpg.Pool, tmp_path: Path) -> None:
    """The fenced batch writes nothing and answers 503 shard_moved; the retry on the new owner lands once."""
    async with pg_pool.acquire() as connection:
        await init_cluster(connection, shards=SHARDS)
        info = await open_cluster(connection)
    settings = Settings(data_dir=tmp_path)
    key, _ = development_key(settings)
    token = issue_token(key, settings, [Scope.ADMIN.value], subject="t", ttl_s=600)
    headers = {"authorization": f"Bearer {token}"}
    a = Node(pg_pool, info, settings, node_id="a", advertise_url="http://a.invalid", timing=TIMING)
    b = Node(pg_pool, info, settings, node_id="b", advertise_url="http://b.invalid", timing=TIMING)
    await a.tick()
    frozen_ms = a.membership.clock_ms()
    a.membership.clock_ms = lambda: frozen_ms  # a is "paused": its own clock says its leases are fresh
    async with httpx.AsyncClient() as forwarder:
        auth = Authenticator.from_settings(settings)
        async with (
            node_client(a, authenticator=auth, pricing=default_prices(), forwarder=forwarder) as to_a,
            node_client(b, authenticator=auth, pricing=default_prices(), forwarder=forwarder) as to_b,
        ):
            credit = {"credit_id": "c1", "kind": "mint", "amount_micro": 100}
            assert 201 == (await to_a.post("/v1/accounts/alice/credits", json=credit, headers=headers)).status_code
            number = a.shard_of_account("alice")
            epoch_a = a.membership.serving(number)
            await asyncio.sleep(TIMING.ttl_ms / 1000 + 0.2)  # a's leases expire by PostgreSQL's clock
            await b.tick()
            hold = {"account_id": "alice", "request_id": "r1", "estimated_cost_micro": 10}
            fenced = await to_a.post("/v1/reservations", json=hold, headers=headers)
            last_seq_after_fence = await PgLog(pg_pool, number).last_seq()
            retried = await to_b.post("/v1/reservations", json=hold, headers=headers)
            again = await to_b.post("/v1/reservations", json=hold, headers=headers)
            balance = (await to_b.get("/v1/accounts/alice", headers=headers)).json()
        await a.engines.close()
        await b.leave()
    assert (503, "shard_moved", "1") == (fenced.status_code, fenced.json()["error"], fenced.headers["retry-after"])
    assert (1, None) == (last_seq_after_fence, a.membership.serving(number))
    assert (201, 409) == (retried.status_code, again.status_code)
    assert ("90", "10") == (balance["available_micro"], balance["held_micro"])
    assert b.membership.serving(number) is None  # left
    assert epoch_a is not None
    assert f"b {number} {epoch_a + 1}" == retried.headers["x-tollway-answered-by"]


async def test_a_shard_whose_batch_postgresql_failed_is_recovered_under_a_new_epoch(
    pg_pool: asyncpg.Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL failing a batch stops only that shard; after its lease expires the node recovers it, epoch + 1."""
    async with pg_pool.acquire() as connection:
        await init_cluster(connection, shards=SHARDS)
        info = await open_cluster(connection)
    settings = Settings(data_dir=tmp_path)
    key, _ = development_key(settings)
    headers = {"authorization": f"Bearer {issue_token(key, settings, [Scope.ADMIN.value], subject='t', ttl_s=600)}"}
    a = Node(pg_pool, info, settings, node_id="a", advertise_url="http://a.invalid", timing=TIMING)
    await a.tick()
    number = a.shard_of_account("alice")
    epoch = a.membership.serving(number)
    real_append = PgLog.append

    async def failing(self: PgLog, records: list[bytes], first_seq: int, epoch: int) -> None:
        raise LogUnavailable("the connection was lost")

    async with httpx.AsyncClient() as forwarder:
        auth = Authenticator.from_settings(settings)
        async with node_client(a, authenticator=auth, pricing=default_prices(), forwarder=forwarder) as to_a:
            credit = {"credit_id": "c1", "kind": "mint", "amount_micro": 100}
            monkeypatch.setattr(PgLog, "append", failing)
            failed = await to_a.post("/v1/accounts/alice/credits", json=credit, headers=headers)
            serving_after_failure = a.membership.serving(number)
            monkeypatch.setattr(PgLog, "append", real_append)
            await asyncio.sleep(TIMING.ttl_ms / 1000 + 0.2)  # the lease expires by PostgreSQL's clock
            await a.tick()
            await a.tick()
            retried = await to_a.post("/v1/accounts/alice/credits", json=credit, headers=headers)
            balance = (await to_a.get("/v1/accounts/alice", headers=headers)).json()
        await a.leave()
    assert (503, None) == (failed.status_code, serving_after_failure)
    assert epoch is not None
    assert (201, "100") == (retried.status_code, balance["available_micro"])
    assert f"a {number} {epoch + 1}" == retried.headers["x-tollway-answered-by"]


async def test_a_void_is_refused_while_the_shards_worker_calls_settlement_for_the_entry(
    pg_pool: asyncpg.Pool, tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """409 settlement_call_in_flight on a node as on a single service; the void goes through after."""
    async with pg_pool.acquire() as connection:
        await init_cluster(connection, shards=SHARDS)
        info = await open_cluster(connection)
    settings = Settings(data_dir=tmp_path, settlement_url="http://127.0.0.1:9")
    key, _ = development_key(settings)
    headers = {"authorization": f"Bearer {issue_token(key, settings, [Scope.ADMIN.value], subject='t', ttl_s=600)}"}
    client = aioredis.Redis.from_url(redis_server.url)
    settlement = SettlementClient.from_url("http://127.0.0.1:9", SettlementAuth(signing_key=generate_signing_key()))
    side = RedisSide(client, info.cluster_id, "a", settings, settlement)
    a = Node(pg_pool, info, settings, node_id="a", advertise_url="http://a.invalid", timing=TIMING, redis_side=side)
    try:
        await a.tick()
        async with httpx.AsyncClient() as forwarder:
            auth = Authenticator.from_settings(settings)
            async with node_client(a, authenticator=auth, pricing=default_prices(), forwarder=forwarder) as to_a:
                credit = {"credit_id": "c1", "kind": "mint", "amount_micro": 10_000}
                assert 201 == (await to_a.post("/v1/accounts/alice/credits", json=credit, headers=headers)).status_code
                hold = {"account_id": "alice", "request_id": "r1", "estimated_cost_micro": 1_000}
                entry_id = (await to_a.post("/v1/reservations", json=hold, headers=headers)).json()["billing_entry_id"]
                commit = {"actual_cost_micro": 800}
                await to_a.post(f"/v1/reservations/{entry_id}/commit", json=commit, headers=headers)
                number = a.shard_of_entry(entry_id)
                engine = a.route(number).engine
                assert engine is not None
                await engine.execute(cmd.FinalizeFail(entry_id, "test", 5))
                worker = a.local_redis()[number].worker
                assert worker is not None
                await eventually(lambda: entry_id not in worker.in_flight)  # no call of its own any more
                worker.in_flight.add(entry_id)  # the worker is between its request and settlement's answer
                void = f"/v1/entries/{entry_id}/void"
                refused = await to_a.post(void, json={"reason": "refund"}, headers=headers)
                assert (409, "settlement_call_in_flight", entry_id) == (
                    refused.status_code,
                    refused.json()["error"],
                    refused.json()["billing_entry_id"],
                )
                worker.in_flight.discard(entry_id)
                voided = await to_a.post(void, json={"reason": "refund"}, headers=headers)
                assert (200, "VOIDED") == (voided.status_code, voided.json()["state"])
    finally:
        await a.leave()
        await settlement.aclose()
        await client.aclose()
