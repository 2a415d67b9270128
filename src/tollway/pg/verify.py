"""Check a cluster's log in PostgreSQL without changing it: ``tollway wal verify`` for cluster mode.

Every shard's rows are read in pages and checked as :meth:`PgLog.read` checks them (CRC-32 of
each body, gapless sequences from 1, the sequence inside each body); the number of rows must
equal the shard's ``last_seq`` in its lease row, so a row missing at the end or one written
past it is found too. Safe beside running nodes: reads only, one page per statement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import asyncpg

from tollway.core.errors import LogCorrupt, LogUnavailable
from tollway.pg import leases
from tollway.pg.errors import PG_ERRORS
from tollway.pg.log import READ_LIMIT_MAX, PgLog

PAGE_RECORDS: Final = 1_000


@dataclass(frozen=True, slots=True)
class ShardReport:
    """What verifying one shard found: ``problem`` is None when its log is sound."""

    shard: int
    records: int
    last_seq: int
    snapshots: int
    problem: str | None


async def verify_shard(pool: asyncpg.Pool, shard: int, last_seq: int, *, page: int = PAGE_RECORDS) -> ShardReport:
    """Read and check every record of ``shard``, whose lease row says it ends at ``last_seq``."""
    log = PgLog(pool, shard)
    records, problem = await _sound_prefix(log, min(page, READ_LIMIT_MAX))
    if problem is None and records != last_seq:
        problem = f"shard {shard} holds {records} record(s) but its lease row says the log ends at {last_seq}"
    try:
        snapshots = await pool.fetchval("SELECT count(*) FROM tollway.snapshots WHERE shard = $1", shard)
    except PG_ERRORS as exc:
        raise LogUnavailable(f"counting the snapshots of shard {shard} failed: {exc}") from exc
    return ShardReport(shard, records, last_seq, int(snapshots), problem)


async def _sound_prefix(log: PgLog, page: int) -> tuple[int, str | None]:
    """How many records from sequence 1 are sound, and the first problem after them (None: none)."""
    records = 0
    try:
        while batch := await log.read(records, page):
            records += len(batch)
    except LogCorrupt:
        pass  # somewhere in this page: find the exact record below
    else:
        return records, None
    while True:  # one record at a time from the failing page's start
        try:
            batch = await log.read(records, 1)
        except LogCorrupt as exc:
            return records, str(exc)
        if not batch:  # the page failed, so this cannot happen; never loop forever
            return records, None
        records += 1


async def verify_cluster(pool: asyncpg.Pool, *, page: int = PAGE_RECORDS) -> list[ShardReport]:
    """:func:`verify_shard` for every shard of the cluster, in shard order."""
    return [await verify_shard(pool, row.shard, row.last_seq, page=page) for row in await leases.lease_rows(pool)]
