"""The ``tollway`` command line: wal verify and inspect, audit, error handling and help."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_audit import ENTRY_1, RATE, mint_and_hold, run_traffic, write_log
from tollway import Engine, Settings
from tollway.cli import app
from tollway.cli.common import tollway_command
from tollway.core import events as ev
from tollway.housekeeping import archive_once
from tollway.testing import FakeClock

RECORDS = 9  # what run_traffic writes
FIRST_SEGMENT = "wal-00000000000000000001.seg"


@pytest.fixture
def runner() -> CliRunner:
    """Runs the typer app in-process, with stdout and stderr kept apart."""
    return CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data directory with a small, sound log written by the engine."""
    settings = Settings(data_dir=tmp_path / "data")
    asyncio.run(run_traffic(settings, FakeClock()))
    return settings.data_dir


def test_verify_sound_log(runner: CliRunner, data_dir: Path) -> None:
    """A sound log verifies with exit 0 and its record count and last sequence."""
    result = runner.invoke(app, ["wal", "verify", "--data-dir", str(data_dir)])
    assert 0 == result.exit_code
    assert f"WAL sound: 1 segment(s), {RECORDS} record(s), last sequence {RECORDS}\n" == result.output


def test_verify_flipped_byte_names_segment_and_offset(runner: CliRunner, data_dir: Path) -> None:
    """A flipped byte in the first record (valid records follow) fails with its segment and byte offset."""
    segment = data_dir / "wal" / FIRST_SEGMENT
    data = bytearray(segment.read_bytes())
    data[16 + 30] ^= 0x40  # inside the body of the first record, which starts after the 16-byte header
    segment.write_bytes(bytes(data))
    result = runner.invoke(app, ["wal", "verify", "--data-dir", str(data_dir)])
    assert 1 == result.exit_code
    assert f"(segment {FIRST_SEGMENT}, byte offset 16)" in result.output


def test_verify_reports_a_torn_tail_and_passes(runner: CliRunner, data_dir: Path) -> None:
    """A torn tail is reported with its offset but is not a failure: the engine cuts it."""
    segment = data_dir / "wal" / FIRST_SEGMENT
    size = segment.stat().st_size
    with segment.open("ab") as file:
        file.write(b"\x00\x00")
    result = runner.invoke(app, ["wal", "verify", "--data-dir", str(data_dir)])
    assert 0 == result.exit_code
    assert f"torn tail: {FIRST_SEGMENT} at byte offset {size}" in result.output


def test_inspect_text_prints_one_line_per_record(runner: CliRunner, data_dir: Path) -> None:
    """Text inspect prints one line per record with its sequence, type and money fields."""
    result = runner.invoke(app, ["wal", "inspect", "--data-dir", str(data_dir)])
    lines = result.output.splitlines()
    assert 0 == result.exit_code
    assert RECORDS == len(lines)
    assert ["1", "credit_mint"] == [lines[0].split()[0], lines[0].split()[2]]
    assert "amount_micro=1000000" in lines[0]
    assert "reason=refund admin_id=admin-1" in lines[7]


def test_inspect_json_lines_with_from_seq_and_limit(runner: CliRunner, data_dir: Path) -> None:
    """JSON inspect prints parseable records from --from-seq, at most --limit, money as strings."""
    result = runner.invoke(
        app, ["wal", "inspect", "--data-dir", str(data_dir), "--from-seq", "3", "--limit", "3", "--json"]
    )
    records = [json.loads(line) for line in result.output.splitlines()]
    assert 0 == result.exit_code
    assert [3, 4, 5] == [record["wal_sequence"] for record in records]
    assert ["billing_reserve", "billing_reserve", "billing_commit"] == [record["event_type"] for record in records]
    assert "40000" == records[0]["payload"]["estimated_cost_micro"]
    assert "25000" == records[2]["payload"]["charged_micro"]


def test_audit_clean_exits_zero(runner: CliRunner, data_dir: Path) -> None:
    """A clean data directory audits with exit 0 and a clean verdict."""
    result = runner.invoke(app, ["audit", "--data-dir", str(data_dir), "--per-account"])
    assert 0 == result.exit_code
    assert "Verdict: CLEAN" in result.output
    assert "user:acct-1:held" in result.output


