"""The audit: prove from the files alone that no micro-dollar was created or lost.

:func:`audit` reads a data directory and folds its WAL twice, independently: into the
double-entry :class:`~tollway.core.ledger.Ledger` (posting rules only) and into a
:class:`~tollway.core.state.State` (the engine's own ``apply``). It then checks, in named
sections:

- ``wal`` — every segment and record is sound (a torn tail is noted, not a problem: recovery
  cuts it);
- ``conservation`` — every event's postings sum to zero, no user balance went negative, each
  account's held, unsettled and charged balances equal the sums of its entries, and the two
  folds agree (:func:`~tollway.core.ledger.check_invariants`);
- ``snapshot`` — the newest snapshot equals the fold of the WAL prefix up to its sequence.

It is strictly read-only: it takes no lock, truncates nothing and writes nothing, so it can
run beside a live engine (it then audits the log as of the moment it started) or on a copy.

The report is a list of :class:`Section` values; callers that can reach more than the files
(the Redis projection, the settlement service) add their own sections with
:meth:`AuditReport.with_section` and the verdict covers them too. This module knows nothing
about Redis, HTTP or the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from tollway.config import Settings
from tollway.core.errors import InvariantViolation
from tollway.core.events import EntriesArchived, Event
from tollway.core.ledger import CREDIT_NOTES, FUNDING, REVENUE, Ledger, check_invariants
from tollway.core.lifecycle import EntryState
from tollway.core.money import format_usd
from tollway.core.state import Snapshot, State
from tollway.wal.replay import gc_paused
from tollway.wal.segments import VerifyReport, verify
from tollway.wal.snapshot import LoadedSnapshot, load_newest

SYSTEM_ACCOUNTS = (FUNDING, CREDIT_NOTES, REVENUE)
USERS_AVAILABLE = "user:*:available"
USERS_HELD = "user:*:held"
PROBLEMS_KEPT_MAX = 100
_DIFF_KEYS_SHOWN = 3


@dataclass(frozen=True, slots=True)
class Section:
    """One named group of checks: the problems it found and informational notes.

    At most :data:`PROBLEMS_KEPT_MAX` problems are kept (a broken log can break a rule at every
    later event); the last one then says how many more there were.
    """

    name: str
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.problems) > PROBLEMS_KEPT_MAX:
            more = len(self.problems) - PROBLEMS_KEPT_MAX + 1
            kept = (*self.problems[: PROBLEMS_KEPT_MAX - 1], f"… and {more:,} more problem(s)")
            object.__setattr__(self, "problems", kept)

    @property
    def ok(self) -> bool:
        """No problem in this section."""
        return not self.problems


@dataclass(frozen=True, slots=True)
class AuditReport:
    """What the audit found. ``ok`` is the verdict over every section."""

    data_dir: Path
    segments: int
    records: int
    last_sequence: int
    torn_tail: str | None
    snapshot_sequence: int | None
    entries_by_state: dict[EntryState, int]
    balances_micro: dict[str, int]  # ledger account → balance folded from the WAL (zeros omitted)
    uncollected_micro: int  # overruns the policy could not collect, over every entry
    sections: tuple[Section, ...]
    state: State = field(repr=False, compare=False)  # the fold, for sections added by callers
    # Archived FINALIZE_ACKED entries (id → charged), for the settlement comparison: the state forgot them.
    archived_acked: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """Every section is free of problems."""
        return all(section.ok for section in self.sections)

    @property
    def problems(self) -> list[str]:
        """Every problem, prefixed with its section's name."""
        return [f"{section.name}: {problem}" for section in self.sections for problem in section.problems]

    def with_section(self, section: Section) -> AuditReport:
        """A copy with one more section (e.g. a Redis or settlement comparison)."""
        return dataclasses.replace(self, sections=(*self.sections, section))

    def totals_micro(self) -> dict[str, int]:
        """Balances with the user accounts summed: system accounts, all available, all held."""
        totals = {name: self.balances_micro.get(name, 0) for name in SYSTEM_ACCOUNTS}
        totals[USERS_AVAILABLE] = sum(v for k, v in self.balances_micro.items() if k.endswith(":available"))
        totals[USERS_HELD] = sum(v for k, v in self.balances_micro.items() if k.endswith(":held"))
        return totals


