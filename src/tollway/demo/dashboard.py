"""The demo's live view: one table, refreshed a few times a second while the phases run.

It shows what an operator would watch: the phase, operations and refusals, WAL events and
their rate, charges waiting for settlement and confirmed by it, dead letters, holds, the
circuit breaker, the projection's lag and what the settlement simulator has finalized.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

PHASE_NOTES: Final = {
    "mint": "prepaid credit for every account",
    "traffic": "gateways reserve, commit, release, retry; the worker finalizes with settlement",
    "outage": "settlement answers 503: the breaker opens, billing goes on, charges queue up",
    "recovery": "settlement is back: one probe closes the breaker, the queue drains",
    "drain": "gateways stopped: waiting for settlement and the expiry of abandoned holds",
}
BILLING_COLUMNS: Final = ("operations", "refused", "WAL events", "events/s", "held")
SETTLEMENT_COLUMNS: Final = ("to settle", "settled", "dead", "breaker", "redis lag", "at settlement")
"""Two rows of columns, so the table fits an 80-column terminal."""
_BREAKER_STYLE: Final = {"CLOSED": "green", "OPEN": "bold red", "HALF_OPEN": "yellow"}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The numbers on screen at one moment."""

    operations: int
    refusals: int
    events: int
    pending: int
    acked: int
    dead_letters: int
    held: int
    breaker: str
    projection_lag: int
    finalized: int


class Dashboard:
    """A rich ``Live`` table fed by a snapshot function."""

    def __init__(self, console: Console, api_url: str) -> None:
        self.console = console
        self.api_url = api_url
        self.phase = "starting"
        self._started = time.monotonic()
        self._last: tuple[float, int] | None = None
        self._rate = 0

    @contextlib.asynccontextmanager
    async def live(self, snapshot: Callable[[], Snapshot], tick_s: float) -> AsyncIterator[None]:
        """Show the table until the block ends, refreshed every ``tick_s``."""
        with Live(self.render(snapshot()), console=self.console, refresh_per_second=8, transient=False) as live:
            task = asyncio.create_task(self._refresh(live, snapshot, tick_s))
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                live.update(self.render(snapshot()))

    async def _refresh(self, live: Live, snapshot: Callable[[], Snapshot], tick_s: float) -> None:
        while True:
            live.update(self.render(snapshot()))
            await asyncio.sleep(tick_s)

    def render(self, now: Snapshot) -> RenderableType:
        """The table for one snapshot."""
        self._update_rate(now.events)
        elapsed = time.monotonic() - self._started
        title = Text.assemble(("tollway demo", "bold"), f"  ·  API at {self.api_url}  ·  {elapsed:5.1f} s")
        phase = Text.assemble((f"{self.phase:<9}", "bold cyan"), "  ", self._note(now))
        billing = _table(BILLING_COLUMNS)
        billing.add_row(
            f"{now.operations:,}", f"{now.refusals:,}", f"{now.events:,}", f"{self._rate:,}", f"{now.held:,}"
        )
        settlement = _table(SETTLEMENT_COLUMNS)
        settlement.add_row(
            f"{now.pending:,}",
            f"{now.acked:,}",
            f"{now.dead_letters:,}",
            Text(now.breaker, style=_BREAKER_STYLE.get(now.breaker, "")),
            f"{now.projection_lag:,}",
            f"{now.finalized:,}",
        )
        return Group(title, phase, billing, settlement)

    def _note(self, now: Snapshot) -> str:
        """What the phase is doing; the drain says what it still waits for."""
        if self.phase != "drain":
            return PHASE_NOTES.get(self.phase, "")
        waits = [f"{now.pending:,} charges to settle"] if now.pending else []
        waits += [f"{now.held:,} abandoned holds to expire"] if now.held else []
        return "gateways stopped: waiting for " + " and ".join(waits) if waits else "gateways stopped: the late commits"

    def _update_rate(self, events: int) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last[0] >= 0.5:
            self._rate = int((events - self._last[1]) / (now - self._last[0]))
            self._last = (now, events)
        elif self._last is None:
            self._last = (now, events)


def _table(columns: tuple[str, ...]) -> Table:
    table = Table(show_edge=False, pad_edge=False, box=None)
    for column in columns:
        table.add_column(column, justify="right", min_width=len(column), no_wrap=True)
    return table
