"""One shard's log in PostgreSQL: fenced batch appends, reads, and snapshots as rows.

A :class:`PgLog` is the PostgreSQL twin of the file WAL for one shard. It stores exactly the
records the engine already makes (``tollway.wal.codec.encode(event)``): one row per event,
``(shard, seq)`` its primary key, ``body`` the record's body and ``crc`` its frame's CRC-32, so
a record read back is checked end to end and decodes with the same codec.

**A batch is one statement, so one transaction**::

    WITH fence AS (
        UPDATE tollway.leases SET last_seq = <last seq of the batch>
        WHERE shard = $shard AND epoch = $epoch AND expires_at > now() AND last_seq = <first seq> - 1
        RETURNING shard)
    INSERT INTO tollway.events (shard, seq, epoch, crc, body)
    SELECT ... FROM fence, unnest(<seqs>, <crcs>, <bodies>)

The ``UPDATE`` is the fence: it matches only while the shard's lease is still this writer's
epoch and unexpired by PostgreSQL's clock, and only if the batch starts right after the
shard's last record. It takes the lease row's lock until commit, so a new owner's acquisition
(an ``UPDATE`` of the same row) waits for an in-flight batch and then sees it. When the fence
does not match, the ``INSERT`` inserts nothing and the statement commits no change; the log
then reads the lease row to say why: :class:`ShardFenced` or :class:`LogSequenceGap`. One
round trip per batch; the batch is durable when the statement returns (``synchronous_commit``
decides on how many servers).

**A commit whose outcome is unknown** (the connection lost after the statement was sent, a
timeout, a failover): the batch may or may not have committed, and a server whose client
vanished may even still be running it. ``append`` does not guess. Through the pool (which
reconnects, following a multi-host URL to the current primary) it asks again, for at most
``resolve_ms``, until it knows:

- the batch's rows are there, written under this epoch with these checksums: the batch
  committed. The question is asked in a transaction that takes a transaction id, so its own
  commit waits for the synchronous standby like any write, and with it every earlier commit
  (a commit whose wait was cut short is visible on the primary before the standby has it);
  only then does ``append`` return;
- they are not: the batch is sent again, unchanged. It is the same rows under the same fence,
  so of the two attempts at most one can match (the row lock orders them; the second sees
  ``last_seq`` moved and writes nothing), and a refusal after a retry is checked against the
  rows once more.

When time runs out, :class:`LogOutcomeUnknown` (a :class:`LogUnavailable`): the writer must
stop and the shard be recovered from the log, which then says what happened.

Invariants: a shard's rows are gapless from 1 to ``leases.last_seq``; a row is never updated
or deleted by this module; every row was written under the epoch it records.

What it does not know: what the events mean (the engine folds them), when to snapshot, or how
leases are timed (:mod:`tollway.pg.leases` holds them; the cluster package will time them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import asyncpg
import msgspec

from tollway.core.errors import (
    InvalidInput,
    LogCorrupt,
    LogOutcomeUnknown,
    LogSequenceGap,
    LogUnavailable,
    ShardFenced,
    WalUnsupported,
)
from tollway.core.events import Event
from tollway.pg.errors import PG_ERRORS, outcome_unknown
from tollway.wal import codec

log = logging.getLogger("tollway.pg")

STATEMENT_TIMEOUT_MS: Final = 10_000  # one append, read or snapshot statement
RESOLVE_MS: Final = 10_000  # how long append keeps asking whether a batch whose commit was cut short landed
RESOLVE_PAUSES_MS: Final = (20, 50, 100, 200, 400, 800)  # between those attempts (the last one repeats)
BATCH_RECORDS_MAX: Final = 4_096  # records in one append (the engine's batches are far smaller)
READ_LIMIT_MAX: Final = 10_000  # records returned by one read
SNAPSHOTS_KEPT_MAX: Final = 1_000  # prune_snapshots keeps at most this many

_APPEND: Final = """
WITH fence AS (
    UPDATE tollway.leases SET last_seq = $4
    WHERE shard = $1 AND epoch = $2 AND owner IS NOT NULL AND expires_at > now() AND last_seq = $3 - 1
    RETURNING shard
)
INSERT INTO tollway.events (shard, seq, epoch, crc, body)
SELECT fence.shard, batch.seq, $2, batch.crc, batch.body
FROM fence, unnest($5::bigint[], $6::bigint[], $7::bytea[]) AS batch(seq, crc, body)
"""

_WRITTEN: Final = """
SELECT pg_current_xact_id() AS xid, count(*) AS found
FROM tollway.events AS stored JOIN unnest($3::bigint[], $4::bigint[]) AS batch(seq, crc)
  ON stored.seq = batch.seq AND stored.crc = batch.crc
