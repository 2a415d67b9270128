"""Commands on a data directory, without a running service: ``wal verify``, ``wal inspect``, ``audit``, ``rebuild``.

All of them are read-only and safe beside a running engine: they read the WAL segments and
snapshots as files and never take the writer's lock.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import redis.asyncio as aioredis
import typer
from rich.console import Console

from tollway import audit as auditing
from tollway.audit_live import redis_section, settlement_section
from tollway.cli.cluster import run_cluster_audit
from tollway.cli.common import ConfigFile, DataDir, Group, clean_errors, existing_data_dir
from tollway.config import Settings
from tollway.core.errors import InvalidInput, TollwayError
from tollway.core.events import BILLING_WAL_SCHEMA_VERSION, Event, Unknown
from tollway.core.ids import UNTRACED
from tollway.engine import Engine
from tollway.redis.errors import UNAVAILABLE
from tollway.redis.parity import differences
from tollway.redis.projector import Projector
from tollway.service import SETTLEMENT_KEY_FILE, keys_dir, redis_keys
from tollway.settlement.client import SettlementAuth, SettlementClient
from tollway.tokens import read_signing_key
from tollway.wal import codec
from tollway.wal.segments import iter_events, verify

wal_app = typer.Typer(
    cls=Group,
    help="Read the write-ahead log: verify it, inspect its records. Read-only.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


# -- wal -------------------------------------------------------------------------------------


@wal_app.command("verify")
@clean_errors
def wal_verify(*, data_dir: DataDir = None, config: ConfigFile = None) -> None:
    """Check every segment and record of the WAL without changing anything.

    Exit 0 when the log is sound. A torn tail (an incomplete last record, as a crash leaves
    it) is reported but is not a failure: the engine cuts it at its next start. Exit 1 at the
    first corrupt record, naming its segment and byte offset. Safe beside a running engine.
    """
    report = verify(existing_data_dir(data_dir, config).wal_dir)
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
@clean_errors
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
    scalar fields (a list as its length in brackets, e.g. the entries an archive event drops);
    --json prints each record as stored (money as decimal strings of micro-USD). Stops with an
    error at a corrupt record.
    """
    wal_dir = existing_data_dir(data_dir, config).wal_dir
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
    payload = record["payload"] or {}
    fields = [f"{name}={_scalar(value)}" for name, value in payload.items() if _shown(name, value)]
    fields += [f"{name}=[{len(value)}]" for name, value in payload.items() if isinstance(value, list)]
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


