"""Shard leases and the node registry in PostgreSQL: the statements, not the timing.

A shard's lease is its row in ``tollway.leases``: ``(epoch, owner, expires_at)``. Every rule
is one conditional ``UPDATE`` on that row, so PostgreSQL's row lock orders them and its clock
(``now()``) alone decides expiry:

- :func:`acquire` succeeds only on a lease that is released (no owner) or expired, and bumps
  the epoch: every acquisition gets a new, larger epoch, even the same node's.
- :func:`renew` extends only the caller's own live lease (same epoch, same owner, unexpired).
- :func:`release` gives up only the caller's own lease; the epoch stays, the next acquisition
  bumps it.

A writer's appends (:mod:`tollway.pg.log`) check the same row, so a node that lost its lease
writes nothing. A node must also stop serving a shard *before* PostgreSQL's expiry by its own
monotonic clock: :attr:`Lease.ttl_ms` counts from just before the request was sent
(``sent_mono_ms``, the caller's clock reading), which is never later than PostgreSQL's
``now()`` for that statement; the cluster package (not built yet) does that timing.

Nodes register with an advertised URL and heartbeat; :func:`live_nodes` is the set of nodes
whose heartbeat is younger than a window, by PostgreSQL's clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

import asyncpg

from tollway.core.errors import InvalidInput, LogUnavailable
from tollway.pg.errors import PG_ERRORS

STATEMENT_TIMEOUT_MS: Final = 5_000  # one lease or registry statement
TTL_MS_MIN: Final = 100
TTL_MS_MAX: Final = 600_000


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease this node holds: ``shard`` at ``epoch`` until ``ttl_ms`` after ``sent_mono_ms``."""

    shard: int
    epoch: int
    owner: str
    ttl_ms: int
    sent_mono_ms: int
    last_seq: int

    def deadline_mono_ms(self) -> int:
        """The node's own monotonic deadline: stop serving the shard before this."""
        return self.sent_mono_ms + self.ttl_ms


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """A lease row as stored, for status pages and tests."""

    shard: int
    epoch: int
    owner: str | None
    expires_at: datetime | None
    live: bool
    last_seq: int


@dataclass(frozen=True, slots=True)
class Node:
    """A registered node."""

    node_id: str
    advertise_url: str
    heartbeat_at: datetime


def _check_ttl(ttl_ms: int) -> None:
    if not TTL_MS_MIN <= ttl_ms <= TTL_MS_MAX:
        raise InvalidInput(f"a lease lasts {TTL_MS_MIN} … {TTL_MS_MAX} ms, not {ttl_ms}", field="ttl_ms")


async def acquire(pool: asyncpg.Pool, shard: int, owner: str, ttl_ms: int, sent_mono_ms: int) -> Lease | None:
    """Take ``shard``'s lease if it is released or expired, with a new epoch; None if someone holds it."""
    _check_ttl(ttl_ms)
    row = await _fetchrow(
        pool,
        "UPDATE tollway.leases SET epoch = epoch + 1, owner = $2, expires_at = now() + $3 * interval '1 millisecond',"
        " acquired_at = now(), renewed_at = now()"
        " WHERE shard = $1 AND (owner IS NULL OR expires_at <= now()) RETURNING epoch, last_seq",
        shard,
        owner,
        ttl_ms,
    )
    if row is None:
        return None
    return Lease(shard, int(row["epoch"]), owner, ttl_ms, sent_mono_ms, int(row["last_seq"]))


async def renew(pool: asyncpg.Pool, lease: Lease, ttl_ms: int, sent_mono_ms: int) -> Lease | None:
    """Extend ``lease`` by ``ttl_ms`` from now if it is still this owner's and live; None if it was lost."""
    _check_ttl(ttl_ms)
    row = await _fetchrow(
        pool,
        "UPDATE tollway.leases SET expires_at = now() + $4 * interval '1 millisecond', renewed_at = now()"
        " WHERE shard = $1 AND epoch = $2 AND owner = $3 AND expires_at > now() RETURNING last_seq",
        lease.shard,
        lease.epoch,
        lease.owner,
        ttl_ms,
    )
    if row is None:
        return None
    return Lease(lease.shard, lease.epoch, lease.owner, ttl_ms, sent_mono_ms, int(row["last_seq"]))


async def release(pool: asyncpg.Pool, lease: Lease) -> bool:
    """Give up ``lease`` so the next owner can start at once; False if it was no longer ours."""
    row = await _fetchrow(
        pool,
        "UPDATE tollway.leases SET owner = NULL, expires_at = NULL"
        " WHERE shard = $1 AND epoch = $2 AND owner = $3 RETURNING shard",
        lease.shard,
        lease.epoch,
        lease.owner,
    )
    return row is not None


async def lease_rows(pool: asyncpg.Pool) -> list[LeaseRow]:
    """Every shard's lease, by shard."""
    rows = await _fetch(
        pool,
        "SELECT shard, epoch, owner, expires_at, coalesce(expires_at > now(), false) AS live, last_seq"
        " FROM tollway.leases ORDER BY shard",
    )
    return [
        LeaseRow(row["shard"], row["epoch"], row["owner"], row["expires_at"], row["live"], row["last_seq"])
        for row in rows
    ]


async def heartbeat(pool: asyncpg.Pool, node_id: str, advertise_url: str) -> None:
    """Register ``node_id`` (or refresh it) with its advertised URL and a heartbeat at PostgreSQL's now()."""
    await _fetch(
        pool,
        "INSERT INTO tollway.nodes (node_id, advertise_url) VALUES ($1, $2)"
        " ON CONFLICT (node_id) DO UPDATE SET advertise_url = excluded.advertise_url, heartbeat_at = now()",
        node_id,
        advertise_url,
    )


async def deregister(pool: asyncpg.Pool, node_id: str) -> None:
    """Remove ``node_id`` from the registry (a graceful stop)."""
    await _fetch(pool, "DELETE FROM tollway.nodes WHERE node_id = $1", node_id)


async def live_nodes(pool: asyncpg.Pool, window_ms: int) -> list[Node]:
    """The nodes whose last heartbeat is younger than ``window_ms`` by PostgreSQL's clock, by id."""
    rows = await _fetch(
        pool,
        "SELECT node_id, advertise_url, heartbeat_at FROM tollway.nodes"
        " WHERE heartbeat_at > now() - $1 * interval '1 millisecond' ORDER BY node_id",
        window_ms,
    )
    return [Node(row["node_id"], row["advertise_url"], row["heartbeat_at"]) for row in rows]


async def _fetchrow(pool: asyncpg.Pool, query: str, *args: object) -> asyncpg.Record | None:
    try:
        return await pool.fetchrow(query, *args, timeout=STATEMENT_TIMEOUT_MS / 1000)
    except PG_ERRORS as exc:
        raise LogUnavailable(f"a lease statement failed: {exc}") from exc


async def _fetch(pool: asyncpg.Pool, query: str, *args: object) -> list[asyncpg.Record]:
    try:
        return await pool.fetch(query, *args, timeout=STATEMENT_TIMEOUT_MS / 1000)
    except PG_ERRORS as exc:
        raise LogUnavailable(f"a registry statement failed: {exc}") from exc
