"""``tollway cluster init|status|verify|audit``: a cluster's identity, leases and log in PostgreSQL.

These commands talk to PostgreSQL only (``--postgres-url`` or ``TOLLWAY_POSTGRES_URL``); no
node has to run. ``init`` creates the cluster (schema, shard count, one lease per shard) and
refuses a database that already holds one; ``status`` shows the cluster, its live nodes and
every shard's lease; ``verify`` reads every shard's log and checks it, read-only; ``audit``
folds every shard's log and checks the ledger over the cluster, read-only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final, TypeVar

import asyncpg
import typer

from tollway.cli.common import AsJson, clean_errors, print_json
from tollway.cluster.audit import audit_cluster
from tollway.core.errors import LogUnavailable
from tollway.core.shard import DEFAULT_SHARDS, SHARDS_MAX
from tollway.pg import leases
from tollway.pg.errors import PG_ERRORS
from tollway.pg.schema import ClusterInfo, init_cluster, open_cluster
from tollway.pg.verify import verify_cluster

T = TypeVar("T")

CONNECT_TIMEOUT_S: Final = 10
NODE_WINDOW_MS: Final = 30_000  # `status` counts a node live if it sent a heartbeat this recently

cluster_app = typer.Typer(
    help="A cluster in PostgreSQL: create it, show its leases, verify and audit its log.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

PostgresUrl = Annotated[
    str,
    typer.Option(
        "--postgres-url",
        envvar="TOLLWAY_POSTGRES_URL",
        help="The cluster's database, e.g. postgresql://user@host:5432/tollway.",
    ),
]


def _with_pool(url: str, work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Run ``work`` with a one-connection pool on ``url``; connection errors become one clean line."""

    async def run() -> T:
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=1, timeout=CONNECT_TIMEOUT_S)
        except (*PG_ERRORS, ValueError) as exc:
            raise LogUnavailable(f"could not connect to PostgreSQL: {exc}") from exc
        try:
            return await work(pool)
        finally:
            await pool.close()

    return asyncio.run(run())


@cluster_app.command("init")
@clean_errors
def init_command(
    *,
    postgres_url: PostgresUrl,
    shards: Annotated[
        int, typer.Option("--shards", help=f"Shards: a power of two, 1 … {SHARDS_MAX}; never changes.")
    ] = DEFAULT_SHARDS,
) -> None:
    """Create a cluster in an empty database: the schema, the shard count, one free lease per shard."""

    async def work(pool: asyncpg.Pool) -> ClusterInfo:
        async with pool.acquire() as connection:
            return await init_cluster(connection, shards=shards)

    info = _with_pool(postgres_url, work)
    typer.echo(f"cluster {info.cluster_id} created: {info.shards} shard(s), format version {info.format_version}")


@cluster_app.command("status")
@clean_errors
def status_command(*, postgres_url: PostgresUrl, as_json: AsJson = False) -> None:
    """Show the cluster, its live nodes and every shard's lease (epoch, owner, live, last sequence)."""

    async def work(pool: asyncpg.Pool) -> dict[str, Any]:
        async with pool.acquire() as connection:
            info = await open_cluster(connection)
        nodes = await leases.live_nodes(pool, NODE_WINDOW_MS)
        rows = await leases.lease_rows(pool)
        return {
            "cluster_id": info.cluster_id,
            "shards": info.shards,
            "format_version": info.format_version,
            "nodes": [{"node_id": n.node_id, "advertise_url": n.advertise_url} for n in nodes],
            "leases": [
                {"shard": r.shard, "epoch": r.epoch, "owner": r.owner, "live": r.live, "last_seq": r.last_seq}
                for r in rows
            ],
        }

    status = _with_pool(postgres_url, work)
    if as_json:
        print_json(status)
        return
    typer.echo(
        f"cluster {status['cluster_id']}: {status['shards']} shard(s), format version {status['format_version']}"
    )
    typer.echo(f"live nodes ({len(status['nodes'])}):")
    for node in status["nodes"]:
        typer.echo(f"  {node['node_id']}  {node['advertise_url']}")
    typer.echo("shard  epoch  owner                 live   last_seq")
    for lease in status["leases"]:
        owner = lease["owner"] or "-"
        typer.echo(
            f"{lease['shard']:>5}  {lease['epoch']:>5}  {owner:<20}  {lease['live']!s:<5}  {lease['last_seq']:>8}"
        )


@cluster_app.command("verify")
@clean_errors
def verify_command(*, postgres_url: PostgresUrl) -> None:
    """Check every shard's log (checksums, gapless sequences, row counts) without changing anything.

    Exit 0 when every shard is sound, 1 naming each shard with a problem. Safe beside running nodes.
    """

    async def work(pool: asyncpg.Pool) -> list[Any]:
        async with pool.acquire() as connection:
            await open_cluster(connection)
        return await verify_cluster(pool)

    reports = _with_pool(postgres_url, work)
    bad = [report for report in reports if report.problem is not None]
    for report in bad:
        typer.echo(f"LOG CORRUPT: {report.problem} ({report.records:,} sound record(s) before it)")
    records = sum(report.records for report in reports)
    if bad:
        raise typer.Exit(1)
    typer.echo(f"log sound: {len(reports)} shard(s), {records:,} record(s)")


@cluster_app.command("audit")
@clean_errors
def audit_command(*, postgres_url: PostgresUrl, as_json: AsJson = False) -> None:
    """Fold every shard's log from PostgreSQL and check the ledger: zero-sum over the cluster.

    Each shard's events are folded into the ledger and into the engine's state and compared;
    every event must concern an account of its shard. Exit 0 when clean, 1 listing every
    problem. Read-only; safe beside running nodes.
    """
    run_cluster_audit(postgres_url, as_json=as_json)


def run_cluster_audit(postgres_url: str, *, as_json: bool = False) -> None:
    """Audit every shard and print the verdict; :class:`typer.Exit` (1) on a problem.

    ``tollway cluster audit`` and ``tollway audit --postgres-url`` both run this.
    """
    report = _with_pool(postgres_url, audit_cluster)
    problems = report.problems
    if as_json:
        print_json(
            {
                "ok": report.ok,
                "cluster_id": report.cluster.cluster_id,
                "shards": report.cluster.shards,
                "records": sum(audited.records for audited in report.shards),
                "total_micro": report.total_micro(),
                "balances_micro": report.balances_micro(),
                "problems": problems,
            }
        )
    else:
        records = sum(audited.records for audited in report.shards)
        for problem in problems:
            typer.echo(f"PROBLEM: {problem}")
        verdict = "clean" if report.ok else f"{len(problems)} problem(s)"
        typer.echo(
            f"cluster {report.cluster.cluster_id}: {report.cluster.shards} shard(s), {records:,} event(s) folded, "
            f"the ledger sums to {report.total_micro()}: {verdict}"
        )
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``cluster`` to ``app``."""
    app.add_typer(cluster_app, name="cluster")