class _Fold:
    """The two independent folds of the log (ledger and state), fed one event at a time.

    The snapshot, when there is one, is compared with the state at its sequence on the way.
    """

    def __init__(self, snapshot: LoadedSnapshot | None) -> None:
        self.state = State()
        self.ledger = Ledger()
        self.apply_failure: str | None = None  # the state refused an event: it folded no further
        self.snapshot_problems: list[str] | None = None  # None: the snapshot's sequence was never reached
        self._snapshot = snapshot
        self.archived_acked: dict[str, int] = {}
        if snapshot is not None and snapshot.sequence == 0:  # a snapshot of the empty state
            self.snapshot_problems = _snapshot_differences(self.state, snapshot.state.to_snapshot())

    def post(self, event: Event) -> None:
        """Fold one event into both."""
        self.ledger.post(event)
        if self.apply_failure is not None:
            return
        try:
            if isinstance(event.payload, EntriesArchived):
                self._remember_archived(event.payload)
            change = self.state.apply(event)
            if change is not None and change.to_state is EntryState.FINALIZE_ACKED:
                self.archived_acked[event.billing_entry_id] = change.entry.charged_micro
        except InvariantViolation as exc:
            self.apply_failure = f"seq {event.wal_sequence} ({event.event_type}): {exc}"
            return
        snapshot = self._snapshot
        if snapshot is not None and event.wal_sequence == snapshot.sequence:
            self.snapshot_problems = _snapshot_differences(self.state, snapshot.state.to_snapshot())

    def _remember_archived(self, payload: EntriesArchived) -> None:
        """Acknowledged entries kept whole (from an older snapshot) are remembered when archived."""
        for item in payload.entries:
            entry = self.state.entries.get(item.billing_entry_id)
            if entry is not None and entry.state is EntryState.FINALIZE_ACKED:
                self.archived_acked[entry.billing_entry_id] = entry.charged_micro


def audit(data_dir: Path | str) -> AuditReport:
    """Audit the data directory ``data_dir`` without changing anything in it."""
    layout = Settings(data_dir=Path(data_dir))
    with gc_paused():
        # The snapshot is read before the log, so a live engine cannot make it look newer than the log.
        snapshot = load_newest(layout.snapshot_dir)
        fold = _Fold(snapshot if snapshot.path is not None else None)
        verified = verify(layout.wal_dir, sink=fold.post)  # one pass: check, post and apply
    wal = _wal_section(verified)
    state = fold.state
    return AuditReport(
        data_dir=Path(data_dir),
        segments=verified.segments,
        records=verified.records,
        last_sequence=verified.last_seq,
        torn_tail=verified.torn_tail,
        snapshot_sequence=snapshot.sequence if snapshot.path is not None else None,
        entries_by_state=_count_states(state),
        balances_micro=_ordered_balances(fold.ledger),
        uncollected_micro=state.archived_uncollected_micro
        + sum(entry.uncollected_micro for entry in state.entries.values()),
        sections=(wal, _conservation_section(fold), _snapshot_section(snapshot, fold, verified.last_seq, wal.ok)),
        state=state,
        archived_acked=fold.archived_acked,
    )


def _wal_section(verified: VerifyReport) -> Section:
    notes = [
        f"{verified.segments} segment(s); {verified.records:,} record(s) verified, last sequence {verified.last_seq}"
    ]
    if verified.torn_tail is not None:
        notes.append(f"torn tail in {verified.torn_tail}: the engine cuts it at its next start")
    problems = () if verified.problem is None else (str(verified.problem),)
    return Section("wal", problems, tuple(notes))


def _conservation_section(fold: _Fold) -> Section:
    if fold.apply_failure is not None:
        # The state stopped at a refused event; comparing it with the ledger would only add noise.
        problems = [f"the state fold refused an event at {fold.apply_failure}", *fold.ledger.problems]
        return Section("conservation", tuple(problems), ("later events were not checked",))
    problems = check_invariants(fold.state, fold.ledger)
    total = fold.ledger.total()
    if total != 0:
        problems.append(f"the ledger sums to {total}, not zero")
    notes = (f"{fold.ledger.last_sequence:,} event(s) folded; the ledger sums to {total}",)
    return Section("conservation", tuple(problems), notes)


def _snapshot_section(snapshot: LoadedSnapshot, fold: _Fold, last_seq: int, log_whole: bool) -> Section:
    notes = [f"skipped damaged snapshot {reason} (recovery skips it too)" for reason in snapshot.skipped]
    if snapshot.path is None:
        return Section("snapshot", (), (*notes, "no snapshot: recovery replays the whole log"))
    name = snapshot.path.name
    if snapshot.sequence > last_seq and log_whole:
        problem = f"{name} is at sequence {snapshot.sequence}, beyond the end of the log ({last_seq})"
        return Section("snapshot", (problem,), tuple(notes))
    if fold.snapshot_problems is None:
        return Section("snapshot", (), (*notes, f"{name} not compared: the fold stopped before it"))
    if fold.snapshot_problems:
        return Section("snapshot", tuple(f"{name}: {p}" for p in fold.snapshot_problems), tuple(notes))
    return Section("snapshot", (), (*notes, f"{name} equals the fold of the log at sequence {snapshot.sequence}"))