@clean_errors
def audit_command(
    *,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    per_account: Annotated[
        bool, typer.Option("--per-account", help="List every user's ledger accounts, not just the totals.")
    ] = False,
    redis_url: Annotated[
        str | None,
        typer.Option("--redis-url", help="Also compare the Redis projection at this URL with the WAL (read-only)."),
    ] = None,
    settlement_url: Annotated[
        str | None,
        typer.Option(
            "--settlement-url",
            help="Also compare the settlement service's finalized list (signed with the data directory's key).",
        ),
    ] = None,
    postgres_url: Annotated[
        str | None,
        typer.Option(
            "--postgres-url",
            help="Audit a cluster instead: every shard's log in this PostgreSQL (as `tollway cluster audit`).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="With --postgres-url: the verdict as JSON.")] = False,
) -> None:
    """Fold the WAL into ledger balances and prove conservation. Read-only.

    Checks that every record is sound, every event's postings sum to zero, no balance went
    negative, holds equal the sum of held entries, two independent folds of the log agree,
    and the newest snapshot equals the log at its sequence. With `--redis-url` the projection
    must equal the fold field by field (queues included); with `--settlement-url` every
    acknowledged charge must be finalized there with the same amount. Prints entries by state
    and money by ledger account; exit 1 on any problem. Safe beside a running engine (the
    Redis comparison then needs an idle service).

    With `--postgres-url`, the cluster instead (the same as `tollway cluster audit`): every
    shard's log folded from PostgreSQL into the ledger and the engine's state and compared,
    every event in the shard of its account, the ledger zero-sum over the whole cluster.
    """
    if postgres_url is not None:
        _refuse_with_cluster(per_account=per_account, redis_url=redis_url, settlement_url=settlement_url)
        run_cluster_audit(postgres_url, as_json=as_json)
        return
    if as_json:
        raise InvalidInput("--json is for a cluster's audit (--postgres-url)", field="json")
    settings = existing_data_dir(data_dir, config)
    report = auditing.audit(settings.data_dir)
    report = asyncio.run(_live_sections(report, settings, redis_url, settlement_url))
    Console().print(auditing.render(report, per_account=per_account))
    if not report.ok:
        raise typer.Exit(1)


def _refuse_with_cluster(*, per_account: bool, redis_url: str | None, settlement_url: str | None) -> None:
    """The sections of a data directory's audit that a cluster's audit does not have yet."""
    given = [
        flag
        for flag, value in (
            ("--per-account", per_account),
            ("--redis-url", redis_url),
            ("--settlement-url", settlement_url),
        )
        if value
    ]
    if given:
        raise InvalidInput(
            f"{', '.join(given)} cannot be combined with --postgres-url: a cluster's audit folds the log only",
            field="postgres_url",
        )


async def _live_sections(
    report: auditing.AuditReport, settings: Settings, redis_url: str | None, settlement_url: str | None
) -> auditing.AuditReport:
    if redis_url is not None:
        report = report.with_section(await redis_section(report, redis_url, redis_keys(settings)))
    if settlement_url is not None:
        key_file = keys_dir(settings) / SETTLEMENT_KEY_FILE
        if not key_file.exists():
            raise InvalidInput(f"no settlement signing key in {keys_dir(settings)}", field="settlement_url")
        auth = SettlementAuth(
            signing_key=read_signing_key(key_file),
            issuer=settings.settlement_issuer,
            audience=settings.settlement_audience,
            tenant_id=settings.settlement_tenant_id,
        )
        async with SettlementClient.from_url(settlement_url, auth, timeout_ms=10_000) as client:
            report = report.with_section(await settlement_section(report, client))
    return report


# -- rebuild ---------------------------------------------------------------------------------


@clean_errors
def rebuild_command(
    *,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    redis_url: Annotated[
        str | None, typer.Option("--redis-url", help="The Redis to rebuild [default: TOLLWAY_REDIS_URL].")
    ] = None,
    take_over: Annotated[
        bool,
        typer.Option(
            "--take-over",
            help="Rebuild even if the keys belong to another data directory (only when that one is gone for good).",
        ),
    ] = False,
) -> None:
    """Rebuild the Redis projection of a stopped service from its WAL.

    Deletes every key of the shard and writes balances, entries, the expiry index, stored
    responses, the finalize queue of every `FINALIZE_PENDING` entry and the dead letter of every
    `FINALIZE_FAILED` one, then checks parity. Takes the WAL lock, so the service must be
    stopped. Not needed with the embedded Redis: a service rebuilds its projection at start
    whenever it is missing. Refuses keys that another data directory's engine owns, unless
    `--take-over` is given.
    """
    settings = existing_data_dir(data_dir, config)
    url = redis_url or settings.redis_url
    if url is None:
        raise InvalidInput(
            "give --redis-url: the embedded Redis lives only while the service runs, and is rebuilt at each start",
            field="redis_url",
        )
    sequence, problems = asyncio.run(_rebuild(settings, url, take_over=take_over))
    if problems:
        typer.echo(f"rebuilt at sequence {sequence}, but parity fails: {problems[:5]}")
        raise typer.Exit(1)
    typer.echo(f"projection rebuilt at sequence {sequence} and in parity with the WAL")


async def _rebuild(settings: Settings, url: str, *, take_over: bool) -> tuple[int, list[str]]:
    client = aioredis.Redis.from_url(url, socket_timeout=10)
    try:
        async with Engine.open(settings=settings) as engine:
            projector = Projector(engine, client, redis_keys(settings))
            sequence = await projector.rebuild(take_over=take_over)
            await projector.sync()
            return sequence, await differences(client, redis_keys(settings), engine.state)
    except UNAVAILABLE as exc:  # unreachable, full (maxmemory), read-only, …
        raise RebuildFailed(f"could not rebuild the projection in the redis at {url}: {exc}") from exc
    finally:
        await client.aclose()


class RebuildFailed(TollwayError):
    """Redis could not take the rebuild; the WAL is untouched, so it can simply be run again."""


def register(app: typer.Typer) -> None:
    """Add ``wal``, ``audit`` and ``rebuild`` to ``app``."""
    app.add_typer(wal_app, name="wal")
    app.command("audit")(audit_command)
    app.command("rebuild")(rebuild_command)
