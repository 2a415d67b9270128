"""Fakes shipped with tollway for tests (yours and ours).

A clock, an observer that records, and an in-memory log that folds events exactly like the
engine does.

They replace only what is pure or observational. Nothing here imitates the WAL's files or
Redis: tests of those use the real things.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tollway.core.events import Event
from tollway.core.ledger import Ledger
from tollway.core.state import State, Transition


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

    def transition(self, event: Event, change: Transition) -> None:
        """Record a state change."""
        self.transitions.append((event, change))

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


@dataclass
class MemoryLog:
    """Events kept in a list, folded into a :class:`State` and a :class:`Ledger`."""

    events: list[Event] = field(default_factory=list)

    def extend(self, events: Iterable[Event]) -> None:
        """Append events (as an engine listener would receive them)."""
        self.events.extend(events)

    def fold(self) -> State:
        """The state these events produce."""
        state = State()
        for event in self.events:
            state.apply(event)
        return state

    def ledger(self) -> Ledger:
        """The ledger these events produce."""
        return Ledger().post_all(self.events)