def _snapshot_differences(state: State, stored: Snapshot) -> list[str]:
    """How the snapshot differs from the fold at the same sequence, field by field."""
    folded = state.to_snapshot()
    problems: list[str] = []
    for name in Snapshot.__struct_fields__:
        mine, theirs = getattr(folded, name), getattr(stored, name)
        if mine == theirs:
            continue
        if isinstance(mine, dict) and isinstance(theirs, dict):
            keys = sorted(str(k) for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            shown = ", ".join(keys[:_DIFF_KEYS_SHOWN]) + (", …" if len(keys) > _DIFF_KEYS_SHOWN else "")
            problems.append(f"{name} differ from the fold for {len(keys)} key(s): {shown}")
        else:
            problems.append(f"{name} is {theirs!r}, the fold says {mine!r}")
    return problems


def _count_states(state: State) -> dict[EntryState, int]:
    counts = state.state_counts()
    return {s: counts.get(s, 0) for s in EntryState if s is not EntryState.IDLE}


def _ordered_balances(ledger: Ledger) -> dict[str, int]:
    """Non-zero balances: system accounts first, then users by name."""
    system = {name: ledger.balances[name] for name in SYSTEM_ACCOUNTS if ledger.balances.get(name, 0)}
    users = {name: value for name, value in sorted(ledger.balances.items()) if value and name.startswith("user:")}
    return {**system, **users}


# -- presentation --------------------------------------------------------------------------


def money_table(report: AuditReport, *, per_account: bool = False) -> Table:
    """Money by ledger account, in MicroUSD and USD; user accounts summed unless ``per_account``."""
    table = Table(title="Money by ledger account", title_justify="left")
    table.add_column("ledger account")
    table.add_column("MicroUSD", justify="right")
    table.add_column("USD", justify="right")
    rows = report.balances_micro if per_account else report.totals_micro()
    for name, amount in rows.items():
        table.add_row(name, f"{amount:,}", format_usd(amount))
    total = sum(rows.values())
    table.add_row(Text("total (must be 0)", style="bold"), f"{total:,}", format_usd(total), end_section=True)
    return table


def states_table(report: AuditReport) -> Table:
    """Entries by lifecycle state."""
    table = Table(title="Entries by state", title_justify="left")
    table.add_column("state")
    table.add_column("entries", justify="right")
    for state, count in report.entries_by_state.items():
        table.add_row(state.value, f"{count:,}")
    archived = report.state.archived_entries
    if archived:
        table.add_row("archived (past retention)", f"{archived:,}")
    total = sum(report.entries_by_state.values()) + archived
    table.add_row(Text("total", style="bold"), f"{total:,}", end_section=True)
    return table


def verdict(report: AuditReport) -> RenderableType:
    """Each section with its notes and problems, then the verdict in one line."""
    lines: list[RenderableType] = []
    for section in report.sections:
        mark = Text("✓ ", style="green") if section.ok else Text("✗ ", style="bold red")
        lines.append(Text.assemble(mark, (section.name, "bold")))
        lines.extend(Text(f"    {note}", style="dim") for note in section.notes)
        lines.extend(Text(f"    {problem}", style="red") for problem in section.problems)
    if report.ok:
        lines.append(Text("Verdict: CLEAN — every micro-dollar is accounted for", style="bold green"))
    else:
        lines.append(Text(f"Verdict: {len(report.problems)} PROBLEM(S) — see above", style="bold red"))
    return Group(*lines)


def render(report: AuditReport, *, per_account: bool = False) -> RenderableType:
    """The whole report, as ``tollway audit`` prints it."""
    snapshot = "none" if report.snapshot_sequence is None else f"at sequence {report.snapshot_sequence}"
    header = Text(
        f"Audit of {report.data_dir}: {report.records:,} record(s) in {report.segments} segment(s), "
        f"last sequence {report.last_sequence}; snapshot {snapshot}; "
        f"uncollected overruns {format_usd(report.uncollected_micro)}"
    )
    return Group(header, states_table(report), money_table(report, per_account=per_account), verdict(report))
