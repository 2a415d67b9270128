"""The one exception tree of tollway, and ``ensure``.

Exceptions mean "this could not be done at all". Business outcomes that a caller is expected
to handle (insufficient funds, an expired hold, a reused idempotency key) are *values*
(:class:`tollway.core.commands.Refusal`), never exceptions.

::

    TollwayError
    ├── InvalidInput            bad input; nothing was changed
    │   ├── InvalidAmount       a MicroUSD string or int that breaks the strict rules
    │   └── RecordTooLarge      a command whose record would exceed the log's record limit
    ├── InvariantViolation      the engine's state broke a rule; the engine stops
    ├── ConfigError             unknown or invalid setting; a startup error
    ├── WalError                the write-ahead log
    │   ├── WalLocked           another writer holds the WAL directory
    │   ├── WalRecordProblem    a record that cannot be used, at a segment and byte offset
    │   │   ├── WalCorrupt      a bad record followed by valid ones (fail closed)
    │   │   └── WalUnsupported  a record from a newer schema than this reader knows
    │   └── WalIOFailure        an fsync or write failed; the engine has stopped (fail-stop)
    ├── EngineStopped           the engine is closed or failed; no command is accepted
    └── ClusterError            cluster mode: the log in PostgreSQL, leases, the cluster's identity
        ├── ShardFenced         the shard's lease is no longer this writer's; the batch wrote nothing
        ├── ClusterFormatError  the database holds no tollway cluster, or one of another format
        ├── LogSequenceGap      a batch that does not start right after the shard's last record
        ├── LogCorrupt          a stored record that fails its checksum or its sequence
        └── LogUnavailable      PostgreSQL could not be reached or refused a statement
            └── LogOutcomeUnknown  a batch's commit was cut short and never confirmed either way

Adapters translate foreign exceptions into this tree with ``raise ... from exc``, and define
the rest of it themselves (each a ``TollwayError``; ``docs/architecture.md`` draws the whole
tree): ``TokenError`` (``TokenInvalid``, ``KeyMaterialError``) in ``tokens``,
``SettlementUnavailable`` in ``settlement.client``, ``RedisUnavailable`` in ``redis.server``,
``RedisDown`` and ``RedisRefused`` in ``redis.errors`` (the Redis boundary), ``ProjectionViolation``,
``ProjectionForeign`` and ``ProjectionStale`` in ``redis.projector``,
``PumpGone`` in ``redis.pump``, ``PostgresUnavailable`` in ``pg.process``, ``CheckUnavailable`` in
``guard``, ``ApiError`` in ``api.errors`` and ``RebuildFailed`` in ``cli.local``.
"""

from __future__ import annotations


class TollwayError(Exception):
    """Root of every exception tollway raises on purpose."""


class InvalidInput(TollwayError, ValueError):
    """Input that breaks a documented rule; nothing was changed."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidAmount(InvalidInput):
    """A MicroUSD amount that is malformed, negative or out of bounds."""


class RecordTooLarge(InvalidInput):
    """A command whose log record would be larger than a reader accepts; nothing was written."""


class InvariantViolation(TollwayError):
    """A rule that must always hold did not; continuing would risk money."""


class ConfigError(TollwayError):
    """An unknown or invalid configuration setting."""


class WalError(TollwayError):
    """A problem with the write-ahead log."""


class WalLocked(WalError):
    """Another process holds the single-writer lock on the WAL directory."""


class WalRecordProblem(WalError):
    """A record that cannot be used; names where it is so an operator can find it."""

    def __init__(self, message: str, *, segment: str = "?", offset: int = -1) -> None:
        where = f" (segment {segment}, byte offset {offset})" if offset >= 0 else ""
        super().__init__(f"{message}{where}")
        self.reason = message
        self.segment = segment
        self.offset = offset


class WalCorrupt(WalRecordProblem):
    """A record that fails its checksum or framing and is not the torn tail."""


class WalUnsupported(WalRecordProblem):
    """A record whose ``schema_version`` is newer than this reader understands."""


class WalIOFailure(WalError):
    """Writing or syncing the WAL failed; the engine stopped to avoid acknowledging a lie."""


class EngineStopped(TollwayError):
    """The engine is closed, or stopped after a fatal error; restart to recover from disk."""


def ensure(condition: bool, message: str, *args: object) -> None:
    """Raise :class:`InvariantViolation` unless ``condition`` holds.

    Unlike ``assert`` this survives ``python -O``: a broken invariant must stop the engine
    rather than let it continue wrong. ``message % args`` is only formatted on failure, so a
    check on the hot path costs a call and a comparison.
    """
    if not condition:
        raise InvariantViolation(message % args if args else message)


class ClusterError(TollwayError):
    """A problem of cluster mode: the log in PostgreSQL, a shard's lease, the cluster's identity."""


class ShardFenced(ClusterError):
    """The shard's lease epoch is no longer the writer's (or its lease expired): nothing was written.

    The writer must stop serving the shard at once; its callers retry on the new owner.
    """

    def __init__(self, message: str, *, shard: int, epoch: int) -> None:
        super().__init__(message)
        self.shard = shard
        self.epoch = epoch


class ClusterFormatError(ClusterError):
    """The database is not a tollway cluster, or one of another schema or format version."""


class LogSequenceGap(ClusterError):
    """A batch whose first sequence is not the one after the shard's last record; nothing was written."""


class LogCorrupt(ClusterError):
    """A record read back from the log fails its checksum, its decoding or its sequence."""


class LogUnavailable(ClusterError):
    """PostgreSQL could not be reached, timed out or refused a statement.

    If it happened while a batch was committing, the log asks again (:class:`LogOutcomeUnknown`
    if it never learns whether the batch landed).
    """


class LogOutcomeUnknown(LogUnavailable):
    """A batch's commit was cut short and PostgreSQL never said, in time, whether it landed.

    Its callers are not answered as if it had: the writer stops (a retryable error for them), and
    the shard is recovered from the log, which then says; a retry with the same request id takes
    effect once.
    """
