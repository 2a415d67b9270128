"""The engine against a small reference model, with crash-and-replay steps (Hypothesis stateful).

Each step drives the real engine (real WAL files, real fsync, tiny segments and frequent
snapshots so rotation and snapshot recovery happen often) and the model side by side, then
checks every ledger invariant and that the engine agrees with the model. Crash steps abandon
the engine without a clean close and reopen the data directory from disk. Days pass, so the
workload outlives the retention: repeats replay exactly (stored responses too) until the
archiver's cutoff and are new requests after it; a settled entry leaves memory but for its
idempotency record, and reads of it (read back from the log) give the entry it was.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from tollway import Engine, Settings
from tollway.config import Durability
from tollway.core import commands as cmd
from tollway.core.commands import CreditKind, EntryResult, Refusal, RefusalCode
from tollway.core.events import Event
from tollway.core.ledger import Ledger, check_invariants
from tollway.core.lifecycle import ARCHIVABLE, EntryState
from tollway.core.state import Entry
from tollway.housekeeping import archive_once, sweep_once
from tollway.redis.keys import Keys
from tollway.redis.parity import differences
from tollway.redis.projector import Projector
from tollway.redis.server import EmbeddedRedis
from tollway.testing import FakeClock
from tollway.wal.segments import iter_events

S = EntryState
T = TypeVar("T")
ACCOUNTS = st.sampled_from(["alice", "bob"])


@dataclass
class ModelEntry:
    account: str
    request_id: str
    estimate: int
    expires_at: int
    state: EntryState = S.RESERVE_HELD
    actual: int | None = None
    charged: int = 0
    archived: bool = False  # past the retention: the engine forgot it
    response: str | None = None  # the response its commit stored
    seen: Entry | None = None  # the entry as the last write on it answered (None: expired by the sweeper since)


class EngineModel(RuleBasedStateMachine):
    """Standalone mode: commits land in COMMITTED and may be voided."""

    SETTLEMENT = False
    entries = Bundle("entries")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="tollway-model-"))
        self.clock = FakeClock()
        self.rng = random.Random(0x5EED)  # seeded: a failing example replays with the same entry ids
        self.settings = Settings(
            data_dir=self.dir,
            durability=Durability.FSYNC,
            segment_bytes=4096,
            snapshot_every_events=7,
            entry_retention_hours=24,
            settlement_url="http://settlement.invalid" if self.SETTLEMENT else None,
        )
        self.run_start()
        self.available: dict[str, int] = defaultdict(int)
        self.model: dict[str, ModelEntry] = {}
        self.keys: dict[tuple[str, str], str] = {}
        self.credit_seq = 0
        self.credits: dict[tuple[str, str], int] = {}  # the credit ids the engine still knows → amount

    def run_start(self) -> None:
        self.engine = self.run(Engine.start(self.settings, clock=self.clock, random80=self.randomness))

    def randomness(self) -> int:
        return self.rng.getrandbits(80)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.engine.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def execute(self, command: cmd.Command) -> cmd.Outcome:
        return self.run(self.engine_for(command).execute(command))

    # -- where the engine lives (the PostgreSQL models override these) ----------------------

    def engine_for(self, command: cmd.Command) -> Engine:
        return self.engine

    def engine_of_account(self, account: str) -> Engine:
        return self.engine

    def engine_of_entry(self, entry_id: str) -> Engine:
        return self.engine

    def all_engines(self) -> list[Engine]:
        return [self.engine]

    def logged(self, engine: Engine) -> Iterable[Event]:
        return iter_events(self.settings.wal_dir)

    def reopen(self, *, crash: bool) -> None:
        if crash:
            self.run(self.engine.abort())
        else:
            self.run(self.engine.close())
        self.engine = self.run(Engine.start(self.settings, clock=self.clock, random80=self.randomness))

    def state_bytes(self) -> list[bytes]:
        return [msgspec.msgpack.encode(engine.state.to_snapshot()) for engine in self.all_engines()]

    def gone(self, entry_id: str, command: cmd.Command) -> bool:
        """Whether ``entry_id`` was archived; if so ``command`` on it must be refused as not found."""
        if not self.model[entry_id].archived:
            return False
        result = self.execute(command)
        assert isinstance(result, Refusal)
        assert RefusalCode.NOT_FOUND == result.code
        return True

    def held_total(self, account: str) -> int:
        return sum(e.estimate for e in self.model.values() if e.account == account and e.state is S.RESERVE_HELD)

    # -- rules -----------------------------------------------------------------------------

    @initialize(amount=st.integers(0, 40_000))
    def fund_both(self, amount: int) -> None:
        for account in ("alice", "bob"):
            self.execute(cmd.Credit(account, "initial", CreditKind.MINT, amount + 1))
            self.available[account] += amount + 1
            self.credits[(account, "initial")] = amount + 1

    @rule(account=ACCOUNTS, amount=st.integers(1, 20_000), repeat=st.booleans())
    def mint(self, account: str, amount: int, repeat: bool) -> None:
        if not repeat or self.credit_seq == 0:
            self.credit_seq += 1
        credit_id = f"mint-{account}-{self.credit_seq}"
        result = self.execute(cmd.Credit(account, credit_id, CreditKind.MINT, amount))
        known = self.credits.get((account, credit_id))
        if known is not None and known != amount:  # a repeat with another amount reuses the key
            assert isinstance(result, Refusal)
            assert RefusalCode.IDEMPOTENCY_KEY_REUSED == result.code
            return
        assert isinstance(result, cmd.CreditResult)
        assert result.replayed == (known is not None)  # an archived credit id is new again
        if not result.replayed:
            self.available[account] += amount
            self.credits[(account, credit_id)] = amount

    @rule(
        target=entries,
        account=ACCOUNTS,
        key=st.integers(0, 12),
        estimate=st.integers(0, 6_000),
        ttl_s=st.integers(1, 30),
    )
    def reserve(self, account: str, key: int, estimate: int, ttl_s: int) -> object:
        request_id = f"req-{key}"
        result = self.execute(cmd.Reserve(account, request_id, estimate, ttl_s=ttl_s))
        existing = self.keys.get((account, request_id))
        if existing is not None:
            entry = self.model[existing]
            if entry.estimate != estimate:
                assert isinstance(result, Refusal)
                assert RefusalCode.IDEMPOTENCY_KEY_REUSED == result.code
            elif entry.state is S.RESERVE_HELD:
                assert isinstance(result, Refusal)
                assert RefusalCode.REQUEST_IN_PROGRESS == result.code
            else:
                assert isinstance(result, EntryResult)
                assert (True, existing) == (result.replayed, result.entry.billing_entry_id)
                assert entry.response == result.response_json
                assert entry.seen in (None, result.entry)
            return multiple()
        if estimate > self.available[account]:
            assert isinstance(result, Refusal)
            assert RefusalCode.INSUFFICIENT_FUNDS == result.code
            return multiple()
        assert isinstance(result, EntryResult)
        entry_id = result.entry.billing_entry_id
        self.model[entry_id] = ModelEntry(account, request_id, estimate, self.clock.now + ttl_s * 1000)
        self.model[entry_id].seen = result.entry
        self.keys[(account, request_id)] = entry_id
        self.available[account] -= estimate
        return entry_id

    @rule(entry_id=entries, actual=st.integers(0, 10_000))
    def commit(self, entry_id: str, actual: int) -> None:
        response = f'{{"output":"{actual}"}}' if actual % 2 else None  # some commits store a response
        if self.gone(entry_id, cmd.Commit(entry_id, actual, response)):
            return
        entry = self.model[entry_id]
        result = self.execute(cmd.Commit(entry_id, actual, response))
        if entry.state is S.RESERVE_HELD and self.clock.now < entry.expires_at:
            assert isinstance(result, EntryResult)
            entry.seen, entry.response = result.entry, response
            assert response == result.response_json
            excess = max(0, actual - entry.estimate)
            charged = min(actual, entry.estimate) + min(excess, self.available[entry.account])
            self.available[entry.account] += entry.estimate - charged
            entry.state = S.FINALIZE_PENDING if self.SETTLEMENT else S.COMMITTED
            entry.actual, entry.charged = actual, charged
            assert (entry.state, charged, actual - charged) == (
                result.entry.state,
                result.entry.charged_micro,
                result.entry.uncollected_micro,
            )
        elif entry.actual == actual:
            assert isinstance(result, EntryResult)
            assert (True, entry.response, entry.seen) == (result.replayed, result.response_json, result.entry)
        else:
            assert isinstance(result, Refusal)
            expired = entry.state is S.RESERVE_HELD or (entry.state is S.RELEASED and entry.actual == -1)
            expected = RefusalCode.RESERVATION_EXPIRED if expired else RefusalCode.INVALID_TRANSITION
            assert expected == result.code

    @rule(entry_id=entries)
    def release(self, entry_id: str) -> None:
        if self.gone(entry_id, cmd.Release(entry_id, "pre_stream_failure")):
            return
        entry = self.model[entry_id]
        result = self.execute(cmd.Release(entry_id, "pre_stream_failure"))
        if entry.state is S.RESERVE_HELD and self.clock.now < entry.expires_at:
            assert isinstance(result, EntryResult)
            entry.state, entry.seen = S.RELEASED, result.entry
            self.available[entry.account] += entry.estimate
        elif entry.state is S.RELEASED and entry.actual is None:
            assert isinstance(result, EntryResult)
            assert (True, entry.seen) == (result.replayed, result.entry)
        else:
            assert isinstance(result, Refusal)

    @rule(ms=st.integers(0, 40_000))
    def time_passes_and_sweeper_runs(self, ms: int) -> None:
        self.clock.advance(ms)
        due = [e for e in self.model.values() if e.state is S.RESERVE_HELD and e.expires_at <= self.clock.now]
        swept = 0
        for engine in self.all_engines():
            while batch := self.run(sweep_once(engine)):
                swept += batch
        assert len(due) == swept
        for entry in due:
            entry.state, entry.actual, entry.seen = S.RELEASED, -1, None  # -1 marks "released by expiry"
            self.available[entry.account] += entry.estimate

    @precondition(lambda self: not self.SETTLEMENT)
    @rule(entry_id=entries)
    def void(self, entry_id: str) -> None:
        if self.gone(entry_id, cmd.Void(entry_id, "refund", "admin-1")):
            return
        entry = self.model[entry_id]
        result = self.execute(cmd.Void(entry_id, "refund", "admin-1"))
        if entry.state in (S.COMMITTED, S.FINALIZE_FAILED):
            assert isinstance(result, EntryResult)
            assert (S.VOIDED, entry.response) == (result.entry.state, result.response_json)
            entry.state, entry.seen = S.VOIDED, result.entry
            self.available[entry.account] += entry.charged
        elif entry.state is S.VOIDED:
            assert isinstance(result, EntryResult)
            assert (True, entry.seen, entry.response) == (result.replayed, result.entry, result.response_json)
        else:
            assert isinstance(result, Refusal)
            assert RefusalCode.INVALID_TRANSITION == result.code

    @precondition(lambda self: self.SETTLEMENT)
    @rule(entry_id=entries, ack=st.booleans())
    def settlement_outcome(self, entry_id: str, ack: bool) -> None:
        entry = self.model[entry_id]
        command: cmd.Command = cmd.FinalizeAck(entry_id) if ack else cmd.FinalizeFail(entry_id, "gave up", 5)
        if self.gone(entry_id, command):
            return
        result = self.execute(command)
        target = S.FINALIZE_ACKED if ack else S.FINALIZE_FAILED
        legal = {S.FINALIZE_PENDING} | ({S.FINALIZE_FAILED} if ack else set())
        if entry.state in legal:
            assert isinstance(result, EntryResult)
            entry.state, entry.seen = target, result.entry
        elif entry.state is target:
            assert isinstance(result, EntryResult)
            assert (True, entry.seen, entry.response) == (result.replayed, result.entry, result.response_json)
        else:
            assert isinstance(result, Refusal)

    @precondition(lambda self: self.SETTLEMENT)
    @rule(entry_id=consumes(entries))
    def admin_voids_failed(self, entry_id: str) -> None:
        if self.gone(entry_id, cmd.Void(entry_id, "written off", "admin-2")):
            return
        entry = self.model[entry_id]
        result = self.execute(cmd.Void(entry_id, "written off", "admin-2"))
        if entry.state is S.FINALIZE_FAILED:
            assert isinstance(result, EntryResult)
            entry.state, entry.seen = S.VOIDED, result.entry
            self.available[entry.account] += entry.charged
        else:
            assert isinstance(result, Refusal) or (isinstance(result, EntryResult) and result.replayed)

    @rule()
    def a_day_passes_and_the_archiver_runs(self) -> None:
        """25 hours later every settled entry is past the 24 h retention; holds and unsettled charges stay."""
        self.clock.advance(25 * 3_600_000)
        due = [e for e in self.model.values() if not e.archived and e.state in ARCHIVABLE]
        archived = [self.run(archive_once(engine)) for engine in self.all_engines()]
        assert (len(due), len(self.credits)) == (sum(a.entries for a in archived), sum(a.credits for a in archived))
        self.credits.clear()  # every credit was made before the cutoff
        for entry in due:
            entry.archived = True
            del self.keys[(entry.account, entry.request_id)]  # the request id is new again

    @rule()
    def crash_and_replay(self) -> None:
        before = self.state_bytes()
        self.reopen(crash=True)
        assert before == self.state_bytes()

    @rule()
    def clean_restart(self) -> None:
        sequences = [engine.state.last_sequence for engine in self.all_engines()]
        self.reopen(crash=False)
        assert sequences == [engine.state.last_sequence for engine in self.all_engines()]

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def ledger_invariants_hold(self) -> None:
        for engine in self.all_engines():
            ledger = Ledger().post_all(self.logged(engine))
            assert [] == check_invariants(engine.state, ledger)
            assert 0 == ledger.total()

    @invariant()
    def engine_agrees_with_model(self) -> None:
        for account in ("alice", "bob"):
            balance = self.engine_of_account(account).balance(account)
            assert (self.available[account], self.held_total(account)) == (
                balance.available_micro,
                balance.held_micro,
            )
            assert balance.available_micro >= 0
        for entry_id, entry in self.model.items():
            engine = self.engine_of_entry(entry_id)  # the engine of the entry's shard
            state = engine.state
            if entry.archived:
                assert (None, None) == (state.entry_state(entry_id), self.run(engine.read_entry(entry_id)))
                continue
            assert entry.state == state.entry_state(entry_id)
            # Hot state holds live work only: a settled entry keeps just its idempotency record.
            assert (entry.state in ARCHIVABLE) == (entry_id in state.settled) == (entry_id not in state.entries)
            assert entry_id not in state.responses or entry.state not in ARCHIVABLE
            read = self.run(engine.read_entry(entry_id))
            assert read is not None
            assert (entry.state, entry.response) == (read[0].state, read[1])
            assert entry.seen in (None, read[0])  # read back from the log: the very entry it was


class SettlementEngineModel(EngineModel):
    """Settlement mode: commits land in FINALIZE_PENDING; acks, failures and admin voids follow."""

    SETTLEMENT = True


class ProjectedEngineModel(SettlementEngineModel):
    """The same model with the Redis projection on: after every step Redis equals the engine, exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.redis_server = self.run(EmbeddedRedis.start(self.dir / "redis"))
        self.client = aioredis.Redis.from_url(self.redis_server.url)
        self.keys_layout = Keys("tw", "model")
        self.projector = Projector(self.engine, self.client, self.keys_layout, batch_events_max=5)

    def teardown(self) -> None:
        self.run(self.client.aclose())
        self.run(self.redis_server.stop())
        super().teardown()

    @invariant()
    def projection_in_parity(self) -> None:
        if self.projector.engine is not self.engine:  # reopened after a crash: a new projector resumes
            self.projector = Projector(self.engine, self.client, self.keys_layout, batch_events_max=5)
        self.run(self.projector.sync())
        assert [] == self.run(differences(self.client, self.keys_layout, self.engine.state))

    @rule()
    def redis_loses_everything(self) -> None:
        self.run(self.client.flushall())  # type: ignore[arg-type]


STATEFUL = settings(max_examples=40, stateful_step_count=40, deadline=None)
TestEngineModel = EngineModel.TestCase
TestEngineModel.settings = STATEFUL
TestSettlementEngineModel = SettlementEngineModel.TestCase
TestSettlementEngineModel.settings = STATEFUL
TestProjectedEngineModel = ProjectedEngineModel.TestCase
TestProjectedEngineModel.settings = settings(max_examples=20, stateful_step_count=30, deadline=None)