def test_audit_dirty_exits_nonzero_naming_the_problem(runner: CliRunner, tmp_path: Path) -> None:
    """A log whose commit settles more than was held fails the audit and names the event."""
    records = [
        *mint_and_hold("acct-1", 1_000, 300),
        (ENTRY_1, ev.BillingCommit("acct-1", 500, 500, 500, 0, "debit_available", False, RATE)),
    ]
    write_log(tmp_path / "wal", records)
    result = runner.invoke(app, ["audit", "--data-dir", str(tmp_path)], terminal_width=200)
    assert 1 == result.exit_code
    assert "seq 3: user:acct-1:held went negative" in result.output
    assert "PROBLEM(S)" in result.output


def test_missing_data_dir_is_one_line_exit_two(runner: CliRunner, tmp_path: Path) -> None:
    """A data directory without a WAL is a one-line error on stderr and exit code 2."""
    result = runner.invoke(app, ["audit", "--data-dir", str(tmp_path / "nowhere")])
    assert 2 == result.exit_code
    assert "" == result.stdout
    assert 1 == len(result.stderr.splitlines())
    assert result.stderr.startswith("tollway: error: no WAL in ")


def test_unknown_setting_is_a_clean_error(runner: CliRunner, data_dir: Path, tmp_path: Path) -> None:
    """An unknown setting in the TOML file stops the command with exit 2 and names the setting."""
    config = tmp_path / "tollway.toml"
    config.write_text("bogus_setting = 1\n")
    result = runner.invoke(app, ["wal", "verify", "--data-dir", str(data_dir), "--config", str(config)])
    assert 2 == result.exit_code
    assert "tollway: error: unknown setting(s): bogus_setting\n" == result.stderr


@pytest.mark.parametrize("command", [["wal", "verify"], ["wal", "inspect"], ["audit"], ["demo"]])
def test_every_command_has_help(runner: CliRunner, command: list[str]) -> None:
    """Every command answers --help with its usage and --data-dir option."""
    result = runner.invoke(app, [*command, "--help"], terminal_width=200)
    assert 0 == result.exit_code
    assert f"Usage: tollway {' '.join(command)} [OPTIONS]" in result.output
    assert "--data-dir" in result.output


def test_console_script_exit_code_in_a_real_process(tmp_path: Path) -> None:
    """Run as a process, a typed error is one stderr line and exit 2, with no traceback."""
    completed = subprocess.run(
        [sys.executable, "-m", "tollway.cli", "wal", "verify", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert 2 == completed.returncode
    assert f"tollway: error: no WAL in {tmp_path} (expected {tmp_path / 'wal'})\n" == completed.stderr


def test_inspect_text_shows_how_many_entries_an_archive_drops(runner: CliRunner, tmp_path: Path) -> None:
    """A list in a payload (an archive's entries) shows as its length in the text form."""
    settings = Settings(data_dir=tmp_path / "data", entry_retention_hours=24)
    clock = FakeClock()

    async def archive() -> int:
        await run_traffic(settings, clock)
        clock.advance(25 * 3_600_000)
        async with Engine.open(settings=settings, clock=clock) as engine:
            return (await archive_once(engine)).entries

    archived = asyncio.run(archive())
    result = runner.invoke(
        app, ["wal", "inspect", "--data-dir", str(settings.data_dir), "--from-seq", str(RECORDS + 1)]
    )
    assert 0 == result.exit_code
    [line] = result.output.splitlines()
    assert archived > 0
    assert "entries_archived" == line.split()[2]
    assert f"entries=[{archived}]" in line.split()


def test_hints_name_the_script_when_tollway_is_not_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the environment is activated, hints say ``.venv/bin/tollway``; once it is on PATH, ``tollway``."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [".venv/bin/tollway", "demo"])
    before = tollway_command()
    script = tmp_path / "tollway"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert (".venv/bin/tollway", "tollway") == (before, tollway_command())


def test_a_dead_url_is_named_with_a_hint(runner: CliRunner) -> None:
    """A service that is not there: the error names the whole URL and how to point elsewhere."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the block ends: nobody listens there
    result = runner.invoke(app, ["accounts", "balance", "acct-1", "--url", f"http://127.0.0.1:{port}", "--token", "t"])
    url = f"http://127.0.0.1:{port}/v1/accounts/acct-1"
    assert (2, True, True) == (result.exit_code, url in result.stderr, "give --url or TOLLWAY_URL" in result.stderr)
