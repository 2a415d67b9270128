"""The engine's stateful model test (with crash-and-replay steps) on the log in PostgreSQL.

The same rules and invariants as ``tests/test_engine_model.py``, but each engine is a shard's
engine (:func:`tollway.cluster.shard_log.start_shard_engine`) writing through fenced batches into
the session's embedded PostgreSQL, with snapshots as rows. A crash aborts every engine, gives
up the leases and takes them again (a new epoch, as a new owner would), and recovers each shard
from its newest snapshot row and the records after it. One shard holds both accounts; with four
shards ``alice`` (shard 3) and ``bob`` (shard 2) live in different engines, and every command
goes to the engine of its account or of its entry id's shard.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable

import asyncpg
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from tests.test_engine_model import EngineModel
from tollway import Engine
from tollway.cluster.shard_log import start_shard_engine
from tollway.core import commands as cmd
from tollway.core.events import Event
from tollway.core.shard import shard, shard_of_entry_id
from tollway.pg import leases
from tollway.pg.leases import Lease
from tollway.pg.log import PgLog
from tollway.pg.schema import init_cluster
from tollway.pg.server import EmbeddedPostgres

TTL_MS = 600_000  # the model's clock is fake; leases must not expire during an example
_NAMES = itertools.count()


class PgModel(EngineModel):
    """The engine model with one engine per shard on PostgreSQL (standalone mode)."""

    SHARDS = 1
    SERVER_URL = ""  # set by the test function to the session server's URL

    def __init__(self) -> None:
        self.engines: dict[int, Engine] = {}
        self.leases: dict[int, Lease] = {}
        self.database = f"model_{next(_NAMES)}"
        self.pool: asyncpg.Pool | None = None
        super().__init__()

    def run_start(self) -> None:
        base = self.SERVER_URL.rsplit("/", 1)[0]
        self.run(_create_database(self.SERVER_URL, self.database))
        self.pool = self.run(_cluster(f"{base}/{self.database}", self.SHARDS))
        self.start_all()

    def start_all(self) -> None:
        assert self.pool is not None
        for number in range(self.SHARDS):
            lease = self.run(leases.acquire(self.pool, number, "model", TTL_MS, time.monotonic_ns() // 1_000_000))
            assert lease is not None
            self.leases[number] = lease
            self.engines[number] = self.run(
                start_shard_engine(
                    PgLog(self.pool, number),
                    lease.epoch,
                    self.settings,
                    clock=self.clock,
                    random80=self.randomness,
                )
            )
        self.engine = self.engines[0]

    def engine_for(self, command: cmd.Command) -> Engine:
        account = getattr(command, "account_id", None)
        if isinstance(account, str):
            return self.engine_of_account(account)
        entry_id = getattr(command, "billing_entry_id", None)
        assert isinstance(entry_id, str)
        return self.engine_of_entry(entry_id)

    def engine_of_account(self, account: str) -> Engine:
        return self.engines[shard(account, self.SHARDS)]

    def engine_of_entry(self, entry_id: str) -> Engine:
        return self.engines[shard_of_entry_id(entry_id, self.SHARDS)]

    def all_engines(self) -> list[Engine]:
        return [self.engines[number] for number in sorted(self.engines)]

    def logged(self, engine: Engine) -> Iterable[Event]:
        assert self.pool is not None
        number = next(n for n, e in self.engines.items() if e is engine)
        return self.run(_read_all(PgLog(self.pool, number)))

    def reopen(self, *, crash: bool) -> None:
        assert self.pool is not None
        for number, engine in sorted(self.engines.items()):
            self.run(engine.abort() if crash else engine.close())
            assert self.run(leases.release(self.pool, self.leases[number]))
        self.start_all()

    def teardown(self) -> None:
        for engine in self.all_engines():
            self.run(engine.close())
        if self.pool is not None:
            self.run(self.pool.close())
        self.run(_drop_database(self.SERVER_URL, self.database))
        self.loop.close()


async def _create_database(url: str, name: str) -> None:
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()


async def _drop_database(url: str, name: str) -> None:
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


async def _cluster(url: str, shards: int) -> asyncpg.Pool:
    """A pool on a new cluster of ``shards`` shards at ``url``."""
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    async with pool.acquire() as connection:
        await init_cluster(connection, shards=shards)
    return pool


async def _read_all(pg_log: PgLog) -> list[Event]:
    events: list[Event] = []
    while batch := await pg_log.read(len(events), 1_000):
        events.extend(batch)
    return events


class ShardedPgModel(PgModel):
    """Four shards: alice and bob in different engines."""

    SHARDS = 4


class SettlementShardedPgModel(ShardedPgModel):
    """Four shards, settlement mode (acks, failures, admin voids)."""

    SETTLEMENT = True


PG_STATEFUL = settings(max_examples=12, stateful_step_count=30, deadline=None)


def _run(machine: type[PgModel], server: EmbeddedPostgres) -> None:
    machine.SERVER_URL = server.url
    run_state_machine_as_test(machine, settings=PG_STATEFUL)


def test_engine_model_on_one_pg_shard(pg_server: EmbeddedPostgres) -> None:
    """The model's rules and invariants hold with one shard on PostgreSQL, crashes included."""
    _run(PgModel, pg_server)


def test_engine_model_on_four_pg_shards(pg_server: EmbeddedPostgres) -> None:
    """The same with four shards: each account in its own engine, entries routed by their id's shard."""
    _run(ShardedPgModel, pg_server)


def test_settlement_engine_model_on_four_pg_shards(pg_server: EmbeddedPostgres) -> None:
    """Settlement mode's rules and invariants hold with four shards on PostgreSQL."""
    _run(SettlementShardedPgModel, pg_server)