WHERE stored.shard = $1 AND stored.epoch = $2
"""
# pg_current_xact_id() gives the statement a transaction id, so its commit is a WAL record that
# waits for the synchronous standby (synchronous_commit), and with it every earlier commit.

_WRITE_SNAPSHOT: Final = """
INSERT INTO tollway.snapshots (shard, seq, epoch, body)
SELECT shard, $3, epoch, $4 FROM tollway.leases
WHERE shard = $1 AND epoch = $2 AND owner IS NOT NULL AND expires_at > now() AND last_seq >= $3
ON CONFLICT (shard, seq) DO NOTHING
RETURNING seq
"""

_PRUNE_SNAPSHOTS: Final = """
DELETE FROM tollway.snapshots
WHERE shard = $1
  AND seq < (SELECT seq FROM tollway.snapshots WHERE shard = $1 ORDER BY seq DESC OFFSET $3 - 1 LIMIT 1)
  AND EXISTS (SELECT 1 FROM tollway.leases
              WHERE shard = $1 AND epoch = $2 AND owner IS NOT NULL AND expires_at > now())
"""

_AppendArgs = tuple[int, int, int, int, list[int], list[int], list[bytes]]  # the parameters of _APPEND


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    """A shard's snapshot row: its state after ``seq``, in the file WAL's snapshot bytes."""

    seq: int
    body: bytes


class PgLog:
    """The log of shard ``shard`` in the database behind ``pool``; see the module docstring."""

    def __init__(
        self, pool: asyncpg.Pool, shard: int, *, timeout_ms: int = STATEMENT_TIMEOUT_MS, resolve_ms: int = RESOLVE_MS
    ) -> None:
        self.pool = pool
        self.shard = shard
        self.timeout_ms = timeout_ms
        self.resolve_ms = resolve_ms

    async def append(self, records: Sequence[bytes], first_seq: int, epoch: int) -> None:
        """Store framed ``records`` as ``first_seq …`` in one fenced transaction; return once durable.

        Raises :class:`ShardFenced` (the lease is not epoch ``epoch``'s, or expired) or
        :class:`LogSequenceGap` (``first_seq`` is not the shard's last sequence + 1), having
        written nothing; :class:`LogOutcomeUnknown` if PostgreSQL failed and, within
        ``resolve_ms``, never said whether the batch landed (see the module docstring).
        """
        if not 1 <= len(records) <= BATCH_RECORDS_MAX:
            raise InvalidInput(f"a batch holds 1 … {BATCH_RECORDS_MAX} records, not {len(records)}")
        crcs, bodies = _unframe(records)
        last_seq = first_seq + len(records) - 1
        seqs = list(range(first_seq, last_seq + 1))
        args = (self.shard, epoch, first_seq, last_seq, seqs, crcs, bodies)
        deadline = time.monotonic() + self.resolve_ms / 1000
        attempt = 0
        while True:
            try:
                if await self._attempt(args, retry=attempt > 0):
                    return
            except (*PG_ERRORS, LogUnavailable) as exc:
                where = f"appending records {first_seq}…{last_seq} of shard {self.shard} failed"
                if not attempt and (isinstance(exc, LogUnavailable) or not outcome_unknown(exc)):
                    raise LogUnavailable(f"{where}, nothing was written: {exc}") from exc
                if time.monotonic() >= deadline:
                    raise LogOutcomeUnknown(
                        f"{where}; after {self.resolve_ms} ms, whether it landed is unknown: {exc}"
                    ) from exc
                log.warning(
                    "shard %d: batch %d…%d unconfirmed (%s); asking again", self.shard, first_seq, last_seq, exc
                )
            await asyncio.sleep(RESOLVE_PAUSES_MS[min(attempt, len(RESOLVE_PAUSES_MS) - 1)] / 1000)
            attempt += 1

    async def _attempt(self, args: _AppendArgs, *, retry: bool) -> bool:
        """One try: True once the batch is stored; raises the fence's refusal, or what PostgreSQL raised.

        A ``retry`` follows an attempt whose outcome is unknown, so it first asks whether that one landed.
        """
        _, epoch, first_seq, _, seqs, crcs, _ = args
        if retry and await self._written(seqs, crcs, epoch):
            return True
        status = await self.pool.execute(_APPEND, *args, timeout=self.timeout_ms / 1000)
        if status == f"INSERT 0 {len(seqs)}":
            return True
        if retry and await self._written(seqs, crcs, epoch):  # the earlier attempt committed meanwhile
            return True
        raise await self._refusal(first_seq, epoch)

    async def _written(self, seqs: list[int], crcs: list[int], epoch: int) -> bool:
        """Whether the batch ``seqs`` is stored under ``epoch`` with these checksums, durably (module docstring)."""
        row = await self._fetchrow(_WRITTEN, self.shard, epoch, seqs, crcs)
        found = 0 if row is None else int(row["found"])
        if found not in (0, len(seqs)):
            raise LogCorrupt(f"shard {self.shard}: {found} of the {len(seqs)} records from {seqs[0]} are stored")
        return found == len(seqs)

    async def _refusal(self, first_seq: int, epoch: int) -> ShardFenced | LogSequenceGap:
        """Why an append's fence did not match (the statement wrote nothing)."""
        row = await self._fetchrow(
            "SELECT epoch, owner, expires_at > now() AS live, last_seq FROM tollway.leases WHERE shard = $1",
            self.shard,
        )
        if row is None:
            return ShardFenced(f"shard {self.shard} does not exist in this cluster", shard=self.shard, epoch=epoch)
        if row["epoch"] != epoch or row["owner"] is None or not row["live"]:
            held = f"epoch {row['epoch']} held by {row['owner']}" if row["live"] else f"epoch {row['epoch']}, not live"
            return ShardFenced(
                f"shard {self.shard} is fenced for epoch {epoch}: its lease is at {held}; nothing was written",
                shard=self.shard,
                epoch=epoch,
            )
        return LogSequenceGap(
            f"shard {self.shard} ends at sequence {row['last_seq']}; a batch must start at "
            f"{row['last_seq'] + 1}, not {first_seq}; nothing was written"
        )

    async def last_seq(self) -> int:
        """The shard's last durable sequence (0 when its log is empty)."""
        value = await self._fetchrow("SELECT last_seq FROM tollway.leases WHERE shard = $1", self.shard)
        if value is None:
            raise LogUnavailable(f"shard {self.shard} does not exist in this cluster")
        return int(value["last_seq"])

    async def read(self, after_seq: int, limit: int) -> list[Event]:
        """Up to ``limit`` events after ``after_seq``, in order, each checked (checksum, sequence) and decoded."""
        if not 1 <= limit <= READ_LIMIT_MAX:
            raise InvalidInput(f"a read returns 1 … {READ_LIMIT_MAX} records, not {limit}")
        rows = await self._fetch(
            "SELECT seq, crc, body FROM tollway.events WHERE shard = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            self.shard,
            after_seq,
            limit,
        )
        return [self._checked(row["seq"], row["crc"], row["body"], after_seq + 1 + n) for n, row in enumerate(rows)]

    def _checked(self, seq: int, crc: int, body: bytes, expected_seq: int) -> Event:
        """The event stored at ``seq``, or :class:`LogCorrupt` naming the shard and sequence."""
        where = f"shard {self.shard} sequence {seq}"
        if seq != expected_seq:
            raise LogCorrupt(f"{where}: expected sequence {expected_seq} (a gap in the log)")
        if int.from_bytes(codec.frame(body)[:4], "little") != crc:
            raise LogCorrupt(f"{where}: checksum mismatch")
        try:
            event = codec.decode_body(body)
        except (msgspec.DecodeError, msgspec.ValidationError, WalUnsupported) as exc:
            raise LogCorrupt(f"{where}: the body does not decode: {exc}") from exc
        if event.wal_sequence != seq:
            raise LogCorrupt(f"{where}: the body says sequence {event.wal_sequence}")
        return event

    async def write_snapshot(self, seq: int, body: bytes, *, epoch: int) -> bool:
        """Store the shard's state after ``seq`` (fenced like an append); False if that snapshot exists.

        Raises :class:`ShardFenced` if the lease is not ``epoch``'s, or ``seq`` is past the log's end.
        """
        try:
            stored = await self.pool.fetchval(
                _WRITE_SNAPSHOT, self.shard, epoch, seq, body, timeout=self.timeout_ms / 1000
            )
        except PG_ERRORS as exc:
            raise LogUnavailable(f"writing the snapshot at {seq} of shard {self.shard} failed: {exc}") from exc
        if stored is not None:
            return True
        exists = await self._fetchrow(
            "SELECT 1 AS found FROM tollway.snapshots WHERE shard = $1 AND seq = $2", self.shard, seq
        )
        if exists is not None:
            return False
        raise ShardFenced(
            f"snapshot at {seq} of shard {self.shard} refused: the lease is not epoch {epoch}'s or the log ends before",
            shard=self.shard,
            epoch=epoch,
        )

    async def load_newest(self, *, max_seq: int | None = None) -> StoredSnapshot | None:
        """The newest snapshot (at or below ``max_seq`` when given), or None."""
        row = await self._fetchrow(
            "SELECT seq, body FROM tollway.snapshots WHERE shard = $1 AND seq <= $2 ORDER BY seq DESC LIMIT 1",
            self.shard,
            max_seq if max_seq is not None else (1 << 63) - 1,
        )
        return None if row is None else StoredSnapshot(int(row["seq"]), bytes(row["body"]))

    async def prune_snapshots(self, keep: int, *, epoch: int) -> int:
        """Delete all but the newest ``keep`` snapshots (fenced like an append); how many were deleted.

        Events are never deleted: the log stays whole for audits, and recovery needs only the
        newest snapshot and the events after it.
        """
        if not 1 <= keep <= SNAPSHOTS_KEPT_MAX:
            raise InvalidInput(f"keep 1 … {SNAPSHOTS_KEPT_MAX} snapshots, not {keep}", field="keep")
        try:
            status = await self.pool.execute(_PRUNE_SNAPSHOTS, self.shard, epoch, keep, timeout=self.timeout_ms / 1000)
        except PG_ERRORS as exc:
            raise LogUnavailable(f"pruning the snapshots of shard {self.shard} failed: {exc}") from exc
        return int(status.split()[-1])

    async def _fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        try:
            return await self.pool.fetch(query, *args, timeout=self.timeout_ms / 1000)
        except PG_ERRORS as exc:
            raise LogUnavailable(f"reading shard {self.shard} failed: {exc}") from exc

    async def _fetchrow(self, query: str, *args: object) -> asyncpg.Record | None:
        try:
            return await self.pool.fetchrow(query, *args, timeout=self.timeout_ms / 1000)
        except PG_ERRORS as exc:
            raise LogUnavailable(f"reading shard {self.shard} failed: {exc}") from exc


def _unframe(records: Sequence[bytes]) -> tuple[list[int], list[bytes]]:
    """The CRC-32 and body of each framed record (the frame's length must match the record's)."""
    crcs: list[int] = []
    bodies: list[bytes] = []
    for record in records:
        if len(record) <= codec.HEADER_BYTES:
            raise InvalidInput("a record is a framed WAL record (tollway.wal.codec.encode)")
        crc, length = codec.HEADER.unpack_from(record)
        if length != len(record) - codec.HEADER_BYTES:
            raise InvalidInput(f"a record's frame says {length} bytes, it has {len(record) - codec.HEADER_BYTES}")
        crcs.append(crc)
        bodies.append(bytes(record[codec.HEADER_BYTES :]))
    return crcs, bodies
