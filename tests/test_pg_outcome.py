"""A batch whose commit is cut short: PgLog.append answers only once it knows the rows are stored, once.

A proxy between the pool and PostgreSQL cuts the connection at the worst moments: after the
server committed the batch but before its reply reached the client, or before the statement
reached the server. Either way ``append`` must return only once the rows are there, exactly
once, and the log must go on at the next sequence.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.cutting_proxy import APPEND_REPLY, CuttingProxy
from tests.in_process_node import node_client
from tests.test_pg_log import make_events, records, take
from tollway import Settings
from tollway.api.auth import Authenticator, Scope, development_key, issue_token
from tollway.cluster.node import Node
from tollway.core.errors import LogOutcomeUnknown, LogUnavailable
from tollway.core.lease import LeaseTiming
from tollway.pg import leases
from tollway.pg.errors import outcome_unknown
from tollway.pg.log import PgLog
from tollway.pg.schema import init_cluster, open_cluster
from tollway.pricing import default_prices


@pytest.fixture
async def proxy(pg_url: str) -> AsyncIterator[CuttingProxy]:
    """A cutting proxy in front of this test's database."""
    target_port = int(pg_url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    cutter = CuttingProxy(target_port)
    await cutter.start()
    try:
        yield cutter
    finally:
        await cutter.close()


@pytest.fixture
async def proxied(pg_url: str, proxy: CuttingProxy) -> AsyncIterator[asyncpg.Pool]:
    """A pool that reaches a two-shard cluster through the proxy."""
    pool = await asyncpg.create_pool(proxy.url(pg_url), min_size=1, max_size=2)
    try:
        async with pool.acquire() as connection:
            await init_cluster(connection, shards=2)
        yield pool
    finally:
        pool.terminate()


async def stored_seqs(pool: asyncpg.Pool) -> list[int]:
    return [row["seq"] for row in await pool.fetch("SELECT seq FROM tollway.events WHERE shard = 1 ORDER BY seq")]


async def test_a_reply_lost_after_the_commit_is_confirmed_and_the_log_goes_on(
    proxied: asyncpg.Pool, proxy: CuttingProxy
) -> None:
    """The connection cut after the server committed a batch: append returns, the rows are stored once."""
    lease = await take(proxied, 1)
    log = PgLog(proxied, 1)
    proxy.cut_replies(APPEND_REPLY)
    await log.append(records(make_events(1, 3)), 1, lease.epoch)
    proxy.cut_replies(None)
    await log.append(records(make_events(4, 2)), 4, lease.epoch)
    assert (1, [1, 2, 3, 4, 5], make_events(1, 5)) == (proxy.cuts, await stored_seqs(proxied), await log.read(0, 10))


async def test_a_request_lost_before_the_server_is_sent_again_once(proxied: asyncpg.Pool, proxy: CuttingProxy) -> None:
    """The connection cut before the batch reached the server, twice: append sends it again, stored once."""
    lease = await take(proxied, 1)
    log = PgLog(proxied, 1)
    await log.append(records(make_events(1, 1)), 1, lease.epoch)
    proxy.cut_requests(2)
    await log.append(records(make_events(2, 4)), 2, lease.epoch)
    assert (2, [1, 2, 3, 4, 5], 5) == (proxy.cuts, await stored_seqs(proxied), await log.last_seq())


async def test_every_append_reply_cut_in_turn_leaves_a_gapless_log(proxied: asyncpg.Pool, proxy: CuttingProxy) -> None:
    """Every second append's reply lost: thirty batches, each stored exactly once, in order."""
    lease = await take(proxied, 1)
    log = PgLog(proxied, 1)
    proxy.cut_replies(APPEND_REPLY, every=2)
    for first in range(1, 61, 2):
        await log.append(records(make_events(first, 2)), first, lease.epoch)
    assert (15, list(range(1, 61))) == (proxy.cuts, await stored_seqs(proxied))


async def test_a_server_gone_for_longer_than_the_resolve_time_is_an_unknown_outcome(
    proxied: asyncpg.Pool, proxy: CuttingProxy
) -> None:
    """Reply lost and the server unreachable afterwards: LogOutcomeUnknown after resolve_ms, not a guess."""
    lease = await take(proxied, 1)
    log = PgLog(proxied, 1, resolve_ms=300)
    proxy.cut_replies(APPEND_REPLY)
    proxy.refuse()
    started = time.monotonic()
    with pytest.raises(LogOutcomeUnknown, match="whether it landed is unknown"):
        await log.append(records(make_events(1, 2)), 1, lease.epoch)
    waited_s = time.monotonic() - started
    proxy.accept()
    proxy.cut_replies(None)
    assert 0.3 <= waited_s < 5.0, waited_s
    assert [] == await stored_seqs(proxied)  # refused before it was sent: nothing landed, and the log says so


async def test_a_statement_postgresql_refuses_fails_at_once() -> None:
    """An error PostgreSQL answers about the statement rolled it back: not an unknown outcome."""
    refused = asyncpg.UniqueViolationError("duplicate key")
    cut = asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
    shutdown = asyncpg.AdminShutdownError("terminating connection due to administrator command")
    assert (False, True, True, True) == (
        outcome_unknown(refused),
        outcome_unknown(cut),
        outcome_unknown(shutdown),
        outcome_unknown(TimeoutError()),
    )
    assert issubclass(LogOutcomeUnknown, LogUnavailable)


async def test_a_shard_whose_batch_outcome_stayed_unknown_is_released_and_recovered_at_once(
    pg_pool: asyncpg.Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LogOutcomeUnknown: 503 shard_moved, the lease released, the next tick recovers the shard (epoch + 1)."""
    async with pg_pool.acquire() as connection:
        await init_cluster(connection, shards=2)
        info = await open_cluster(connection)
    settings = Settings(data_dir=tmp_path)
    key, _ = development_key(settings)
    headers = {"authorization": f"Bearer {issue_token(key, settings, [Scope.ADMIN.value], subject='t', ttl_s=600)}"}
    timing = LeaseTiming(ttl_ms=60_000, renew_every_ms=12_000, margin_ms=6_000)  # expiry plays no part here
    node = Node(pg_pool, info, settings, node_id="a", advertise_url="http://a.invalid", timing=timing)
    await node.tick()
    number = node.shard_of_account("alice")
    epoch = node.membership.serving(number)
    real_append = PgLog.append

    async def unknown(self: PgLog, records: list[bytes], first_seq: int, epoch: int) -> None:
        raise LogOutcomeUnknown("the connection was lost and never came back")

    async with httpx.AsyncClient() as forwarder:
        auth = Authenticator.from_settings(settings)
        async with node_client(node, authenticator=auth, pricing=default_prices(), forwarder=forwarder) as to_node:
            credit = {"credit_id": "c1", "kind": "mint", "amount_micro": 100}
            monkeypatch.setattr(PgLog, "append", unknown)
            failed = await to_node.post("/v1/accounts/alice/credits", json=credit, headers=headers)
            monkeypatch.setattr(PgLog, "append", real_append)
            for _ in range(50):  # the release runs in the background
                if (await leases.lease_rows(pg_pool))[number].owner is None:
                    break
                await asyncio.sleep(0.02)
            await node.tick()
            retried = await to_node.post("/v1/accounts/alice/credits", json=credit, headers=headers)
            balance = (await to_node.get("/v1/accounts/alice", headers=headers)).json()
        await node.leave()
    assert (503, "shard_moved") == (failed.status_code, failed.json()["error"])
    assert epoch is not None
    assert (201, "100") == (retried.status_code, balance["available_micro"])
    assert f"a {number} {epoch + 1}" == retried.headers["x-tollway-answered-by"]
