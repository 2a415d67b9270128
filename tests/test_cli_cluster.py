"""``tollway cluster init|status|verify`` against the embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import pytest
from typer.testing import CliRunner

from tests.test_pg_log import make_events, records
from tollway.cli import app
from tollway.pg import leases
from tollway.pg.log import PgLog


@pytest.fixture
def runner() -> CliRunner:
    """Runs the typer app in-process."""
    return CliRunner()


async def write_some(url: str) -> None:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        lease = await leases.acquire(pool, 2, "node-a", 30_000, time.monotonic_ns() // 1_000_000)
        assert lease is not None
        await leases.heartbeat(pool, "node-a", "http://127.0.0.1:9001")
        await PgLog(pool, 2).append(records(make_events(1, 3)), 1, lease.epoch)
    finally:
        await pool.close()


def test_init_status_verify(runner: CliRunner, pg_url: str) -> None:
    """init creates the cluster once; status shows leases and nodes; verify finds the log sound, then a corrupt row."""
    created = runner.invoke(app, ["cluster", "init", "--postgres-url", pg_url, "--shards", "4"])
    assert 0 == created.exit_code, created.output
    assert "4 shard(s), format version 1" in created.output
    again = runner.invoke(app, ["cluster", "init", "--postgres-url", pg_url, "--shards", "8"])
    assert 2 == again.exit_code
    assert "already holds tollway cluster" in again.output

    asyncio.run(write_some(pg_url))
    status = runner.invoke(app, ["cluster", "status", "--postgres-url", pg_url, "--json"])
    assert 0 == status.exit_code, status.output
    shown = json.loads(status.output)
    assert (4, [{"node_id": "node-a", "advertise_url": "http://127.0.0.1:9001"}]) == (shown["shards"], shown["nodes"])
    assert {"shard": 2, "epoch": 1, "owner": "node-a", "live": True, "last_seq": 3} == shown["leases"][2]
    table = runner.invoke(app, ["cluster", "status", "--postgres-url", pg_url])
    assert 0 == table.exit_code
    assert "node-a  http://127.0.0.1:9001" in table.output

    sound = runner.invoke(app, ["cluster", "verify", "--postgres-url", pg_url])
    assert (0, "log sound: 4 shard(s), 3 record(s)\n") == (sound.exit_code, sound.output)
    audited = runner.invoke(app, ["cluster", "audit", "--postgres-url", pg_url, "--json"])
    assert 0 == audited.exit_code, audited.output  # three mints of acct-1, whose shard of 4 is 2
    report = json.loads(audited.output)
    assert (True, 3, 0, 6) == (
        report["ok"],
        report["records"],
        report["total_micro"],
        report["balances_micro"]["user:acct-1:available"],
    )
    asyncio.run(corrupt(pg_url))
    broken = runner.invoke(app, ["cluster", "verify", "--postgres-url", pg_url])
    assert 1 == broken.exit_code
    assert "LOG CORRUPT: shard 2 sequence 2: checksum mismatch (1 sound record(s) before it)" in broken.output
    failed = runner.invoke(app, ["cluster", "audit", "--postgres-url", pg_url])
    assert 1 == failed.exit_code
    assert "PROBLEM: shard 2 sequence 2: checksum mismatch (later events were not read)" in failed.output


async def corrupt(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("UPDATE tollway.events SET body = set_byte(body, 2, 32) WHERE shard = 2 AND seq = 2")
    finally:
        await connection.close()


def test_a_database_without_a_cluster_is_a_clean_error(runner: CliRunner, pg_url: str) -> None:
    """status on an empty database exits 2 with one line saying how to create a cluster."""
    result = runner.invoke(app, ["cluster", "status", "--postgres-url", pg_url])
    assert 2 == result.exit_code
    assert "tollway cluster init" in result.output


def test_an_unreachable_database_is_a_clean_error(runner: CliRunner) -> None:
    """A URL nobody answers on exits 2 with one line, no traceback."""
    result = runner.invoke(app, ["cluster", "status", "--postgres-url", "postgresql://x@127.0.0.1:1/none"])
    assert 2 == result.exit_code
    assert "could not connect to PostgreSQL" in result.output
