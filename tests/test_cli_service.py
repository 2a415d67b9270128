"""The service's CLI: ``token issue``, ``--help`` of every command, and ``serve`` as a real process."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tollway import Settings
from tollway.api.auth import Authenticator, Scope
from tollway.cli import app

COMMANDS = [
    ["serve"],
    ["token", "issue"],
    ["wal", "verify"],
    ["wal", "inspect"],
    ["audit"],
    ["demo"],
    ["settlement-sim"],
    ["accounts", "balance"],
    ["accounts", "mint"],
    ["accounts", "history"],
    ["dlq", "list"],
    ["dlq", "replay"],
]
SERVE_START_TIMEOUT_S = 30.0
SERVE_STOP_TIMEOUT_S = 30.0


@pytest.fixture
def runner() -> CliRunner:
    """Runs the typer app in-process."""
    return CliRunner()


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(runner: CliRunner, command: list[str]) -> None:
    """``--help`` of each command exits 0 and shows its usage."""
    result = runner.invoke(app, [*command, "--help"])
    assert (0, True) == (result.exit_code, f"Usage: tollway {' '.join(command)}" in result.output)


@pytest.mark.parametrize("command", [[], *COMMANDS], ids=lambda command: " ".join(command) or "tollway")
def test_help_shows_no_type_beside_flags(runner: CliRunner, command: list[str]) -> None:
    """A flag takes no value: ``--help``, ``--json`` and the like show no ``<bool>`` in the help table."""
    result = runner.invoke(app, [*command, "--help"], terminal_width=100)
    assert (0, False) == (result.exit_code, "<bool>" in result.output)


def test_version_prints_the_installed_version(runner: CliRunner) -> None:
    """``tollway --version`` prints the package's version and exits 0."""
    result = runner.invoke(app, ["--version"])
    assert (0, f"tollway {importlib.metadata.version('tollway')}\n") == (result.exit_code, result.output)


def test_token_issue_prints_a_token_the_service_accepts(runner: CliRunner, tmp_path: Path) -> None:
    """The printed token verifies with the data directory's key, with the scope, accounts and subject asked for."""
    data = tmp_path / "data"
    args = ["token", "issue", "--data-dir", str(data), "--scope", "gateway", "--accounts", "team-a:*,solo"]
    result = runner.invoke(app, [*args, "--ttl-s", "60", "--subject", "gw-1", "--new-key"])
    assert 0 == result.exit_code, result.output
    token = result.stdout.strip()
    principal = Authenticator.from_settings(Settings(data_dir=data)).authenticate(token)
    assert ("gw-1", frozenset({Scope.GATEWAY, Scope.READ})) == (principal.subject, principal.scopes)
    assert [True, True, False] == [principal.accounts.allows(a) for a in ("team-a:1", "solo", "team-b:1")]


def test_token_issue_refuses_a_directory_without_tollway_data(runner: CliRunner, tmp_path: Path) -> None:
    """A mistyped --data-dir (no WAL, no key) is refused, naming the cause, and no key is created there."""
    typo = tmp_path / "tollway-dat"
    result = runner.invoke(app, ["token", "issue", "--data-dir", str(typo), "--scope", "gateway"])
    assert (2, True, False) == (result.exit_code, "is --data-dir right?" in result.stderr, typo.exists())


def test_an_unusable_data_directory_is_named_with_the_fix(runner: CliRunner, tmp_path: Path) -> None:
    """A data directory that cannot be created is one line naming it and --data-dir, not a raw errno."""
    (tmp_path / "a-file").write_text("")
    data = tmp_path / "a-file" / "data"
    result = runner.invoke(app, ["token", "issue", "--data-dir", str(data), "--scope", "admin", "--new-key"])
    expected = f"tollway: error: cannot use the data directory {data}: Not a directory; give --data-dir"
    assert (2, True) == (result.exit_code, result.stderr.startswith(expected))


def test_token_issue_refuses_an_unknown_scope(runner: CliRunner, tmp_path: Path) -> None:
    """An unknown scope is one error line and exit 2."""
    result = runner.invoke(app, ["token", "issue", "--data-dir", str(tmp_path), "--scope", "root"])
    assert (2, True) == (result.exit_code, "tollway: error: --scope must be among" in result.stderr)


def _clean_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("TOLLWAY_")}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, dict[str, str]]]:
    """``tollway serve`` on a free port: the process, its data directory, and what it printed (tokens, url)."""
    data = tmp_path / "data"
    command = [
        sys.executable,
        "-m",
        "tollway.cli",
        "serve",
        "--data-dir",
        str(data),
        "--port",
        "0",
        "--log-level",
        "warning",
    ]
    with (tmp_path / "stderr.log").open("w") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=_clean_environment())
        try:
            yield process, data, _read_startup(process)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            assert process.stdout is not None
            process.stdout.close()


