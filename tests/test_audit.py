"""The audit: clean logs pass, crafted logs that break an invariant are named, nothing is written."""

from __future__ import annotations

from pathlib import Path

from tollway import (
    Charge,
    Commit,
    Credit,
    CreditKind,
    Engine,
    EntryResult,
    EntryState,
    Release,
    Reserve,
    Settings,
    Void,
)
from tollway.audit import Section, audit
from tollway.core import events as ev
from tollway.core.ledger import FUNDING, REVENUE, available, held
from tollway.core.money import format_usd
from tollway.testing import FakeClock
from tollway.wal import codec
from tollway.wal.log import WalWriter
from tollway.wal.snapshot import encode_snapshot, list_snapshots, load_newest, write_snapshot

T0_MS = 1_767_225_600_000
RATE = ev.RateSnapshot(100, 1_000_000, T0_MS)
ENTRY_1 = "01KDX00000000000000000000A"
ENTRY_2 = "01KDX00000000000000000000B"
MINT_ID = "01KDX00000000000000000000M"


async def run_traffic(settings: Settings, clock: FakeClock) -> None:
    """A little of everything: mint, commit, release, direct charge, void; then close (snapshot)."""
    async with Engine.open(settings=settings, clock=clock) as engine:
        await engine.execute(Credit("acct-1", "mint-1", CreditKind.MINT, 1_000_000))
        await engine.execute(Credit("acct-2", "mint-1", CreditKind.MINT, 500_000))
        held_1 = await engine.execute(Reserve("acct-1", "req-1", 40_000))
        held_2 = await engine.execute(Reserve("acct-2", "req-2", 30_000))
        assert isinstance(held_1, EntryResult)
        assert isinstance(held_2, EntryResult)
        await engine.execute(Commit(held_1.entry.billing_entry_id, 25_000))
        await engine.execute(Release(held_2.entry.billing_entry_id, "pre_stream_failure"))
        fee = await engine.execute(Charge("acct-2", "fee-1", 7_000))
        assert isinstance(fee, EntryResult)
        await engine.execute(Void(fee.entry.billing_entry_id, "refund", "admin-1"))
        await engine.execute(Reserve("acct-1", "req-3", 10_000))  # still held at the end


def write_log(wal_dir: Path, records: list[tuple[str, ev.Payload]]) -> None:
    """Write ``records`` as valid, checksummed WAL frames, whatever they mean."""
    wal_dir.mkdir(parents=True)
    events = [
        ev.Event(seq, T0_MS + seq, entry_id, "untraced", payload) for seq, (entry_id, payload) in enumerate(records, 1)
    ]
    writer = WalWriter(wal_dir, durable=False)
    writer.write_batch(b"".join(codec.encode(event) for event in events), 1)
    writer.close()


