"""A primary with a synchronous standby (CLUSTER.md §6): kill the primary, promote the standby, lose nothing."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.test_pg_log import make_events, records
from tollway.pg import leases
from tollway.pg.log import PgLog
from tollway.pg.replicated import Replicated, make_synchronous
from tollway.pg.schema import init_cluster
from tollway.pg.server import EmbeddedPostgres


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory the server's unprivileged user can reach, for two servers."""
    directory = Path(tempfile.mkdtemp(prefix="tollway-pg-replica-"))
    directory.chmod(0o711)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_promoted_standby_holds_every_acknowledged_batch(scratch: Path) -> None:
    """Batches acknowledged with a synchronous standby survive a SIGKILL of the primary; the URL finds the new one."""
    primary = await EmbeddedPostgres.start(scratch / "primary")
    standby: EmbeddedPostgres | None = None
    try:
        standby = await EmbeddedPostgres.start(scratch / "standby", primary=primary)
        await make_synchronous(primary.url)
        url = Replicated(primary, standby).url
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        async with pool.acquire() as connection:
            await init_cluster(connection, shards=2)
        lease = await leases.acquire(pool, 1, "node-a", 60_000, time.monotonic_ns() // 1_000_000)
        assert lease is not None
        for first in range(1, 200, 10):
            await PgLog(pool, 1).append(records(make_events(first, 10)), first, lease.epoch)
        pool.terminate()
        primary.kill()
        await standby.promote()
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        try:
            log = PgLog(pool, 1)
            stored = await log.read(0, 1_000)
            await log.append(records(make_events(201, 5)), 201, lease.epoch)  # the lease row came along
            last_seq = await log.last_seq()
            port = await pool.fetchval("SELECT current_setting('port')::int")
        finally:
            await pool.close()
    finally:
        if standby is not None:
            await standby.stop()
        await primary.stop()
    assert (make_events(1, 200), 205, standby.port) == (stored, last_seq, port)
