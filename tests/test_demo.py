"""``tollway demo``: a small run of the whole loop ends clean, and its own tally agrees with the audit."""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tollway import EntryState, Settings
from tollway.cli import app
from tollway.cli.demo import WORKER_LOGGER, quiet_worker_logs
from tollway.core.ledger import FUNDING
from tollway.demo import DemoOptions, run_demo
from tollway.demo.dashboard import BILLING_COLUMNS, SETTLEMENT_COLUMNS, Dashboard, Snapshot

S = EntryState


async def test_small_demo_is_clean_and_consistent(tmp_path: Path) -> None:
    """What the gateways counted (commits, releases, expiries, mints) is what the audit finds, all settled."""
    options = DemoOptions(accounts=4, operations=300, seed=7, gateways=8)
    console = Console(file=io.StringIO(), width=120)
    result = await run_demo(Settings(data_dir=tmp_path / "demo"), options, console)
    tally, states = result.tally, result.audit.entries_by_state
    assert [] == result.audit.problems
    assert result.ok
    assert 300 == tally.operations
    assert 0 == states[S.RESERVE_HELD]
    assert tally.committed + tally.charged == states[S.FINALIZE_ACKED]  # settlement mode: every charge settled
    assert (0, 0, 0) == (states[S.FINALIZE_PENDING], states[S.FINALIZE_FAILED], states[S.COMMITTED])
    assert tally.released + result.expired == states[S.RELEASED]
    assert tally.abandoned == result.expired
    assert tally.holds + tally.charged == sum(states.values())
    assert -tally.minted_micro == result.audit.balances_micro[FUNDING]
    assert states[S.FINALIZE_ACKED] == result.settlement.finalized
    assert ["wal", "conservation", "snapshot", "redis", "settlement"] == [s.name for s in result.audit.sections]
    assert ["mint", "traffic", "outage", "recovery", "drain"] == [phase.name for phase in result.phases]
    assert result.audit.last_sequence == sum(phase.events for phase in result.phases)


def test_demo_command_small_run_exits_zero(tmp_path: Path) -> None:
    """The CLI demo on a new directory prints the report and exits 0 on a clean verdict."""
    data_dir = tmp_path / "demo"
    args = ["demo", "--data-dir", str(data_dir), "--accounts", "3", "--operations", "120", "--gateways", "4"]
    result = CliRunner().invoke(app, args, terminal_width=160)
    assert 0 == result.exit_code
    assert "Verdict: CLEAN" in result.output
    assert "Throughput (measured" in result.output
    assert "Settlement (the simulator" in result.output
    assert (data_dir / "wal").is_dir()


def test_demo_refuses_a_directory_with_data(tmp_path: Path) -> None:
    """The demo never writes into a directory that already holds something: exit 2, one line."""
    (tmp_path / "precious.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["demo", "--data-dir", str(tmp_path), "--operations", "10"])
    assert 2 == result.exit_code
    assert f"tollway: error: the demo needs an empty data directory; {tmp_path} is not empty\n" == result.stderr


def test_demo_removes_its_temporary_directory_after_a_clean_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --data-dir a clean demo leaves nothing in the temp directory and says how to keep the data."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    args = ["demo", "--accounts", "3", "--operations", "120", "--gateways", "4"]
    result = CliRunner().invoke(app, args, terminal_width=160)
    assert (0, []) == (result.exit_code, list(tmp_path.iterdir()))
    assert "demo --data-dir DIR` keeps it" in result.output


def _snapshot(**changes: int) -> Snapshot:
    numbers = {"operations": 1_234_567, "refusals": 12_345, "events": 9_876_543, "pending": 0, "acked": 1_234_567}
    numbers |= {"dead_letters": 0, "held": 0, "projection_lag": 12_345, "finalized": 1_234_567} | changes
    return Snapshot(breaker="HALF_OPEN", **numbers)


def _rendered(dashboard: Dashboard, snapshot: Snapshot) -> str:
    console = Console(file=io.StringIO(), width=80)
    console.print(dashboard.render(snapshot))
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def test_the_live_table_fits_80_columns() -> None:
    """At 80 columns every header is whole and no line is longer, even with large numbers."""
    dashboard = Dashboard(Console(file=io.StringIO()), "http://127.0.0.1:54321")
    dashboard.phase = "traffic"
    text = _rendered(dashboard, _snapshot())
    headers = [*BILLING_COLUMNS, *SETTLEMENT_COLUMNS]
    assert ([], []) == (
        [line for line in text.splitlines() if len(line) > 80],
        [header for header in headers if header not in text],
    )


def test_the_drain_says_what_it_still_waits_for() -> None:
    """The drain names the charges still to settle, and mentions holds only while some are left."""
    dashboard = Dashboard(Console(file=io.StringIO()), "http://127.0.0.1:1")
    dashboard.phase = "drain"
    settling, both = (" ".join(_rendered(dashboard, _snapshot(pending=3, held=h)).split()) for h in (0, 2))
    expected = "waiting for 3 charges to settle and 2 abandoned holds to expire"
    assert (True, False, True) == ("waiting for 3 charges to settle" in settling, "hold" in settling, expected in both)


def test_the_demo_keeps_the_worker_quiet_but_for_errors(caplog: pytest.LogCaptureFixture) -> None:
    """Inside the demo a failed settlement call's warning is not logged (an alert is); the level comes back after."""
    caplog.set_level(logging.INFO)
    worker_log = logging.getLogger(WORKER_LOGGER)
    with quiet_worker_logs():
        worker_log.warning("settlement call failed")
        worker_log.error("ALERT finalize_poison")
    worker_log.warning("after the demo")
    assert ["ALERT finalize_poison", "after the demo"] == [r.getMessage() for r in caplog.records]