def mint_and_hold(account_id: str, minted: int, estimate: int) -> list[tuple[str, ev.Payload]]:
    """A mint followed by one hold (ENTRY_1) of ``estimate``."""
    return [
        (MINT_ID, ev.CreditMint(account_id, "mint-1", minted)),
        (ENTRY_1, ev.BillingReserve(account_id, "req-1", estimate, T0_MS + 300_000, RATE, f"reserve:{estimate}:")),
    ]


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` and its bytes."""
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


async def test_clean_log_passes_with_counts_and_balances(settings: Settings, clock: FakeClock) -> None:
    """A log written by the engine audits clean, with counts by state and money by ledger account."""
    await run_traffic(settings, clock)
    report = audit(settings.data_dir)
    assert [] == report.problems
    assert report.ok
    assert 9 == report.last_sequence
    assert 9 == report.snapshot_sequence
    assert {EntryState.COMMITTED: 1, EntryState.RELEASED: 1, EntryState.VOIDED: 1, EntryState.RESERVE_HELD: 1} == {
        state: count for state, count in report.entries_by_state.items() if count
    }
    assert -1_500_000 == report.balances_micro[FUNDING]
    assert 25_000 == report.balances_micro[REVENUE]
    assert 10_000 == report.balances_micro[held("acct-1")]
    assert 1_000_000 - 25_000 - 10_000 == report.balances_micro[available("acct-1")]
    assert 0 == sum(report.totals_micro().values())
    assert ["wal", "conservation", "snapshot"] == [section.name for section in report.sections]


async def test_commit_releasing_more_than_held_is_named(tmp_path: Path) -> None:
    """A commit that settles a larger estimate than was held: the audit names the event and the negative hold."""
    records = [
        *mint_and_hold("acct-1", 1_000, 300),
        (ENTRY_1, ev.BillingCommit("acct-1", 500, 500, 500, 0, "debit_available", False, RATE)),
    ]
    write_log(tmp_path / "wal", records)
    report = audit(tmp_path)
    assert not report.ok
    assert "conservation: the state fold refused an event at seq 3 (billing_commit)" in report.problems[0]
    assert "conservation: seq 3: user:acct-1:held went negative" in report.problems


async def test_void_refunding_more_than_charged_is_named(tmp_path: Path) -> None:
    """A void that refunds more than was charged balances in the ledger but breaks the account's charged sum."""
    records = [
        *mint_and_hold("acct-1", 1_000, 300),
        (ENTRY_1, ev.BillingCommit("acct-1", 300, 100, 100, 0, "debit_available", False, RATE)),
        (ENTRY_1, ev.BillingVoid("acct-1", 500, "refund", "admin-1", "COMMITTED")),
    ]
    write_log(tmp_path / "wal", records)
    report = audit(tmp_path)
    assert ["conservation: acct-1: charged is -400 but its entries sum to 0"] == report.problems


async def test_snapshot_that_disagrees_with_the_log_is_named(settings: Settings, clock: FakeClock) -> None:
    """A snapshot whose balances differ from the fold of the log at its sequence is a problem naming the account."""
    await run_traffic(settings, clock)
    loaded = load_newest(settings.snapshot_dir)
    loaded.state.accounts["acct-2"].available_micro += 1
    write_snapshot(settings.snapshot_dir, loaded.sequence, encode_snapshot(loaded.state), keep=2, durable=False)
    report = audit(settings.data_dir)
    name = list_snapshots(settings.snapshot_dir)[-1].name
    assert [f"snapshot: {name}: accounts differ from the fold for 1 key(s): acct-2"] == report.problems


async def test_audit_reads_only_and_notes_a_torn_tail(settings: Settings, clock: FakeClock) -> None:
    """A torn tail is noted but is not a problem, and the audit changes no byte on disk."""
    await run_traffic(settings, clock)
    segment = max(settings.wal_dir.glob("wal-*.seg"))
    with segment.open("ab") as file:
        file.write(b"\x01\x02\x03")  # a record header cut short by a crash
    before = files_of(settings.data_dir)
    report = audit(settings.data_dir)
    assert before == files_of(settings.data_dir)
    assert report.ok
    assert report.torn_tail is not None
    assert segment.name in report.torn_tail


async def test_audit_runs_beside_a_live_engine(engine: Engine) -> None:
    """The audit takes no lock: it reads the log while the engine owns the data directory."""
    await engine.execute(Credit("acct-1", "mint-1", CreditKind.MINT, 1_000))
    report = audit(engine.settings.data_dir)
    assert report.ok
    assert 1 == report.last_sequence
    assert report.snapshot_sequence is None


def test_an_added_section_joins_the_verdict(tmp_path: Path) -> None:
    """A section added later (e.g. a Redis comparison) makes the verdict fail when it has a problem."""
    report = audit(tmp_path)
    worse = report.with_section(Section("redis", problems=("acct-1 available differs",)))
    assert report.ok
    assert ["redis: acct-1 available differs"] == worse.problems
    assert not worse.ok


def test_format_usd_uses_integer_micro() -> None:
    """USD strings come from integer MicroUSD: six decimals, thousands separators, sign first."""
    assert ["$0.000000", "$1,234.567890", "-$0.000005"] == [format_usd(v) for v in (0, 1_234_567_890, -5)]


def test_a_section_keeps_at_most_a_hundred_problems() -> None:
    """A log broken early can break a rule at every later event: a section keeps 100 problems and counts the rest."""
    section = Section("conservation", problems=tuple(f"problem {i}" for i in range(150)))
    assert 100 == len(section.problems)
    assert ("problem 98", "… and 51 more problem(s)") == section.problems[-2:]
