"""The observer port: how the engine reports what it did, without knowing who listens.

Metrics and structured logs implement :class:`Observer` (in ``tollway.metrics``); tests use
the recording observer of ``tollway.testing``; :class:`NoopObserver` costs nothing. Calls are
made on the engine's event loop after an event is applied, so an observer must be quick and
must never raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tollway.core.events import Event
from tollway.core.state import Transition


class Observer(Protocol):
    """What the engine tells the outside world."""

    def transitioned(self, changes: Sequence[tuple[Event, Transition]]) -> None:
        """Entries changed state (or, for an extend, expiry) in one durable batch, in sequence order."""

    def refused(self, command: str, code: str) -> None:
        """A command was refused with ``code``; nothing was written."""

    def wal_batch(self, records: int, size_bytes: int, sync_seconds: float) -> None:
        """A group-commit batch reached disk."""

    def command_done(self, command: str, seconds: float) -> None:
        """A command was answered after ``seconds`` (decide to durable)."""

    def recovered(self, events: int, seconds: float, from_snapshot: int) -> None:
        """Startup replayed ``events`` events after the snapshot at ``from_snapshot``."""


class NoopObserver:
    """An observer that ignores everything."""

    def transitioned(self, changes: Sequence[tuple[Event, Transition]]) -> None:
        """Ignore."""

    def refused(self, command: str, code: str) -> None:
        """Ignore."""

    def wal_batch(self, records: int, size_bytes: int, sync_seconds: float) -> None:
        """Ignore."""

    def command_done(self, command: str, seconds: float) -> None:
        """Ignore."""

    def recovered(self, events: int, seconds: float, from_snapshot: int) -> None:
        """Ignore."""
