"""Commands on a running service, through its HTTP API and the SDK: ``accounts …`` and ``dlq …``.

They go through the API (not Redis or the WAL directly) so they see exactly what the gateways
see, work against a remote service, and leave every write to the engine. Authentication:
``--token`` / ``TOLLWAY_TOKEN``, or — beside a local ``tollway serve --data-dir D`` — a
short-lived admin token the CLI signs with D's development key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Final, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from tollway.cli.common import AsJson, ConfigFile, DataDir, Group, Token, Url, clean_errors, print_json, remote_client
from tollway.client import AsyncClient, Balance, Entry, TransportFailure
from tollway.core.errors import InvalidInput
from tollway.core.money import format_usd, parse_micro, parse_usd

T = TypeVar("T")

HISTORY_LIMIT_DEFAULT = 50
_DIGITS: Final = frozenset("0123456789")

accounts_app = typer.Typer(
    cls=Group,
    help="Balances, credits and history of accounts, through the HTTP API.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
dlq_app = typer.Typer(
    cls=Group,
    help="The finalize queue's dead letters, through the HTTP API (admin).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

Account = Annotated[str, typer.Argument(help="The account id.")]


def _with_client(
    url: str | None,
    token: str | None,
    data_dir: Path | None,
    config: Path | None,
    call: Callable[[AsyncClient], Awaitable[T]],
) -> T:
    async def run() -> T:
        async with remote_client(url, token, data_dir, config) as client:
            try:
                return await call(client)
            except TransportFailure as exc:
                raise TransportFailure(f"{exc} (is tollway serving there? give --url or TOLLWAY_URL)") from exc

    return asyncio.run(run())


def _balance_table(balance: Balance) -> Table:
    table = Table(title=f"account {balance.account_id} (as of WAL sequence {balance.wal_sequence})")
    for column in ("", "micro-USD", "credit units"):
        table.add_column(column, justify="left" if not column else "right")
    for name in ("available", "held", "unsettled", "charged"):
        micro, cu = getattr(balance, f"{name}_micro"), getattr(balance, f"{name}_cu")
        table.add_row(name, f"{micro:,}", f"{cu:,}")
    return table


@accounts_app.command("balance")
@clean_errors
def balance_command(
    account_id: Account,
    *,
    url: Url = None,
    token: Token = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Show an account's available, held, unsettled and charged amounts (micro-USD and CU)."""
    balance = _with_client(url, token, data_dir, config, lambda client: client.balance(account_id))
    if as_json:
        print_json(dataclasses.asdict(balance))
        return
    if not balance.exists:
        typer.echo(f"tollway: no account {account_id!r}: no credit or entry has touched it (a typo?)", err=True)
    Console().print(_balance_table(balance))


