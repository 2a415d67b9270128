"""The ``tollway`` command line: a composition root.

This module (with the ASGI app factory, later) is the only place that reads the environment,
configures logging or tunes the process. Settings come from
:func:`~tollway.config.settings_from_environment`: an optional TOML file (``--config`` or
``TOLLWAY_CONFIG``), then ``TOLLWAY_*`` variables, then the command's own options.

Exit codes: 0 — done and sound; 1 — the command ran and found a problem (a corrupt WAL, an
audit difference, a demo whose verdict is not clean); 2 — it could not run at all (bad
options or settings, a locked or unreadable data directory): one ``tollway: error: …`` line on
stderr, never a traceback, for every :class:`~tollway.core.errors.TollwayError`.

Commands::

    tollway wal verify  --data-dir D
    tollway wal inspect --data-dir D [--from-seq N] [--limit N] [--json]
    tollway audit       --data-dir D [--per-account]
    tollway demo        [--data-dir D] [--accounts N] [--seconds S | --operations N] [--seed N]
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, ParamSpec, TypeVar

import msgspec
import typer
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tollway import audit as auditing
from tollway import demo as demos
from tollway.config import Durability, Settings, settings_from_environment
from tollway.core.errors import InvalidInput, TollwayError
from tollway.core.events import BILLING_WAL_SCHEMA_VERSION, Event, Unknown
from tollway.core.ids import UNTRACED
from tollway.wal import codec
from tollway.wal.segments import iter_events, verify

P = ParamSpec("P")
R = TypeVar("R")

DEMO_SECONDS_DEFAULT: Final = 12.0

app = typer.Typer(
    name="tollway",
    help="tollway: the billing loop for AI-inference gateways (reserve, commit, finalize).",
    epilog="Exit codes: 0 done and sound; 1 a problem was found (corrupt WAL, audit difference); 2 could not run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs are re-flowed; [brackets] are not markup
)
wal_app = typer.Typer(
    help="Read the write-ahead log: verify it, inspect its records. Read-only.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(wal_app, name="wal")

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="The data directory [default: TOLLWAY_DATA_DIR, else ./tollway-data].", file_okay=False
    ),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="TOLLWAY_CONFIG",
        help="A TOML settings file; TOLLWAY_* variables override it.",
        dir_okay=False,
    ),
]


def _clean_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn a :class:`TollwayError` (or an OS error such as a permission denied) into one line on stderr, exit 2."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (TollwayError, OSError) as exc:
            message = " ".join(str(exc).split())
            typer.echo(f"tollway: error: {message}", err=True)
            raise typer.Exit(2) from exc

    return wrapper


def _settings(config: Path | None, data_dir: Path | None) -> Settings:
    """Settings from the TOML file, then ``TOLLWAY_*``, then ``--data-dir`` when given."""
    return settings_from_environment(toml_path=config, data_dir=data_dir)


def _existing_data_dir(data_dir: Path | None, config: Path | None) -> Settings:
    """Settings for a data directory that must already hold a WAL."""
    settings = _settings(config, data_dir=data_dir)
    if not settings.wal_dir.is_dir():
        raise InvalidInput(f"no WAL in {settings.data_dir} (expected {settings.wal_dir})", field="data_dir")
    return settings


# -- wal -------------------------------------------------------------------------------------


@wal_app.command("verify")
@_clean_errors
def wal_verify(*, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Check every segment and record of the WAL without changing anything.

    Exit 0 when the log is sound. A torn tail (an incomplete last record, as a crash leaves
    it) is reported but is not a failure: the engine cuts it at its next start. Exit 1 at the
    first corrupt record, naming its segment and byte offset. Safe beside a running engine.
    """
    report = verify(_existing_data_dir(data_dir, config).wal_dir)
    if report.problem is not None:
        typer.echo(f"WAL CORRUPT: {report.problem}")
        typer.echo(
            f"the {report.records:,} record(s) of the segments before it are sound (last sequence {report.last_seq})"
        )
        raise typer.Exit(1)
    typer.echo(
        f"WAL sound: {report.segments} segment(s), {report.records:,} record(s), last sequence {report.last_seq}"
    )
    if report.torn_tail is not None:
        typer.echo(f"torn tail: {report.torn_tail}; the engine cuts it at its next start")


