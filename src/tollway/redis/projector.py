"""The projector: keeps the Redis projection caught up with the WAL, whatever Redis does.

The engine hands every durable batch to :meth:`Projector.on_durable`, which only buffers it
(bounded) and wakes the projector's task. The task applies events in order with
``apply_batch.lua``, each batch guarded by the projection's ``applied_seq``, so a batch sent
twice changes nothing. When the buffer no longer reaches back to ``applied_seq + 1`` (Redis
was away for long), the missing events are read back from the WAL files.

Once caught up, a woken projector waits ``coalesce_ms`` (the ``projection_coalesce_ms``
setting) before its next call, so a lightly loaded engine, whose group-commit batches hold one
or two events, costs one Redis call per interval instead of one per batch (each call costs the
event loop far more than an event does); under load it never waits, the batches are large.

With a :class:`~tollway.redis.pump.ProjectionPump` (the service starts one unless
``projection_pump`` rules it out), the projector keeps each buffered event's WAL record and hands
runs of them to the pump, a child process that encodes and applies them: two batches in
flight, so the pump encodes one while Redis runs the other, of up to 1,024 events (256 when
encoding here, where a batch stalls the event loop): the larger the batch, the more holds
meet their commits in it and fold into one write. Events read back from the WAL are
applied here as before, and a pump that fails is dropped for good (encoding here from then on).

Redis going away never stops billing: the engine does not wait for the projector. The task
backs off and retries; when Redis returns it catches up. A caught-up projector still reads the
projection's ``applied_seq`` every :data:`IDLE_CHECK_MS`, so a Redis that goes away, or comes
back empty (an embedded one restarted, an external one flushed), is noticed and rebuilt while
nobody bills: the finalize queue of every charge still awaiting settlement comes back with it.
When ``applied_seq`` is missing (a flushed or brand-new Redis) or ahead of the WAL (Redis kept
state the log never made durable), the projector deletes the shard's keys and **rebuilds**
everything from a consistent copy of the engine state — balances, entries, expiry index,
stored responses, the finalize queue of every ``FINALIZE_PENDING`` entry and the dead letter of
every ``FINALIZE_FAILED`` one — then catches up from there.

A violation reported by the script (a balance that would go negative) means the projection
and the log disagree (someone wrote to Redis behind tollway's back, or a bug): nothing was
applied. The WAL is the truth, so the projector **repairs** at once: it tells its divergence
listener (the conservation guard degrades, SPEC §9), writes an ``audit`` event naming what it
found, rebuilds the projection from the engine state and writes a second ``audit`` event naming
what it rebuilt, then goes on. A repair can also be asked for (:meth:`Projector.request_repair`,
the guard's periodic parity check). Only when divergences keep coming back
(:data:`REPAIRS_MAX` within :data:`REPAIR_WINDOW_MS`) does it stop and wait for an operator.

Ownership: every projection belongs to one data directory (its identity,
:mod:`tollway.wal.identity`, in the meta hash's ``owner`` field, claimed with ``HSETNX`` before
a rebuild). ``apply_batch.lua`` refuses a batch from another owner, and a rebuild never deletes
another owner's projection: two engines configured with the same prefix and shard fail loudly
(:class:`ProjectionForeign`) instead of overwriting each other.

Cluster mode (``epoch`` given): the owner is the cluster and shard (``cluster <id> shard <n>``)
and the meta hash also records the lease ``epoch`` of the writer. The projector claims the
projection for its epoch (``claim_projection.lua``) before it reads or rebuilds, every batch
carries the epoch, and a projection written under a newer epoch refuses it (``stale``): the
projector stops (:class:`ProjectionStale`), since its engine has lost the shard. Missing events
are read back from the engine's log (:meth:`tollway.eventlog.EventLog.read`), whichever it is.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import redis.asyncio as aioredis
import redis.exceptions

from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.core.errors import TollwayError
from tollway.core.events import Event
from tollway.core.state import State
from tollway.redis.errors import REDIS_ERRORS, REFUSALS, RedisRefused, at_boundary
from tollway.redis.keys import FINALIZE_GROUP, Keys
from tollway.redis.projection import dead_letter, dead_letters, encode_batch, rebuild_commands
from tollway.redis.pump import ProjectionPump, PumpGone

if TYPE_CHECKING:
    from tollway.engine import Engine

log = logging.getLogger("tollway.projector")

BATCH_EVENTS_MAX: Final = 256  # encoded in the event loop: a batch of 256 stalls it for a few ms
PUMP_BATCH_EVENTS_MAX: Final = 1024  # encoded by the pump: larger batches fold more holds with their commits
PUMP_IN_FLIGHT: Final = 2  # the pump encodes one batch while Redis runs the one before
BUFFER_EVENTS_MAX: Final = 200_000
WAL_READ_EVENTS_MAX: Final = 100_000
REBUILD_PIPELINE_MAX: Final = 1_000
RETRY_DELAY_MS: Final = (50, 100, 250, 500, 1000, 2000, 5000)
REPAIRS_MAX: Final = 3
"""Divergences repaired within :data:`REPAIR_WINDOW_MS` before the projector stops for an operator."""
REPAIR_WINDOW_MS: Final = 60_000
IDLE_CHECK_MS: Final = 1_000
"""How long a caught-up projector waits for events before it looks at Redis anyway (one ``HMGET``)."""
AUDIT_DIVERGENCE: Final = "projection_divergence"
AUDIT_REBUILT: Final = "projection_rebuilt"
AUDIT_TEXT_MAX: Final = 1024


def load_script(name: str) -> str:
    """The text of ``lua/<name>``."""
    return resources.files("tollway.redis").joinpath("lua", name).read_text()


class ProjectionViolation(TollwayError):
    """The script refused a batch: applying it would break a projection invariant."""


class ProjectionForeign(TollwayError):
    """The projection at these keys belongs to another data directory; this engine must not touch it."""


class ProjectionStale(ProjectionForeign):
    """Cluster mode: a newer lease epoch wrote this shard's projection; this (older) writer must not."""