@accounts_app.command("mint")
@clean_errors
def mint_command(
    account_id: Account,
    amount_micro: Annotated[
        str | None,
        typer.Argument(
            help="The amount in micro-USD, a whole number (1 USD = 1000000); or give --usd instead.",
            show_default=False,
        ),
    ] = None,
    *,
    usd: Annotated[
        str | None,
        typer.Option(
            "--usd", help="The amount in dollars instead, exact to 6 decimals: --usd 5.00 is 5000000 micro-USD."
        ),
    ] = None,
    credit_id: Annotated[
        str | None, typer.Option(help="The idempotency key; repeat it to retry safely [default: a new one].")
    ] = None,
    kind: Annotated[str, typer.Option(help="mint, deduct (clawback) or credit_note.")] = "mint",
    reason: Annotated[str | None, typer.Option(help="Why (kept in the WAL).")] = None,
    url: Url = None,
    token: Token = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Add prepaid credit to an account (or deduct it, or add a credit note). Needs billing:admin.

    The amount is never guessed: a whole number of micro-USD, or dollars with --usd. Both units
    are echoed on stderr before anything is written.
    """
    amount = credit_amount_micro(amount_micro, usd)
    typer.echo(f"tollway: {kind} {amount:,} micro-USD ({format_usd(amount)}) on {account_id}", err=True)
    key = credit_id or f"cli-{uuid.uuid4()}"
    result = _with_client(
        url,
        token,
        data_dir,
        config,
        lambda client: client.credit(account_id, key, amount, kind=kind, reason=reason),
    )
    if as_json:
        print_json(dataclasses.asdict(result))
        return
    verb = "already applied" if result.replayed else "applied"
    typer.echo(
        f"{result.kind} {result.amount_micro:,} micro-USD ({format_usd(result.amount_micro)}) {verb} "
        f"(credit_id {result.credit_id})"
    )
    Console().print(_balance_table(result.balance))


def credit_amount_micro(amount_micro: str | None, usd: str | None) -> int:
    """The amount of a credit from exactly one of the micro-USD argument and ``--usd``; never a guess."""
    if usd is not None and amount_micro is None:
        amount = parse_usd(usd, field="--usd")
    elif amount_micro is not None and usd is None:
        if not _DIGITS.issuperset(amount_micro):
            hint = f"; for dollars give --usd {amount_micro}" if _looks_like_dollars(amount_micro) else ""
            raise InvalidInput(
                f"the amount is a whole number of micro-USD (1 USD = 1000000), not {amount_micro!r}{hint}",
                field="amount_micro",
            )
        amount = parse_micro(amount_micro, field="amount_micro")
    else:
        raise InvalidInput(
            "give the amount once: in micro-USD (a whole number) or in dollars with --usd", field="amount"
        )
    if amount < 1:
        raise InvalidInput("the amount must be at least 1 micro-USD", field="amount_micro")
    return amount


def _looks_like_dollars(text: str) -> bool:
    try:
        parse_usd(text)
    except InvalidInput:
        return False
    return True


@accounts_app.command("history")
@clean_errors
def history_command(
    account_id: Account,
    *,
    state: Annotated[list[str] | None, typer.Option(help="Only entries in this state (repeatable).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Entries per page.")] = HISTORY_LIMIT_DEFAULT,
    cursor: Annotated[str | None, typer.Option(help="Continue after this entry id (next_cursor).")] = None,
    url: Url = None,
    token: Token = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """List an account's entries, oldest first, one page at a time."""
    page = _with_client(
        url, token, data_dir, config, lambda c: c.entries(account_id, states=state or (), cursor=cursor, limit=limit)
    )
    if as_json:
        print_json({"items": [dataclasses.asdict(e) for e in page.items], "next_cursor": page.next_cursor})
        return
    Console().print(_entries_table(account_id, page.items))
    if page.next_cursor is not None:
        typer.echo(f"more: --cursor {page.next_cursor}")


def _entries_table(account_id: str, entries: tuple[Entry, ...]) -> Table:
    table = Table(title=f"entries of {account_id}")
    for column in ("billing_entry_id", "request_id", "state", "estimate µ$", "charged µ$", "updated_at_ms"):
        table.add_column(column, justify="right" if "$" in column else "left")
    for e in entries:
        table.add_row(
            e.billing_entry_id,
            e.request_id,
            e.state,
            f"{e.estimated_cost_micro:,}",
            f"{e.charged_micro:,}",
            str(e.updated_at_ms),
        )
    return table


@dlq_app.command("list")
@clean_errors
def dlq_list(
    *,
    after: Annotated[str | None, typer.Option(help="Continue after this message id (next_after).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Dead letters per page.")] = 100,
    url: Url = None,
    token: Token = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """List dead letters (charges settlement gave up on; each entry is FINALIZE_FAILED)."""
    page = _with_client(url, token, data_dir, config, lambda client: client.dead_letters(after=after, limit=limit))
    if as_json:
        print_json({"items": [dataclasses.asdict(item) for item in page.items], "next_after": page.next_cursor})
        return
    table = Table(title="dead letters")
    for column in ("message_id", "billing_entry_id", "account_id", "reason"):
        table.add_column(column)
    for item in page.items:
        table.add_row(
            item.message_id, item.billing_entry_id, item.fields.get("account_id", ""), item.fields.get("reason", "")
        )
    Console().print(table)
    if page.next_cursor is not None:
        typer.echo(f"more: --after {page.next_cursor}")


@dlq_app.command("replay")
@clean_errors
def dlq_replay(
    *,
    url: Url = None,
    token: Token = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    as_json: AsJson = False,
) -> None:
    """Replay every dead letter against settlement; each success is written as a finalize ack.

    Needs settlement mode (the service answers 409 in standalone mode).
    """
    report = _with_client(url, token, data_dir, config, lambda client: client.replay_dead_letters())
    if as_json:
        print_json(dataclasses.asdict(report))
        return
    typer.echo(
        f"examined {report.examined}, acked {report.acked}, still failing {report.still_failing}, "
        f"skipped {report.skipped}, refused {report.refused} (settled after a void: see the alerts)"
    )


def register(app: typer.Typer) -> None:
    """Add ``accounts`` and ``dlq`` to ``app``."""
    app.add_typer(accounts_app, name="accounts")
    app.add_typer(dlq_app, name="dlq")