@wal_app.command("inspect")
@_clean_errors
def wal_inspect(
    *,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    from_seq: Annotated[int, typer.Option("--from-seq", min=1, help="Start at this sequence.")] = 1,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Print at most this many records.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per line: the envelope and the full payload.")
    ] = False,
) -> None:
    """Print WAL records, one line each, oldest first.

    The text form shows the sequence, time (UTC), event type, entry id and the payload's
    scalar fields; --json prints each record as stored (money as decimal strings of
    micro-USD). Stops with an error at a corrupt record.
    """
    wal_dir = _existing_data_dir(data_dir, config).wal_dir
    for event in itertools.islice(iter_events(wal_dir, from_seq), limit):
        typer.echo(_json_line(event) if as_json else _text_line(event))


def _record(event: Event) -> dict[str, Any]:
    """The record as JSON data; an event type this reader does not know keeps only its envelope."""
    if not isinstance(event.payload, Unknown):
        return codec.payload_json(codec.encode_body(event))
    return {
        "schema_version": BILLING_WAL_SCHEMA_VERSION,
        "event_type": event.payload.event_type,
        "wal_sequence": event.wal_sequence,
        "timestamp_ms": event.timestamp_ms,
        "billing_entry_id": event.billing_entry_id,
        "correlation_id": event.correlation_id,
        "payload": None,
    }


def _json_line(event: Event) -> str:
    if not isinstance(event.payload, Unknown):
        return codec.encode_body(event).decode()
    return msgspec.json.encode(_record(event)).decode()


def _text_line(event: Event) -> str:
    record = _record(event)
    ms = event.timestamp_ms
    when = datetime.fromtimestamp(ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"
    fields = [f"{name}={_scalar(value)}" for name, value in (record["payload"] or {}).items() if _shown(name, value)]
    if event.correlation_id != UNTRACED:
        fields.append(f"correlation_id={_scalar(event.correlation_id)}")
    return f"{event.wal_sequence:>10} {when} {record['event_type']:<24} {event.billing_entry_id} {' '.join(fields)}"


def _shown(name: str, value: object) -> bool:
    """Text lines show scalars; nested records and fingerprints are in --json."""
    return name != "fingerprint" and not isinstance(value, dict | list)


def _scalar(value: object) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in '"=' for c in value):
        return value
    return msgspec.json.encode(value).decode()


# -- audit -----------------------------------------------------------------------------------


@app.command("audit")
@_clean_errors
def audit_command(
    *,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    per_account: Annotated[
        bool, typer.Option("--per-account", help="List every user's ledger accounts, not just the totals.")
    ] = False,
) -> None:
    """Fold the WAL into ledger balances and prove conservation. Read-only.

    Checks that every record is sound, every event's postings sum to zero, no balance went
    negative, holds equal the sum of held entries, two independent folds of the log agree,
    and the newest snapshot equals the log at its sequence. Prints entries by state and money
    by ledger account; exit 1 on any problem. Safe beside a running engine.
    """
    report = auditing.audit(_existing_data_dir(data_dir, config).data_dir)
    Console().print(auditing.render(report, per_account=per_account))
    if not report.ok:
        raise typer.Exit(1)


# -- demo ------------------------------------------------------------------------------------


