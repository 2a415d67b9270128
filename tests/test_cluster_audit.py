"""The audit of a cluster: every shard folded from PostgreSQL, each account in its own shard, zero-sum overall."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import asyncpg

from tests.cluster_support import run_cli
from tests.test_audit import mint_and_hold, run_traffic
from tollway import Settings
from tollway.audit import audit
from tollway.cluster.audit import audit_cluster
from tollway.core import events as ev
from tollway.core.shard import shard
from tollway.pg import leases
from tollway.pg.log import PgLog
from tollway.pg.schema import init_cluster
from tollway.testing import FakeClock
from tollway.wal import codec
from tollway.wal.segments import iter_events

SHARDS = 4
T0_MS = 1_767_225_600_000


async def store(pool: asyncpg.Pool, events: list[ev.Event], *, shard_of: dict[str, int] | None = None) -> None:
    """Append ``events`` to the shard of each one's account (or ``shard_of``), renumbered per shard."""
    by_shard: dict[int, list[ev.Event]] = defaultdict(list)
    for event in events:
        account_id = event.payload.account_id  # type: ignore[attr-defined]
        by_shard[(shard_of or {}).get(account_id, shard(account_id, SHARDS))].append(event)
    for number, mine in by_shard.items():
        lease = await leases.acquire(pool, number, "node-a", 30_000, time.monotonic_ns() // 1_000_000)
        assert lease is not None
        renumbered = [
            ev.Event(n, e.timestamp_ms, e.billing_entry_id, e.correlation_id, e.payload) for n, e in enumerate(mine, 1)
        ]
        await PgLog(pool, number).append([codec.encode(e) for e in renumbered], 1, lease.epoch)


async def cluster_of(pool: asyncpg.Pool) -> asyncpg.Pool:
    async with pool.acquire() as connection:
        await init_cluster(connection, shards=SHARDS)
    return pool


async def test_a_cluster_holding_a_single_nodes_traffic_audits_like_it(pg_pool: asyncpg.Pool, tmp_path: Path) -> None:
    """The events of an engine's log, spread over the shards of their accounts, audit clean with the same ledger."""
    settings = Settings(data_dir=tmp_path / "data")
    await run_traffic(settings, FakeClock())
    events = list(iter_events(settings.wal_dir))
    pool = await cluster_of(pg_pool)
    await store(pool, events)
    report = await audit_cluster(pool)
    single = audit(settings.data_dir)
    assert ([], True) == (report.problems, single.ok)
    assert single.balances_micro == report.balances_micro()
    assert len(events) == sum(audited.records for audited in report.shards)
    assert 2 == sum(1 for audited in report.shards if audited.records)  # acct-1 and acct-2 in different shards


async def test_an_account_in_the_wrong_shard_is_a_problem(pg_pool: asyncpg.Pool) -> None:
    """An event stored in a shard that does not own its account is named."""
    pool = await cluster_of(pg_pool)
    home = shard("acct-1", SHARDS)
    wrong = (home + 1) % SHARDS
    mint = ev.Event(1, T0_MS, "01KDX00000000000000000000M", "untraced", ev.CreditMint("acct-1", "mint-1", 1_000))
    await store(pool, [mint], shard_of={"acct-1": wrong})
    report = await audit_cluster(pool)
    assert [f"shard {wrong} sequence 1: account acct-1 belongs to shard {home}"] == report.problems


async def test_an_overdrawn_account_is_a_problem(pg_pool: asyncpg.Pool) -> None:
    """A hold larger than the account's funds, stored as sound records, fails the shard's audit."""
    pool = await cluster_of(pg_pool)
    records = mint_and_hold("acct-1", 1_000, 5_000)
    events = [ev.Event(n, T0_MS + n, entry_id, "untraced", payload) for n, (entry_id, payload) in enumerate(records, 1)]
    await store(pool, events)
    report = await audit_cluster(pool)
    home = shard("acct-1", SHARDS)
    assert [
        f"shard {home}: the state fold refused the event at sequence 2 (billing_reserve): reserve overdraws acct-1",
        f"shard {home}: seq 2: user:acct-1:available went negative",
    ] == report.problems
    assert not report.ok


async def test_tollway_audit_with_a_postgres_url_audits_the_cluster_like_cluster_audit(
    pg_pool: asyncpg.Pool, pg_url: str, tmp_path: Path
) -> None:
    """`tollway audit --postgres-url` says what `tollway cluster audit` says: clean, then exit 1 naming the problem."""
    settings = Settings(data_dir=tmp_path / "data")
    await run_traffic(settings, FakeClock())
    pool = await cluster_of(pg_pool)
    await store(pool, list(iter_events(settings.wal_dir)))
    clean = [run_cli(*args, "--postgres-url", pg_url, "--json") for args in (("audit",), ("cluster", "audit"))]
    bad = ev.Event(1, T0_MS, "01KDX00000000000000000000M", "untraced", ev.CreditMint("acct-9", "mint-9", 1))
    used = {shard(account, SHARDS) for account in ("acct-1", "acct-2", "acct-9")}
    wrong = next(n for n in range(SHARDS) if n not in used)  # a shard with no events yet: its log starts at 1
    await store(pool, [bad], shard_of={"acct-9": wrong})
    found = [run_cli(*args, "--postgres-url", pg_url) for args in (("audit",), ("cluster", "audit"))]
    assert [0, 0] == [answer.returncode for answer in clean], clean
    assert clean[0].stdout == clean[1].stdout
    assert True is json.loads(clean[0].stdout)["ok"]
    assert [1, 1] == [answer.returncode for answer in found]
    assert found[0].stdout == found[1].stdout
    assert f"account acct-9 belongs to shard {shard('acct-9', SHARDS)}" in found[0].stdout


def test_tollway_audit_refuses_sections_a_cluster_audit_does_not_have(pg_url: str) -> None:
    """`--redis-url` with `--postgres-url` is a clear refusal (exit 2), not a silent half-audit."""
    answer = run_cli("audit", "--postgres-url", pg_url, "--redis-url", "redis://127.0.0.1:1")
    assert (2, "") == (answer.returncode, answer.stdout)
    assert "--redis-url cannot be combined with --postgres-url" in answer.stderr
