"""The cluster's schema in PostgreSQL: init, migrations, and refusal of another format (CLUSTER.md §2)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tollway.core.errors import ClusterFormatError, InvalidInput
from tollway.pg.schema import FORMAT_VERSION, SCHEMA_VERSION, ClusterInfo, init_cluster, migrate, open_cluster


async def test_init_creates_the_cluster_and_one_free_lease_per_shard(pg_pool: asyncpg.Pool) -> None:
    """init writes the cluster row, a migration row per migration and S free leases at epoch 0."""
    async with pg_pool.acquire() as connection:
        info = await init_cluster(connection, shards=8, cluster_id="c-test")
        opened = await open_cluster(connection)
        leases = await connection.fetch("SELECT shard, epoch, owner, last_seq FROM tollway.leases ORDER BY shard")
        versions = await connection.fetch("SELECT version FROM tollway.migrations ORDER BY version")
    assert ClusterInfo("c-test", 8, FORMAT_VERSION) == info == opened
    assert [(shard, 0, None, 0) for shard in range(8)] == [tuple(row) for row in leases]
    assert list(range(1, SCHEMA_VERSION + 1)) == [row["version"] for row in versions]


async def test_a_second_init_is_refused_and_changes_nothing(pg_pool: asyncpg.Pool) -> None:
    """init on a database that already holds a cluster refuses, naming it; the shard count stays."""
    async with pg_pool.acquire() as connection:
        await init_cluster(connection, shards=4, cluster_id="first")
        with pytest.raises(InvalidInput, match="already holds tollway cluster first with 4 shards"):
            await init_cluster(connection, shards=16)
        assert ClusterInfo("first", 4, FORMAT_VERSION) == await open_cluster(connection)
        assert 4 == await connection.fetchval("SELECT count(*) FROM tollway.leases")


async def test_a_shard_count_that_is_not_a_power_of_two_is_refused(pg_pool: asyncpg.Pool) -> None:
    """init refuses 6 shards before touching the database."""
    async with pg_pool.acquire() as connection:
        with pytest.raises(InvalidInput):
            await init_cluster(connection, shards=6)
        assert await connection.fetchval("SELECT to_regclass('tollway.migrations')") is None


async def test_an_empty_database_is_not_a_cluster(pg_pool: asyncpg.Pool) -> None:
    """open refuses a database with no tollway schema, saying how to create a cluster."""
    async with pg_pool.acquire() as connection:
        with pytest.raises(ClusterFormatError, match="tollway cluster init"):
            await open_cluster(connection)


async def test_migrated_but_not_initialised_is_refused(pg_pool: asyncpg.Pool) -> None:
    """open refuses a database that has the tables but no cluster row."""
    async with pg_pool.acquire() as connection:
        await migrate(connection)
        with pytest.raises(ClusterFormatError, match="no cluster"):
            await open_cluster(connection)


async def test_a_newer_schema_is_refused(pg_pool: asyncpg.Pool) -> None:
    """A database migrated by a newer tollway is refused by open and by migrate."""
    async with pg_pool.acquire() as connection:
        await init_cluster(connection, shards=2)
        await connection.execute("INSERT INTO tollway.migrations (version, name) VALUES ($1, 'future')", 99)
        with pytest.raises(ClusterFormatError, match="version 99, written by a newer tollway"):
            await open_cluster(connection)
        with pytest.raises(ClusterFormatError, match="newer tollway"):
            await migrate(connection)


async def test_another_format_version_is_refused(pg_pool: asyncpg.Pool) -> None:
    """A cluster whose format version is not this tollway's is refused with both versions named."""
    async with pg_pool.acquire() as connection:
        await init_cluster(connection, shards=2, cluster_id="old")
        await connection.execute("UPDATE tollway.cluster SET format_version = $1", FORMAT_VERSION + 1)
        with pytest.raises(ClusterFormatError, match=f"format version {FORMAT_VERSION + 1}"):
            await open_cluster(connection)


async def test_concurrent_migrations_apply_once(pg_url: str) -> None:
    """Two nodes migrating at once both succeed and each migration is recorded once."""
    connections = [await asyncpg.connect(pg_url) for _ in range(2)]
    try:
        versions = await asyncio.gather(*(migrate(connection) for connection in connections))
        count = await connections[0].fetchval("SELECT count(*) FROM tollway.migrations")
    finally:
        for connection in connections:
            await connection.close()
    assert ([SCHEMA_VERSION, SCHEMA_VERSION], SCHEMA_VERSION) == (versions, count)
