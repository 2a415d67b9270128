"""The cluster's tables in PostgreSQL, their migrations, and the cluster's identity.

Everything lives in the schema ``tollway`` of the database the URL names:

- ``migrations(version, name, applied_at)``: one row per schema migration applied, in order.
  A database with a migration this tollway does not know was written by a newer tollway and
  is refused.
- ``cluster``: exactly one row: ``cluster_id``, ``shards`` (S, a power of two, fixed for
  the cluster's life) and ``format_version`` (:data:`FORMAT_VERSION`: how events and
  snapshots are stored). A database of another format is refused with a clear message.
- ``leases(shard, epoch, owner, expires_at, last_seq, ...)``: one row per shard, created at
  init. ``epoch`` increases on every acquisition; ``expires_at`` is computed by PostgreSQL's
  clock; ``last_seq`` is the shard's last durable sequence (0: empty), advanced by the same
  statement that appends a batch, so the fence check and the gap check are one row lock.
- ``events(shard, seq, epoch, crc, body)``: one row per event, primary key ``(shard, seq)``;
  ``body`` is exactly the file WAL's record body (see ``docs/wal-format.md``), ``crc`` the
  CRC-32 of its frame, ``epoch`` the lease epoch of the writer.
- ``snapshots(shard, seq, body)``: a shard's state after ``seq``, as the file WAL's snapshot
  bytes.
- ``nodes(node_id, advertise_url, started_at, heartbeat_at)``: the node registry.

:func:`init_cluster` (``tollway cluster init``) migrates and creates the cluster and its lease
rows; :func:`open_cluster` (a node starting) only checks and reads, never migrates.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Final, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from tollway.core.errors import ClusterFormatError, InvalidInput, LogUnavailable
from tollway.core.shard import DEFAULT_SHARDS, check_shards
from tollway.pg.errors import PG_ERRORS

SCHEMA: Final = "tollway"
"""The PostgreSQL schema of every table (written literally in the SQL of this package)."""
FORMAT_VERSION: Final = 1
"""How events and snapshots are stored (the bodies themselves carry the WAL's schema_version)."""
MIGRATION_LOCK_KEY: Final = 0x746F6C6C77617901  # pg_advisory_xact_lock key: "tollway" + 1
STATEMENT_TIMEOUT_MS: Final = 30_000  # migrations and cluster setup

MIGRATIONS: Final[tuple[tuple[str, str], ...]] = (
    (
        "cluster, leases, events, snapshots, nodes",
        """
        CREATE TABLE tollway.cluster (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            cluster_id text NOT NULL,
            shards integer NOT NULL CHECK (shards BETWEEN 1 AND 1024 AND shards & (shards - 1) = 0),
            format_version integer NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE tollway.leases (
            shard integer PRIMARY KEY,
            epoch bigint NOT NULL DEFAULT 0 CHECK (epoch >= 0),
            owner text,
            expires_at timestamptz,
            last_seq bigint NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
            acquired_at timestamptz,
            renewed_at timestamptz,
            CHECK ((owner IS NULL) = (expires_at IS NULL))
        );
        CREATE TABLE tollway.events (
            shard integer NOT NULL,
            seq bigint NOT NULL CHECK (seq > 0),
            epoch bigint NOT NULL,
            crc bigint NOT NULL,
            body bytea NOT NULL,
            PRIMARY KEY (shard, seq)
        );
        CREATE TABLE tollway.snapshots (
            shard integer NOT NULL,
            seq bigint NOT NULL CHECK (seq >= 0),
            epoch bigint NOT NULL,
            body bytea NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (shard, seq)
        );
        CREATE TABLE tollway.nodes (
            node_id text PRIMARY KEY,
            advertise_url text NOT NULL,
            started_at timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
)
"""Schema migrations in order; migration ``n`` (1-based) is ``MIGRATIONS[n - 1]``. Append only."""

SCHEMA_VERSION: Final = len(MIGRATIONS)

Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy
"""A connection of its own or one borrowed from a pool (``async with pool.acquire() as connection``)."""


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """The identity of a cluster, as stored in its ``cluster`` row."""

    cluster_id: str
    shards: int
    format_version: int


async def migrate(connection: Connection) -> int:
    """Apply the migrations this database lacks (under an advisory lock); the schema version after.

    Refuses (:class:`ClusterFormatError`) a database with migrations this tollway does not know.
    """
    try:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            await connection.execute(
                "CREATE SCHEMA IF NOT EXISTS tollway;"
                "CREATE TABLE IF NOT EXISTS tollway.migrations ("
                "version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = await _applied_version(connection)
            for version in range(applied + 1, SCHEMA_VERSION + 1):
                name, sql = MIGRATIONS[version - 1]
                await connection.execute(sql)
                await connection.execute(
                    "INSERT INTO tollway.migrations (version, name) VALUES ($1, $2)", version, name
                )
    except PG_ERRORS as exc:
        raise LogUnavailable(f"could not migrate the cluster schema: {exc}") from exc
    return SCHEMA_VERSION


async def init_cluster(
    connection: Connection, *, shards: int = DEFAULT_SHARDS, cluster_id: str | None = None
) -> ClusterInfo:
    """Create the cluster: migrate, write its row and one free lease per shard. Refuses an existing one."""
    check_shards(shards)
    await migrate(connection)
    info = ClusterInfo(cluster_id or uuid.uuid4().hex, shards, FORMAT_VERSION)
    try:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            existing = await connection.fetchrow("SELECT cluster_id, shards FROM tollway.cluster")
            if existing is not None:
                raise InvalidInput(
                    f"this database already holds tollway cluster {existing['cluster_id']} "
                    f"with {existing['shards']} shards; a cluster's shard count never changes",
                    field="postgres_url",
                )
            await connection.execute(
                "INSERT INTO tollway.cluster (cluster_id, shards, format_version) VALUES ($1, $2, $3)",
                info.cluster_id,
                info.shards,
                info.format_version,
            )
            await connection.execute(
                "INSERT INTO tollway.leases (shard) SELECT generate_series(0, $1 - 1)", info.shards
            )
    except PG_ERRORS as exc:
        raise LogUnavailable(f"could not create the cluster: {exc}") from exc
    return info


async def open_cluster(connection: Connection) -> ClusterInfo:
    """The cluster this database holds, after checking its schema and format; never changes anything."""
    try:
        has_schema = await connection.fetchval(
            "SELECT to_regclass($1) IS NOT NULL", "tollway.migrations", timeout=STATEMENT_TIMEOUT_MS / 1000
        )
        if not has_schema:
            raise ClusterFormatError(
                "this database holds no tollway cluster (no tollway.migrations table); "
                "create one with `tollway cluster init --postgres-url URL`"
            )
        applied = await _applied_version(connection)
        row = await connection.fetchrow("SELECT cluster_id, shards, format_version FROM tollway.cluster")
    except PG_ERRORS as exc:
        raise LogUnavailable(f"could not read the cluster's identity: {exc}") from exc
    if applied != SCHEMA_VERSION:
        newer = "a newer" if applied > SCHEMA_VERSION else "an older"
        raise ClusterFormatError(
            f"this database's tollway schema is at version {applied}, written by {newer} tollway; "
            f"this tollway reads version {SCHEMA_VERSION} only"
        )
    if row is None:
        raise ClusterFormatError(
            "this database has tollway's tables but no cluster; run `tollway cluster init --postgres-url URL`"
        )
    if row["format_version"] != FORMAT_VERSION:
        raise ClusterFormatError(
            f"cluster {row['cluster_id']} stores format version {row['format_version']}; "
            f"this tollway reads format version {FORMAT_VERSION} only"
        )
    return ClusterInfo(row["cluster_id"], row["shards"], row["format_version"])


async def _applied_version(connection: Connection) -> int:
    version = await connection.fetchval("SELECT coalesce(max(version), 0) FROM tollway.migrations")
    if version > SCHEMA_VERSION:
        raise ClusterFormatError(
            f"this database's tollway schema is at version {version}, written by a newer tollway; "
            f"this tollway knows versions up to {SCHEMA_VERSION}; upgrade tollway"
        )
    return int(version)
