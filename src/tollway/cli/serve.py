"""``tollway serve`` and ``tollway token issue``: run the service; sign API tokens.

``serve`` reads the settings, configures logging, loads the price table (a bad file stops it
here), binds the socket (a taken port stops it before anything is created), prepares the API
keys — on a first start without ``auth_public_key_files`` it creates the development signing
key in ``<data_dir>/keys/`` and prints an admin and a gateway token — and hands over to
:mod:`tollway.cli.server`.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Annotated, Any, Final

import typer
import uvloop

from tollway.api.auth import Authenticator, Scope, development_key, issue_token
from tollway.cli.common import (
    ConfigFile,
    DataDir,
    Group,
    clean_errors,
    settings_for,
    tollway_command,
    writable_data_dir,
)
from tollway.cli.node import NodeOptions, serve_node
from tollway.cli.processes import PROCESSES_MAX, ChildOptions, reserve_port, serve_processes
from tollway.cli.server import ServeOptions, serve
from tollway.config import Settings
from tollway.core.errors import ConfigError, InvalidInput
from tollway.core.pricing import PriceTable
from tollway.guard import BYPASS_ENV
from tollway.logs import configure_logging
from tollway.net import bind
from tollway.pricing import default_prices, load_prices
from tollway.service import keys_dir
from tollway.tokens import SIGNING_KEY_FILENAME

DEV_TOKEN_TTL_S: Final = 7 * 86_400
"""Lifetime of the tokens printed at the first start."""
TOKEN_TTL_S_DEFAULT: Final = 86_400
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_LOG_FORMATS: Final = ("auto", "json", "console")

token_app = typer.Typer(
    cls=Group,
    help="API tokens signed with the data directory's development key.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


@clean_errors
def serve_command(
    *,
    data_dir: DataDir = None,
    host: Annotated[str | None, typer.Option(help="Listen on this address [default: http_host, 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Listen on this port [default: http_port, 8080].")] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            help="An external Redis [default: a private redis-server in the data directory; cluster mode: none, "
            "no projection]. Cluster mode: one Redis or a Redis Cluster for every shard."
        ),
    ] = None,
    settlement_url: Annotated[
        str | None, typer.Option(help="The settlement service [default: none — standalone mode].")
    ] = None,
    config: ConfigFile = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error or critical.")] = "info",
    log_format: Annotated[str, typer.Option(help="json, console, or auto (console on a terminal).")] = "auto",
    access_log: Annotated[bool, typer.Option(help="Log every HTTP request.")] = False,
    postgres_url: Annotated[
        str | None,
        typer.Option(
            envvar="TOLLWAY_POSTGRES_URL",
            help=(
                "Cluster mode: the cluster's PostgreSQL; list every host with ?target_session_attrs=read-write"
                " to follow a failover (see docs/cluster.md)."
            ),
        ),
    ] = None,
    node_id: Annotated[str | None, typer.Option(help="Cluster mode: this node's id [default: a random one].")] = None,
    advertise_url: Annotated[
        str | None, typer.Option(help="Cluster mode: the URL other nodes forward to [default: the bound address].")
    ] = None,
    lease_ttl_ms: Annotated[
        int, typer.Option(min=100, max=600_000, help="Cluster mode: how long a shard's lease lasts unrenewed.")
    ] = 5_000,
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            max=PROCESSES_MAX,
            help=(
                "Cluster mode: run this many nodes on this machine, one port shared (SO_REUSEPORT), node ids"
                " NODE_ID-0, NODE_ID-1, …; a node that dies is restarted (see docs/cluster.md)."
            ),
        ),
    ] = 1,
    reuse_port: Annotated[bool, typer.Option(hidden=True, help="Share the port (a child of --processes).")] = False,
) -> None:
    """Run the billing service: HTTP API, engine, Redis projection, finalize worker, expiry sweeper.

    On the first start without configured API keys, a development signing key is created in
    the data directory and an admin and a gateway token are printed. SIGTERM or SIGINT: stop
    accepting, finish in-flight requests, drain, sync, exit 0. TOLLWAY_GUARD_BYPASS=true opens
    the conservation guard's gate whatever its checks say (audited; break-glass only).
    """
    settings = settings_for(
        config, data_dir, http_host=host, http_port=port, redis_url=redis_url, settlement_url=settlement_url
    )
    _configure_logging(log_level, log_format)
    pricing = _pricing(settings)
    if processes > 1:
        if postgres_url is None or advertise_url is not None:
            raise ConfigError(
                "--processes runs cluster nodes: it needs --postgres-url, and each node advertises its own URL"
            )
        holder = reserve_port(settings.http_host, settings.http_port)  # a taken port stops here
        writable_data_dir(settings)
        _print_first_tokens(settings)  # once, before the children share the key
        nodes = NodeOptions(postgres_url, node_id, None, lease_ttl_ms)
        extra = ChildOptions(config, log_level, log_format, access_log, redis_url, settlement_url)
        raise typer.Exit(serve_processes(settings, holder, processes, nodes, extra))
    sock = bind(settings.http_host, settings.http_port, reuse_port=reuse_port)  # a taken port stops here
    writable_data_dir(settings)
    _print_first_tokens(settings)
    options = ServeOptions(pricing, Authenticator.from_settings(settings), _bypass_requested(), access_log)
    if postgres_url is not None:
        redis_note = "no Redis projection" if settings.redis_url is None else "Redis projection"
        settle_note = "standalone" if settings.settlement_url is None else "settlement mode"
        typer.echo(f"tollway: cluster mode (the log in PostgreSQL; {redis_note}; {settle_note})")
        nodes = NodeOptions(postgres_url, node_id, advertise_url, lease_ttl_ms, shared_port=reuse_port)
        raise typer.Exit(_run(serve_node(settings, sock, options, nodes, on_ready=_announce)))
    typer.echo(f"tollway: data in {settings.data_dir}; starting (WAL recovery, Redis, guard checks)...")
    code = _run(serve(settings, sock, options, on_ready=_announce))
    typer.echo(
        "tollway: stopped; everything acknowledged is durable" if code == 0 else "tollway: stopped after a fatal error"
    )
    raise typer.Exit(code)


def _configure_logging(level: str, fmt: str) -> None:
    if fmt not in _LOG_FORMATS:
        raise ConfigError(f"--log-format must be one of {', '.join(_LOG_FORMATS)}")
    configure_logging(level, json=fmt == "json" or (fmt == "auto" and not sys.stderr.isatty()))


def _pricing(settings: Settings) -> PriceTable:
    return load_prices(settings.pricing_file) if settings.pricing_file is not None else default_prices()


def _bypass_requested() -> bool:
    return os.environ.get(BYPASS_ENV, "").strip().lower() in _TRUE


def _announce(url: str) -> None:
    typer.echo(f"tollway: serving on {url} (API docs: {url}/docs); Ctrl-C or SIGTERM stops it")


def _run(coro: Coroutine[Any, Any, int]) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _print_first_tokens(settings: Settings) -> None:
    """On the first start with the development key, create it and print two tokens."""
    if settings.auth_public_key_files.strip():
        return
    key, created = development_key(settings)
    if not created:
        typer.echo(
            f"tollway: API tokens verify with the development key in {keys_dir(settings)}; "
            f"mint one with `{tollway_command()} token issue --data-dir {settings.data_dir} --scope billing:gateway`"
        )
        return
    admin = issue_token(key, settings, [Scope.ADMIN.value], subject="admin", ttl_s=DEV_TOKEN_TTL_S)
    gateway = issue_token(key, settings, [Scope.GATEWAY.value], subject="gateway", ttl_s=DEV_TOKEN_TTL_S)
    typer.echo(f"tollway: created a development signing key in {keys_dir(settings)} (kid {key.kid})")
    typer.echo(f"tollway: admin token (billing:admin, 7 days):\n{admin}")
    typer.echo(f"tollway: gateway token (billing:gateway, 7 days):\n{gateway}")


# -- token issue -----------------------------------------------------------------------------


def parse_scopes(values: list[str]) -> list[str]:
    """``admin``, ``billing:admin``, ``read,gateway`` … → the canonical scope names."""
    names = [item for value in values for item in value.replace(",", " ").split()]
    scopes = [name if name.startswith("billing:") else f"billing:{name}" for name in names]
    known = {scope.value for scope in Scope}
    unknown = [name for name in scopes if name not in known]
    if unknown or not scopes:
        raise InvalidInput(
            f"--scope must be among {', '.join(sorted(known))} (got {', '.join(unknown)})", field="scope"
        )
    return list(dict.fromkeys(scopes))


@token_app.command("issue")
@clean_errors
def token_issue(
    *,
    scope: Annotated[
        list[str], typer.Option("--scope", help="billing:read, billing:gateway or billing:admin (repeatable).")
    ],
    data_dir: DataDir = None,
    config: ConfigFile = None,
    accounts: Annotated[
        str | None, typer.Option(help="Restrict to these accounts: comma-separated ids or prefix* patterns.")
    ] = None,
    ttl_s: Annotated[int, typer.Option("--ttl-s", min=1, help="Lifetime in seconds.")] = TOKEN_TTL_S_DEFAULT,
    subject: Annotated[str, typer.Option(help="The token's sub (recorded as admin_id of voids).")] = "tollway-cli",
    new_key: Annotated[
        bool, typer.Option("--new-key", help="Create a development key even where there is no tollway data yet.")
    ] = False,
) -> None:
    """Print an API token signed with the data directory's development key.

    Admin implies gateway, which implies read. Without --accounts the token covers every
    account. The service must verify with the same key (no auth_public_key_files configured).
    A data directory with neither a key nor a WAL is refused (a mistyped --data-dir would
    otherwise get a key no service trusts) unless --new-key is given.
    """
    settings = settings_for(config, data_dir)
    scopes = parse_scopes(scope)
    patterns = None if accounts is None else [item.strip() for item in accounts.split(",") if item.strip()]
    _refuse_a_key_without_data(settings, new_key=new_key)
    key, created = development_key(writable_data_dir(settings))
    if created:
        typer.echo(f"tollway: warning: created a NEW development signing key in {keys_dir(settings)}", err=True)
    if settings.auth_public_key_files.strip():
        typer.echo("tollway: warning: auth_public_key_files is set; the service will not accept this token", err=True)
    typer.echo(issue_token(key, settings, scopes, subject=subject, ttl_s=ttl_s, accounts=patterns))


def _refuse_a_key_without_data(settings: Settings, *, new_key: bool) -> None:
    """InvalidInput when the data directory holds no key and no WAL, unless a new key is asked for."""
    if new_key or (keys_dir(settings) / SIGNING_KEY_FILENAME).exists() or settings.wal_dir.is_dir():
        return
    raise InvalidInput(
        f"no tollway data in {settings.data_dir} (no WAL, no development key): is --data-dir right? "
        f"A token signed here would be refused by a service using another directory. "
        f"`{tollway_command()} serve --data-dir {settings.data_dir}` creates the key; "
        "--new-key creates one here anyway",
        field="data_dir",
    )


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``token`` to ``app``."""
    app.command("serve")(serve_command)
    app.add_typer(token_app, name="token")