def _read_startup(process: subprocess.Popen[str]) -> dict[str, str]:
    """The admin and gateway tokens and the URL, from the first lines of stdout."""
    assert process.stdout is not None
    found: dict[str, str] = {}
    deadline = time.monotonic() + SERVE_START_TIMEOUT_S
    label = ""
    while "url" not in found and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if label:
            found[label], label = line.strip(), ""
        elif "admin token" in line or "gateway token" in line:
            label = "admin" if "admin token" in line else "gateway"
        elif "serving on " in line:
            found["url"] = line.split("serving on ")[1].split()[0]
    return found


def test_serve_end_to_end_then_sigterm(
    runner: CliRunner, served: tuple[subprocess.Popen[str], Path, dict[str, str]]
) -> None:
    """First start prints tokens; the API bills; the CLI reads it; SIGTERM exits 0 and the audit is clean."""
    process, data, printed = served
    assert {"admin", "gateway", "url"} == set(printed)
    url, remote = printed["url"], ["--url", printed["url"], "--data-dir", str(data)]
    minted = runner.invoke(app, ["accounts", "mint", "acct-1", "1000000", "--credit-id", "topup-1", *remote])
    assert 0 == minted.exit_code, minted.output
    gateway = {"authorization": f"Bearer {printed['gateway']}"}
    with httpx.Client(base_url=url, headers=gateway) as http:
        held = http.post(
            "/v1/reservations", json={"account_id": "acct-1", "request_id": "r1", "estimated_cost_micro": 5000}
        )
        entry_id = held.json()["billing_entry_id"]
        committed = http.post(f"/v1/reservations/{entry_id}/commit", json={"actual_cost_micro": "4200"})
    assert (201, 200) == (held.status_code, committed.status_code)
    balance = runner.invoke(app, ["accounts", "balance", "acct-1", "--json", *remote])
    assert (995_800, 4_200) == tuple(json.loads(balance.stdout)[k] for k in ("available_micro", "charged_micro"))
    history = runner.invoke(app, ["accounts", "history", "acct-1", "--json", *remote])
    assert [entry_id] == [item["billing_entry_id"] for item in json.loads(history.stdout)["items"]]
    assert {"items": [], "next_after": None} == json.loads(
        runner.invoke(app, ["dlq", "list", "--json", *remote]).stdout
    )
    replay = runner.invoke(app, ["dlq", "replay", *remote])
    assert (2, True) == (replay.exit_code, "settlement_not_configured" in replay.stderr)
    process.send_signal(signal.SIGTERM)
    assert 0 == process.wait(SERVE_STOP_TIMEOUT_S)
    audit = runner.invoke(app, ["audit", "--data-dir", str(data)])
    assert 0 == audit.exit_code, audit.output


def test_mint_never_guesses_units(
    runner: CliRunner, served: tuple[subprocess.Popen[str], Path, dict[str, str]]
) -> None:
    """``mint A 5.00`` is refused (hint: --usd) and writes nothing; ``--usd 5.00`` mints 5,000,000 µUSD, echoed."""
    _, data, printed = served
    remote = ["--url", printed["url"], "--data-dir", str(data)]
    refused = runner.invoke(app, ["accounts", "mint", "acct-2", "5.00", *remote])
    assert (2, True) == (refused.exit_code, "for dollars give --usd 5.00" in refused.stderr)
    before = json.loads(runner.invoke(app, ["accounts", "balance", "acct-2", "--json", *remote]).stdout)
    assert "no account 'acct-2'" in runner.invoke(app, ["accounts", "balance", "acct-2", *remote]).stderr
    minted = runner.invoke(app, ["accounts", "mint", "acct-2", "--usd", "5.00", *remote])
    assert (0, True) == (minted.exit_code, "mint 5,000,000 micro-USD ($5.000000) on acct-2" in minted.stderr)
    after = json.loads(runner.invoke(app, ["accounts", "balance", "acct-2", "--json", *remote]).stdout)
    assert ((0, False), (5_000_000, True)) == tuple((b["available_micro"], b["exists"]) for b in (before, after))


def test_serve_on_a_taken_port_fails_before_creating_anything(tmp_path: Path) -> None:
    """A taken port is one error line naming it, exit 2, and no key created or token printed."""
    data = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "tollway.cli", "serve", "--data-dir", str(data), "--port", str(port)]
        result = subprocess.run(
            command, capture_output=True, text=True, env=_clean_environment(), timeout=60, check=False
        )
    assert (2, True, False) == (result.returncode, f"127.0.0.1:{port}" in result.stderr, "token" in result.stdout)
    assert "another tollway?" in result.stderr
    assert not (data / "keys").exists()