@app.command("demo")
@_clean_errors
def demo_command(
    *,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", file_okay=False, help="An empty or new directory [default: a fresh temporary one]."),
    ] = None,
    accounts: Annotated[int, typer.Option(min=1, max=100_000, help="Accounts to credit and bill.")] = 50,
    seconds: Annotated[
        float | None,
        typer.Option(min=0.1, max=3600, help=f"Drive traffic this long [default: {DEMO_SECONDS_DEFAULT:g}]."),
    ] = None,
    operations: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many gateway operations (instead of --seconds).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the simulated traffic.")] = 1,
    gateways: Annotated[int, typer.Option(min=1, max=10_000, help="Concurrent simulated gateways.")] = 64,
    config: ConfigFile = None,
) -> None:
    """Drive simulated inference traffic through a real engine, then audit what it wrote.

    Gateways reserve, commit (with some overruns), release failed streams, abandon holds for
    the expiry sweeper, retry with the same request id, charge, void and top up, while a live
    line shows progress. Ends with entries by state, money by ledger account, refusals by
    code, measured throughput and the conservation verdict; exit 1 unless it is clean. The
    WAL is fsynced as in production (set TOLLWAY_DURABILITY=none to skip syncs).
    """
    if seconds is not None and operations is not None:
        raise InvalidInput("give --seconds or --operations, not both", field="seconds")
    directory = data_dir if data_dir is not None else Path(tempfile.mkdtemp(prefix="tollway-demo-"))
    if directory.exists() and any(directory.iterdir()):
        raise InvalidInput(f"the demo needs an empty data directory; {directory} is not empty", field="data_dir")
    settings = _settings(config, data_dir=directory)
    options = demos.DemoOptions(accounts, seconds or DEMO_SECONDS_DEFAULT, operations, seed, gateways)
    console = Console()
    result = asyncio.run(demos.run_demo(settings, options, console))
    console.print(demo_report(result))
    console.print(
        f"The data stays in {directory}; look at it with `tollway audit --data-dir {directory}` "
        f"or `tollway wal inspect --data-dir {directory} --limit 20`."
    )
    if not result.ok:
        raise typer.Exit(1)


def demo_report(result: demos.DemoResult) -> RenderableType:
    """The demo's final report: states, money, refusals, throughput and the conservation verdict."""
    return Group(
        Panel(Text(f"tollway demo — report ({result.data_dir})", style="bold")),
        auditing.states_table(result.audit),
        auditing.money_table(result.audit),
        _refusals_table(result),
        _throughput_table(result),
        _traffic_summary(result),
        auditing.verdict(result.audit),
    )


def _refusals_table(result: demos.DemoResult) -> Table:
    table = Table(title="Refusals and replays (nothing written)", title_justify="left")
    table.add_column("answer")
    table.add_column("count", justify="right")
    for code, count in result.tally.refusals.most_common():
        table.add_row(code, f"{count:,}")
    table.add_row("replayed (idempotent retry)", f"{result.tally.replays:,}", end_section=True)
    return table


def _throughput_table(result: demos.DemoResult) -> Table:
    table = Table(title=f"Throughput (measured; WAL durability {result.durability.value})", title_justify="left")
    for column in ("phase", "seconds", "WAL events", "events/s"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase in result.phases:
        rate = int(phase.events / phase.seconds) if phase.seconds > 0 else 0
        table.add_row(phase.name, f"{phase.seconds:.2f}", f"{phase.events:,}", f"{rate:,}")
    return table


_SYNC_NOTE: Final = {Durability.FSYNC: "one write and fdatasync each", Durability.NONE: "one write each, never synced"}


def _traffic_summary(result: demos.DemoResult) -> Text:
    tally, options = result.tally, result.options
    ops_rate = int(tally.operations / result.traffic.seconds) if result.traffic.seconds > 0 else 0
    per_batch = result.wal_records // result.wal_batches if result.wal_batches else 0
    return Text(
        f"{tally.operations:,} gateway operations ({ops_rate:,}/s) by {options.gateways} gateways on "
        f"{options.accounts} accounts: {tally.holds:,} holds, {tally.committed:,} commits "
        f"({tally.overruns:,} overruns), {tally.released:,} released, {result.expired:,} expired, "
        f"{tally.charged:,} direct charges, {tally.voided:,} voids.\n"
        f"{result.wal_batches:,} group commits ({_SYNC_NOTE[result.durability]}), "
        f"{per_batch} records per group commit on average.\n"
    )


def main() -> None:
    """The ``tollway`` console script: configure logging, then run the command."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
