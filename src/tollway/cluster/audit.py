"""The audit of a cluster: every shard folded from PostgreSQL, the ledger zero-sum over the cluster.

For each shard, its events are read back in pages (each checked like
:meth:`~tollway.pg.log.PgLog.read` checks them) and folded twice, independently, as
:mod:`tollway.audit` does for a data directory: into the double-entry
:class:`~tollway.core.ledger.Ledger` (posting rules only) and into a
:class:`~tollway.core.state.State` (the engine's own ``apply``); then
:func:`~tollway.core.ledger.check_invariants` compares them. A cluster adds two rules:

- every event of a shard concerns an account of that shard (``shard(account_id, S)``), since
  everything about an account lives in one shard;
- the shard's rows are exactly ``1 … last_seq`` of its lease row.

The cluster's ledger is the union of the shards' ledgers (their accounts are disjoint), and it
must sum to zero. One shard is folded at a time, so memory holds one shard's state.

Read-only and safe beside running nodes (each shard is audited as of when it was read). Not
yet: the comparison of snapshots, the Redis projection and settlement (``tollway audit``'s
other sections), which need the engine's snapshot decoding and the services of a node.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Final

import asyncpg

from tollway.core.errors import InvariantViolation, LogCorrupt
from tollway.core.events import Event
from tollway.core.ledger import Ledger, check_invariants
from tollway.core.shard import shard
from tollway.core.state import State
from tollway.pg import leases
from tollway.pg.log import PgLog
from tollway.pg.schema import ClusterInfo, open_cluster

PAGE_RECORDS: Final = 1_000
PROBLEMS_KEPT_MAX: Final = 100  # per shard: a broken log can break a rule at every later event


@dataclass(frozen=True, slots=True)
class ShardAudit:
    """What auditing one shard found."""

    shard: int
    records: int
    balances_micro: dict[str, int]  # ledger account → balance folded from the shard's events (zeros omitted)
    problems: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClusterAudit:
    """What auditing every shard found; ``ok`` is the verdict."""

    cluster: ClusterInfo
    shards: tuple[ShardAudit, ...]

    @property
    def problems(self) -> list[str]:
        """Every problem of every shard, then the cluster's own."""
        found = [problem for audited in self.shards for problem in audited.problems]
        total = self.total_micro()
        if total != 0:
            found.append(f"the cluster's ledger sums to {total}, not zero")
        return found

    @property
    def ok(self) -> bool:
        """No shard and no cluster-wide rule has a problem."""
        return not self.problems

    def balances_micro(self) -> dict[str, int]:
        """The cluster's ledger: every shard's balances together (their accounts are disjoint)."""
        merged: dict[str, int] = defaultdict(int)
        for audited in self.shards:
            for name, value in audited.balances_micro.items():
                merged[name] += value
        return {name: value for name, value in sorted(merged.items()) if value != 0}

    def total_micro(self) -> int:
        """The sum of the cluster's ledger: zero when sound."""
        return sum(sum(audited.balances_micro.values()) for audited in self.shards)


class _ShardFold:
    """The ledger and state folds of one shard, and the cluster's rules, fed one event at a time."""

    def __init__(self, shard_number: int, shards: int) -> None:
        self.shard_number = shard_number
        self.shards = shards
        self.ledger = Ledger()
        self.state = State()
        self.problems: list[str] = []
        self.apply_failure: str | None = None

    def post(self, event: Event) -> None:
        account_id = getattr(event.payload, "account_id", None)
        if isinstance(account_id, str) and shard(account_id, self.shards) != self.shard_number:
            self._problem(
                f"shard {self.shard_number} sequence {event.wal_sequence}: account {account_id} "
                f"belongs to shard {shard(account_id, self.shards)}"
            )
        self.ledger.post(event)
        if self.apply_failure is None:
            try:
                self.state.apply(event)
            except InvariantViolation as exc:
                self.apply_failure = f"sequence {event.wal_sequence} ({event.event_type}): {exc}"

    def _problem(self, problem: str) -> None:
        if len(self.problems) < PROBLEMS_KEPT_MAX:
            self.problems.append(problem)

    def finish(self, records: int) -> ShardAudit:
        where = f"shard {self.shard_number}"
        if self.apply_failure is not None:
            self._problem(f"{where}: the state fold refused the event at {self.apply_failure}")
            self.problems.extend(f"{where}: {problem}" for problem in self.ledger.problems[:PROBLEMS_KEPT_MAX])
        else:
            self.problems.extend(f"{where}: {problem}" for problem in check_invariants(self.state, self.ledger))
        balances = {name: value for name, value in sorted(self.ledger.balances.items()) if value != 0}
        return ShardAudit(self.shard_number, records, balances, tuple(self.problems))


async def audit_shard(pool: asyncpg.Pool, shard_number: int, shards: int, last_seq: int) -> ShardAudit:
    """Fold and check one shard's log, which its lease row says ends at ``last_seq``."""
    log = PgLog(pool, shard_number)
    fold = _ShardFold(shard_number, shards)
    records = 0
    try:
        while batch := await log.read(records, PAGE_RECORDS):
            for event in batch:
                fold.post(event)
            records += len(batch)
    except LogCorrupt as exc:
        fold.problems.append(f"{exc} (later events were not read)")
    else:
        if records != last_seq:
            fold.problems.append(f"shard {shard_number} holds {records} record(s); its lease row says {last_seq}")
    return fold.finish(records)


async def audit_cluster(pool: asyncpg.Pool) -> ClusterAudit:
    """Audit every shard of the cluster behind ``pool``; see the module docstring."""
    async with pool.acquire() as connection:
        info = await open_cluster(connection)
    rows = await leases.lease_rows(pool)
    audited = [await audit_shard(pool, row.shard, info.shards, row.last_seq) for row in rows]
    return ClusterAudit(info, tuple(audited))