DivergenceListener = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ProjectorStatus:
    """What ``/readyz`` and the metrics report."""

    connected: bool
    applied_seq: int | None
    durable_seq: int
    lag_events: int
    lag_ms: int
    rebuilds: int
    violation: str | None
    pump: str  # "on", "off" (not configured), or "failed" (dropped: batches are encoded in the event loop)
    redis_error: str | None = None  # what Redis answers while it takes no batch (maxmemory, read-only, …)
    divergences: int = 0  # projections found to differ from the WAL, each repaired by a rebuild
    last_divergence: str | None = None  # what the last one was
    foreign_owner: str | None = None  # another data directory owns these keys: nothing is written


class Projector:
    """Projects one engine's durable events into one Redis shard."""

    def __init__(
        self,
        engine: Engine,
        client: aioredis.Redis,
        keys: Keys,
        *,
        batch_events_max: int = BATCH_EVENTS_MAX,
        pump_batch_events_max: int = PUMP_BATCH_EVENTS_MAX,
        coalesce_ms: int = 0,
        idle_check_ms: int = IDLE_CHECK_MS,
        pump: ProjectionPump | None = None,
        owner: str | None = None,
        epoch: int | None = None,
    ) -> None:
        self.engine = engine
        self.redis = client
        self.keys = keys
        self.batch_events_max = batch_events_max
        self.pump_batch_events_max = pump_batch_events_max
        self.coalesce_s = coalesce_ms / 1000
        self.idle_check_s = idle_check_ms / 1000
        self._apply = client.register_script(load_script("apply_batch.lua"))
        self._claim = client.register_script(load_script("claim_projection.lua"))
        self.epoch = epoch  # cluster mode: the shard's lease epoch, checked by every script call
        self._claimed = False  # cluster mode: whether the projection was claimed for ``epoch`` yet
        self._buffer: collections.deque[Event] = collections.deque()
        self.pump = pump
        self._pump_failed = False
        self._records: collections.OrderedDict[int, bytes] = collections.OrderedDict()  # for the pump, by sequence
        self._wake = asyncio.Event()
        self.applied_seq: int | None = None
        self.connected = False
        self.rebuilds = 0
        self.violation: str | None = None  # set when the projector stopped for an operator
        self.redis_error: str | None = None
        self.owner = owner if owner is not None else engine.identity
        self.foreign_owner: str | None = None
        self.divergences = 0
        self.last_divergence: str | None = None
        self.on_divergence: DivergenceListener | None = None
        self._repairs_ms: collections.deque[int] = collections.deque(maxlen=REPAIRS_MAX)
        self._repair_asked: str | None = None
        engine.subscribe(self.on_durable)

    # -- feeding ---------------------------------------------------------------------------

    def on_durable(self, events: list[Event], records: list[bytes]) -> None:
        """Engine listener: buffer a durable batch (dropping the oldest beyond the bound).

        The buffer only ever holds consecutive sequences; a batch that would not continue it is
        left to the WAL, where the projector finds it. With a pump, the batch's WAL records
        (``records``, one per event) are kept too, for the pump to apply.
        """
        if self._buffer and events and events[0].wal_sequence != self._buffer[-1].wal_sequence + 1:
            self._wake.set()
            return
        self._buffer.extend(events)
        if self.pump is not None:
            for event, record in zip(events, records, strict=True):
                self._records[event.wal_sequence] = record  # in sequence order: batches arrive in order
        excess = len(self._buffer) - BUFFER_EVENTS_MAX
        for _ in range(max(0, excess)):
            self._buffer.popleft()  # the WAL still has them
        if excess > 0:
            self._forget_records(self._buffer[0].wal_sequence - 1)
        self._wake.set()

    def status(self) -> ProjectorStatus:
        """Connection, applied sequence and lag (events and milliseconds)."""
        durable = self.engine.durable_sequence
        applied = self.applied_seq or 0
        lag_ms = 0
        if self._buffer and applied < durable:
            oldest = self._buffer[0] if self._buffer[0].wal_sequence > applied else self._first_after(applied)
            if oldest is not None:
                lag_ms = max(0, self.engine.now_ms() - oldest.timestamp_ms)
        pump = "on" if self.pump is not None else ("failed" if self._pump_failed else "off")
        return ProjectorStatus(
            self.connected,
            self.applied_seq,
            durable,
            durable - applied,
            lag_ms,
            self.rebuilds,
            self.violation,
            pump,
            self.redis_error,
            self.divergences,
            self.last_divergence,
            self.foreign_owner,
        )

    def request_repair(self, finding: str) -> None:
        """Rebuild the projection from the WAL soon (the guard's parity check found ``finding``)."""
        self._repair_asked = finding
        self._wake.set()

    def _first_after(self, applied: int) -> Event | None:
        start = applied + 1 - self._buffer[0].wal_sequence
        return self._buffer[start] if 0 <= start < len(self._buffer) else None

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Project forever; survives Redis outages and repairs divergences; stops on repeated ones or cancellation."""
        failures = 0
        while self.violation is None:
            try:
                await self._step(reconnected=failures > 0 and not self.connected)
                self.connected, failures, self.redis_error = True, 0, None
            except (*REFUSALS, *REDIS_ERRORS) as exc:
                raise_if_cancelled()
                self._pause(exc, first=failures == 0)
                await asyncio.sleep(RETRY_DELAY_MS[min(failures, len(RETRY_DELAY_MS) - 1)] / 1000)
                failures += 1
                continue
            except ProjectionViolation as exc:
                self._repair_asked = str(exc)
                continue
            except ProjectionForeign as exc:
                self.violation = str(exc)
                log.critical("projection stopped: %s", exc)
                return
            raise_if_cancelled()  # a library may have swallowed it and returned normally
            await self._wait_for_work()

    async def _step(self, *, reconnected: bool) -> None:
        """A repair if one is due, then catch up."""
        await self._repair_if_asked()
        if self.violation is None:
            await self.sync()
            if reconnected:
                log.info("redis reachable again: the projection is caught up at sequence %s", self.applied_seq)

    async def _wait_for_work(self) -> None:
        """Sleep until new durable events (or a repair request) arrive, then let a few gather.

        At most :data:`IDLE_CHECK_MS`: then the next step only reads the applied sequence, so a
        Redis that went away (``connected`` false) or came back empty (rebuilt) is noticed while
        nobody bills.
        """
        if self._repair_asked is not None or self.applied_seq is None:
            return
        if self.applied_seq >= self.engine.durable_sequence:
            self._wake.clear()
            if self.applied_seq >= self.engine.durable_sequence and self._repair_asked is None:
                try:
                    async with asyncio.timeout(self.idle_check_s):
                        await self._wake.wait()
                except TimeoutError:
                    return
                if self.coalesce_s > 0:  # let a few batches gather: one call instead of one per batch
                    await asyncio.sleep(self.coalesce_s)

    async def _repair_if_asked(self) -> None:
        """Rebuild from the WAL after a divergence (guard told, finding and rebuild audited); stop if it recurs."""
        finding, self._repair_asked = self._repair_asked, None
        if finding is None:
            return
        now_ms = self.engine.now_ms()
        self.divergences += 1
        self.last_divergence = finding
        if len(self._repairs_ms) == REPAIRS_MAX and now_ms - self._repairs_ms[0] < REPAIR_WINDOW_MS:
            self.violation = f"{REPAIRS_MAX} divergences within {REPAIR_WINDOW_MS} ms, the last: {finding}"
            log.critical("projection stopped, an operator must audit (`tollway audit`): %s", self.violation)
            return
        self._repairs_ms.append(now_ms)
        log.critical("the Redis projection diverged from the WAL: %s; rebuilding it from the WAL", finding)
        if self.on_divergence is not None:
            self.on_divergence(finding)
        await self._audit(AUDIT_DIVERGENCE, f"found: {finding}")
        try:
            seq = await self.rebuild()
        except BaseException:
            self._repair_asked = finding  # not rebuilt (Redis away?): try again when it answers
            raise
        detail = f"rebuilt from the WAL at sequence {seq} after: {finding}"
        await self._audit(AUDIT_REBUILT, detail)
        log.warning("projection repaired: %s", detail)

    async def _audit(self, action: str, detail: str) -> None:
        """Record a projector finding in the WAL (an ``audit`` event)."""
        await self.engine.execute(cmd.Note(ev.Audit(action, "projector", detail[:AUDIT_TEXT_MAX])))

    def _pause(self, exc: Exception, *, first: bool) -> None:
        """Note why the projection waits (logged once per outage): Redis away, or answering an error."""
        if isinstance(exc, REFUSALS):
            error = str(exc) if isinstance(exc, RedisRefused) else f"{type(exc).__name__}: {exc}"
            if self.redis_error is None:
                log.warning("redis answers an error, projection paused (billing continues): %s", error)
            self.connected, self.redis_error = True, error.strip()
            return
        if self.connected or first:
            log.warning("redis unavailable, projection paused (billing continues): %s", exc)
        self.connected = False

    @at_boundary
    async def sync(self) -> int:
        """Bring the projection up to the engine's durable sequence; returns the applied one.

        In cluster mode the first call claims the projection for this writer's epoch, so that an
        older writer is refused from then on even before this one has a batch to apply.
        """
        if self.epoch is not None and not self._claimed:
            await self._claim_epoch()
            self._claimed = True
        applied = await self._read_applied()
        if applied is None or applied > self.engine.durable_sequence:
            applied = await self.rebuild()
        while applied < self.engine.durable_sequence:
            pumped = await self._pump_from(applied) if self.pump is not None else None
            if pumped is None:  # no pump, or the next events are not in memory: encode here
                events = await self._events_after(applied)
                pumped = await self._apply_events(events)
            applied = pumped
            self.applied_seq = applied
            self._trim(applied)
        self.applied_seq = applied
        return applied

    @at_boundary
    async def applied_sequence(self) -> int | None:
        """The projection's applied sequence; None while it is missing or being rebuilt."""
        applied, rebuilding = await self.redis.hmget(self.keys.meta, ["applied_seq", "rebuilding"])
        return None if applied is None or rebuilding is not None else int(applied)

    async def _read_applied(self) -> int | None:
        """The projection's applied sequence; None when it must be rebuilt (missing, or unclaimed).

        Raises :class:`ProjectionForeign` when another data directory owns it.
        """
        raw, found, epoch = await self.redis.hmget(self.keys.meta, ["applied_seq", "owner", "epoch"])
        owner = None if found is None else found.decode() if isinstance(found, bytes) else str(found)
        if owner is not None and owner != self.owner:
            raise self._foreign(owner)
        if self.epoch is not None and epoch is not None and int(epoch) > self.epoch:
            raise self._stale(int(epoch))
        return None if raw is None or owner is None else int(raw)

    async def _apply_events(self, events: list[Event]) -> int:
        batch = encode_batch(self.keys, events, self.owner, self.epoch)
        return await self._settle(await self._apply(keys=batch.keys, args=batch.argv))

    async def _settle(self, reply: list[object]) -> int:
        """The applied sequence after the script's ``reply`` (rebuilding or raising as it says)."""
        status, *rest = (part.decode() if isinstance(part, bytes) else str(part) for part in reply)
        if status in ("ok", "duplicate"):
            return int(rest[0])
        if status == "missing":
            return await self.rebuild()
        if status == "foreign":
            raise self._foreign(rest[0])
        if status == "stale":
            raise self._stale(int(rest[0]))
        if status == "unwritable":
            raise RedisRefused(rest[0])
        if status == "gap":
            log.warning("projection gap: applied %s, batch starts at %s; re-reading", rest[0], rest[1])
            return int(rest[0])
        raise ProjectionViolation(f"redis refused seq {rest[0]}: {rest[1]} {rest[2]}: {rest[3]}")

    async def _pump_from(self, applied: int) -> int | None:
        """Apply buffered events after ``applied`` through the pump, two batches in flight.

        Returns the applied sequence once nothing more can be sent (nothing more is durable, or
        the next events are not in memory), or a reply was not ``ok`` (handled as
        :meth:`_settle` says, after the batch behind it was answered); None when it applied
        nothing (the caller encodes the next batch here).
        """
        pump = self.pump
        assert pump is not None
        if not pump.usable:
            self._retire_pump(pump.failure)
            return None
        in_flight: collections.deque[asyncio.Future[list[Any]]] = collections.deque()
        started = sent = applied
        try:
            while True:
                while len(in_flight) < PUMP_IN_FLIGHT and sent < self.engine.durable_sequence:
                    events = self._buffered_after(sent, self.pump_batch_events_max)
                    records = self._records_of(events)
                    if records is None:
                        break
                    in_flight.append(pump.submit(records))
                    sent = events[-1].wal_sequence
                if not in_flight:
                    return applied if applied > started else None
                reply = await in_flight.popleft()
                status = reply[0]
                if status in (b"ok", "ok"):
                    applied = int(reply[1])
                    self.applied_seq = applied
                    self._trim(applied)
                    continue
                for behind in in_flight:  # answered as gaps or duplicates: wait, then ignore
                    with contextlib.suppress(Exception):
                        await behind
                return await self._settle(reply)
        except PumpGone as exc:
            self._retire_pump(str(exc))
            return applied if applied > started else None
        finally:
            for answer in in_flight:
                answer.cancel()

    def _retire_pump(self, reason: str | None) -> None:
        log.warning("projection pump unusable, encoding in this process from now on: %s", reason)
        self.pump = None
        self._pump_failed = True

    def _buffered_after(self, applied: int, limit: int) -> list[Event]:
        """Up to ``limit`` durable events after ``applied`` from memory ([] if not there)."""
        durable, buffer = self.engine.durable_sequence, self._buffer
        if not buffer or not buffer[0].wal_sequence <= applied + 1 <= buffer[-1].wal_sequence:
            return []
        start = applied + 1 - buffer[0].wal_sequence
        return [e for e in itertools.islice(buffer, start, start + limit) if e.wal_sequence <= durable]

    def _records_of(self, events: list[Event]) -> bytes | None:
        """The WAL records of ``events`` joined, if every one of them is kept."""
        if not events:
            return None
        found = self._records
        try:
            return b"".join([found[event.wal_sequence] for event in events])
        except KeyError:  # read back from the WAL (or dropped): encode here
            return None

    def _forget_records(self, through: int) -> None:
        """Drop the kept records up to sequence ``through`` (the oldest are first)."""
        records = self._records
        while records and next(iter(records)) <= through:
            records.popitem(last=False)

    def _trim(self, applied: int) -> None:
        while self._buffer and self._buffer[0].wal_sequence <= applied:
            self._buffer.popleft()
        self._forget_records(applied)

    async def _events_after(self, applied: int) -> list[Event]:
        """Up to ``batch_events_max`` durable events after ``applied``: from memory, else the WAL."""
        buffered = self._buffered_after(applied, self.batch_events_max)
        if buffered:
            return buffered
        limit, durable = self.batch_events_max, self.engine.durable_sequence
        events = await self.engine.log.read(applied, min(durable - applied, WAL_READ_EVENTS_MAX))
        self._refill(events[limit:], events[-1].wal_sequence if events else applied)
        return events[:limit]

    def _refill(self, read: list[Event], last_read: int) -> None:
        """Keep what was read from the WAL beyond this batch, followed by the newer buffered events.

        The buffer must stay consecutive (batches are sliced from it by sequence arithmetic):
        buffered events the WAL read already covered are dropped, and if the buffer does not
        continue right after the read, it is dropped too — the WAL still has those events.
        """
        newer = [event for event in self._buffer if event.wal_sequence > last_read]
        self._buffer = collections.deque(read)
        if newer and newer[0].wal_sequence == last_read + 1:
            self._buffer.extend(newer)

    # -- rebuild ---------------------------------------------------------------------------

    def _stale(self, epoch: int) -> ProjectionStale:
        return ProjectionStale(
            f"the Redis projection of shard {self.keys.shard!r} was written under lease epoch {epoch}, newer than "
            f"this writer's {self.epoch}: the shard has a new owner, this projector stops"
        )

    def _foreign(self, owner: str) -> ProjectionForeign:
        self.foreign_owner = owner
        return ProjectionForeign(
            f"the Redis projection under prefix {self.keys.prefix!r}, shard {self.keys.shard!r} belongs to another "
            f"tollway data directory (identity {owner}; this one is {self.owner}). Two engines must never share a "
            "prefix and shard: give this service its own redis_prefix or shard (TOLLWAY_REDIS_PREFIX, "
            "TOLLWAY_SHARD), or, if that data directory is gone for good, hand the keys to this one with "
            "`tollway rebuild --data-dir DIR --redis-url URL --take-over` while no service uses them"
        )

    @at_boundary
    async def claim(self, *, take_over: bool = False) -> None:
        """Make this data directory the projection's owner, unless another one is (``take_over``: even then).

        In cluster mode the claim is the cluster's, for this writer's epoch (never a take-over).
        """
        if self.epoch is not None:
            await self._claim_epoch()
        elif take_over:
            await self.redis.hset(self.keys.meta, "owner", self.owner)
        elif not await self.redis.hsetnx(self.keys.meta, "owner", self.owner):
            owner = await self.redis.hget(self.keys.meta, "owner")
            text = owner.decode() if isinstance(owner, bytes) else str(owner)
            if text != self.owner:
                raise self._foreign(text)
        self.foreign_owner = None

    @at_boundary
    async def rebuild(self, *, take_over: bool = False) -> int:
        """Recreate the shard's projection from a consistent copy of the engine state (claiming it first)."""
        started = time.perf_counter()
        await self.claim(take_over=take_over)
        await self.redis.hdel(self.keys.meta, "applied_seq")  # batches find it missing until the rebuild ends
        await self.redis.hset(self.keys.meta, "rebuilding", "1")
        await self._delete_shard()
        state = await self.engine.export_state()
        await self._write(state)
        seq = state.last_sequence
        if self.epoch is not None:  # finished only if no newer epoch claimed the shard meanwhile
            await self._claim_epoch(seq)
        else:
            await self.redis.hset(
                self.keys.meta, mapping={"applied_seq": str(seq), "rebuilt_at_ms": str(self.engine.now_ms())}
            )
            await self.redis.hdel(self.keys.meta, "rebuilding")
        self.rebuilds += 1
        self._trim(seq)
        # A Redis that holds no projection is the normal start of an embedded one (it keeps nothing on
        # disk): not a warning. A divergence is logged as such by the repair that rebuilds it.
        log.info(
            "projection rebuilt from the WAL at sequence %s (%s entries) in %.3f s",
            seq,
            len(state.entries),
            time.perf_counter() - started,
        )
        return seq

    async def _claim_epoch(self, rebuilt_seq: int | None = None) -> None:
        """``claim_projection.lua`` for this writer's epoch (finishing a rebuild at ``rebuilt_seq``)."""
        args = [self.owner, str(self.epoch), self.keys.shard]
        if rebuilt_seq is not None:
            args += [str(rebuilt_seq), str(self.engine.now_ms())]
        reply = await self._claim(keys=[self.keys.meta], args=args)
        status, *rest = (part.decode() if isinstance(part, bytes) else str(part) for part in reply)
        if status == "foreign":
            raise self._foreign(rest[0])
        if status == "stale":
            raise self._stale(int(rest[0]))
        self.foreign_owner = None

    async def _delete_shard(self) -> None:
        """Delete every key of the shard but its meta hash (which holds the owner's claim)."""
        meta = self.keys.meta.encode()
        keys = self.redis.scan_iter(match=self.keys.pattern, count=1000)
        async for chunk in _chunks(keys, REBUILD_PIPELINE_MAX):
            doomed = [key for key in chunk if key != meta]
            if doomed:
                await self.redis.unlink(*doomed)

    async def _write(self, state: State) -> None:
        pipe = self.redis.pipeline(transaction=False)
        queued = 0
        for command in rebuild_commands(self.keys, state):
            pipe.execute_command(*command)
            queued += 1
            if queued >= REBUILD_PIPELINE_MAX:
                await pipe.execute()
                queued = 0
        await pipe.execute()
        for entry in dead_letters(state):
            message_id = await self.redis.xadd(self.keys.poison, dead_letter(entry, None))  # type: ignore[arg-type]
            await self.redis.hset(self.keys.entry(entry.billing_entry_id), "poison_id", message_id)
        await ensure_group(self.redis, self.keys)


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a client library swallowed.

    redis-py can report a command interrupted by ``Task.cancel()`` as a ``ConnectionError``,
    or finish the command and return normally; a loop that then waits or retries would never
    stop. ``Task.cancelling()`` still knows, so long-running loops call this before waiting.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def ensure_group(client: aioredis.Redis, keys: Keys) -> None:
    """Create the finalize consumer group (and the stream) unless it exists."""
    try:
        await client.xgroup_create(keys.finalize, FINALIZE_GROUP, id="0", mkstream=True)
    except redis.exceptions.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def _chunks(items: collections.abc.AsyncIterator[bytes], size: int) -> collections.abc.AsyncIterator[list[bytes]]:
    chunk: list[bytes] = []
    async for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
