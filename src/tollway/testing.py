"""Fakes shipped with tollway for tests (yours and ours).

A clock, an observer that records, and :class:`MemoryEngine`: the engine's decide → apply
path with the log kept in a list instead of on disk, for fast tests of billing logic.

They replace only what is pure or observational. Nothing here imitates the WAL's files or
Redis: tests of those use the real things.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from tollway.core import commands as cmd
from tollway.core.decide import Fetch, Loaded, Replay, Write, decide, outcome
from tollway.core.events import BillingCommit, Event
from tollway.core.history import apply_answering, fold_entry, response_after
from tollway.core.ids import UlidGenerator
from tollway.core.ledger import Ledger
from tollway.core.state import Entry, State, Transition
from tollway.core.validate import validate
from tollway.wal import codec


class FakeClock:
    """A millisecond clock that moves only when told to."""

    def __init__(self, start_ms: int = 1_767_225_600_000) -> None:  # 2026-01-01T00:00:00Z
        self.now = start_ms

    def __call__(self) -> int:
        """The current time in milliseconds."""
        return self.now

    def advance(self, ms: int) -> int:
        """Move forward by ``ms`` and return the new time."""
        if ms < 0:
            raise ValueError("a clock does not go back")
        self.now += ms
        return self.now


@dataclass
class RecordingObserver:
    """Remembers everything the engine reported."""

    transitions: list[tuple[Event, Transition]] = field(default_factory=list)
    refusals: list[tuple[str, str]] = field(default_factory=list)
    batches: list[tuple[int, int]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    recoveries: list[tuple[int, int]] = field(default_factory=list)

    def transitioned(self, changes: Sequence[tuple[Event, Transition]]) -> None:
        """Record the state changes of a batch."""
        self.transitions.extend(changes)

    def refused(self, command: str, code: str) -> None:
        """Record a refusal."""
        self.refusals.append((command, code))

    def wal_batch(self, records: int, size_bytes: int, sync_seconds: float) -> None:
        """Record a batch's record count and size."""
        self.batches.append((records, size_bytes))

    def command_done(self, command: str, seconds: float) -> None:
        """Record a completed command."""
        self.commands.append(command)

    def recovered(self, events: int, seconds: float, from_snapshot: int) -> None:
        """Record a recovery."""
        self.recoveries.append((events, from_snapshot))


class MemoryEngine:
    """The engine's decision path, synchronous, with the log in memory. Nothing is durable."""

    def __init__(self, policy: cmd.Policy | None = None, clock: FakeClock | None = None, seed: int = 0) -> None:
        self.policy = policy or cmd.Policy()
        self.clock = clock or FakeClock()
        self.state = State()
        self.events: list[Event] = []
        self._ids = UlidGenerator(self.clock, lambda: seed)

    def execute(self, command: cmd.Command) -> cmd.Outcome:
        """Validate, decide and apply ``command``; the same answers the real engine gives."""
        command = validate(command)
        now_ms = self.clock()
        loaded: dict[str, Loaded] = {}
        decision = decide(self.state, command, now_ms, self.policy, self._ids.new, loaded=loaded)
        while isinstance(decision, Fetch):  # a settled entry: read it back from the log in memory
            loaded[decision.billing_entry_id] = Loaded(decision.record, *self._fold_back(decision.sequences))
            decision = decide(self.state, command, now_ms, self.policy, self._ids.new, loaded=loaded)
        if isinstance(decision, cmd.Refusal):
            return decision
        read_back = loaded.get(decision.billing_entry_id) if isinstance(decision, Write) else None
        if isinstance(decision, Replay):
            result = decision.outcome
            if isinstance(result, cmd.EntryResult) and result.entry.billing_entry_id in loaded:
                return msgspec.structs.replace(
                    result, response_json=loaded[result.entry.billing_entry_id].response_json
                )
            return result
        events = [
            Event(self.state.last_sequence + 1 + i, now_ms, decision.billing_entry_id, decision.correlation_id, payload)
            for i, payload in enumerate(decision.payloads)
        ]
        for event in events:
            codec.encode(event)  # the real engine refuses what its log could not hold, before anything changes
        response_json = self.state.responses.get(decision.billing_entry_id)
        if read_back is not None:
            response_json = read_back.response_json
        entry: Entry | None = None
        previous = None if read_back is None else read_back.entry
        for event in events:
            _, entry = apply_answering(self.state, event, previous, entry)
            self.events.append(event)
        return outcome(self.state, decision, command, entry, response_json)

    def read_entry(self, billing_entry_id: str) -> tuple[Entry, str | None] | None:
        """An entry and its stored response; a settled one read back from the log in memory."""
        entry = self.state.entries.get(billing_entry_id)
        if entry is not None:
            return entry, self.state.responses.get(billing_entry_id)
        record = self.state.settled.get(billing_entry_id)
        if record is None:
            return None
        return self._fold_back(record.seqs)

    def _fold_back(self, sequences: Sequence[int]) -> tuple[Entry, str | None]:
        """A settled entry folded from its events in the log in memory, with the response after its commit."""
        events = [self.events[seq - 1] for seq in sequences]
        for event in list(events):
            if isinstance(event.payload, BillingCommit) and event.wal_sequence < len(self.events):
                response = response_after(event, self.events[event.wal_sequence])
                events += [] if response is None else [response]
        return fold_entry(sorted(events, key=lambda event: event.wal_sequence))

    def fold(self) -> State:
        """A fresh fold of the log: what a replay after a crash would rebuild."""
        return fold(self.events)

    def ledger(self) -> Ledger:
        """The ledger the log produces."""
        return Ledger().post_all(self.events)


def fold(events: Iterable[Event]) -> State:
    """The state a sequence of events produces."""
    state = State()
    for event in events:
        state.apply(event)
    return state
