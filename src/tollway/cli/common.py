"""What every ``tollway`` command shares: option types, settings, clean errors, the API client.

Commands that run the engine (``serve``, ``wal``, ``audit``, ``demo``) read their settings with
:func:`settings_for`. Commands that talk to a running service (``accounts``, ``dlq``) go through
the HTTP API with the SDK: :func:`remote_client` takes ``--url`` / ``TOLLWAY_URL`` and ``--token``
/ ``TOLLWAY_TOKEN``; without a token but with a data directory whose development key exists, it
signs a short-lived token with that key, so ``tollway dlq list --data-dir D`` just works beside
``tollway serve --data-dir D``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Final, ParamSpec, TypeVar

import typer
from typer import _click as click  # typer's own copy of click, whose classes its commands use
from typer.core import TyperGroup, TyperOption

from tollway.api.auth import issue_token
from tollway.client import AsyncClient, ClientError
from tollway.config import Settings, settings_from_environment
from tollway.core.errors import ConfigError, InvalidInput, TollwayError
from tollway.service import keys_dir
from tollway.tokens import SIGNING_KEY_FILENAME, read_signing_key

P = ParamSpec("P")
R = TypeVar("R")

CLI_TOKEN_TTL_S: Final = 300
"""Lifetime of a token the CLI signs for itself with the development key."""
CLI_SUBJECT: Final = "tollway-cli"

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
Url = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="TOLLWAY_URL", help="The service's base URL [default: http://<http_host>:<http_port>]."
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="TOLLWAY_TOKEN",
        help="A bearer token [default: one signed with the data directory's development key].",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class Group(TyperGroup):
    """Typer's command group, with help that shows no ``<bool>`` type beside flags such as ``--help``.

    A flag takes no value, so the type column of the help table stays empty for it (typer would
    print ``<bool>`` there, which reads as if ``--help true`` were expected).
    """

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        """The group's own parameters, flags without a type label."""
        return _without_flag_types(super().get_params(ctx))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """A subcommand, its flags (``--help`` included) without a type label."""
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _without_flag_types(command.get_params(ctx))
        return command


def _without_flag_types(params: list[click.Parameter]) -> list[click.Parameter]:
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


def clean_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn a tollway, SDK or OS error into one line on stderr and exit 2 — never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (TollwayError, ClientError, OSError) as exc:
            message = " ".join(str(exc).split())
            typer.echo(f"tollway: error: {message}", err=True)
            raise typer.Exit(2) from exc

    return wrapper


def settings_for(config: Path | None, data_dir: Path | None, **overrides: object) -> Settings:
    """Settings from the TOML file, then ``TOLLWAY_*``, then the command's options (when given)."""
    return settings_from_environment(None, config, data_dir=data_dir, **overrides)


def writable_data_dir(settings: Settings) -> Settings:
    """``settings`` once its data directory exists (created if need be); ConfigError naming the fix if it cannot."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot use the data directory {settings.data_dir}: {exc.strerror or exc}; give --data-dir "
            "(or TOLLWAY_DATA_DIR) a directory this user can create and write"
        ) from exc
    return settings


def existing_data_dir(data_dir: Path | None, config: Path | None) -> Settings:
    """Settings for a data directory that must already hold a WAL."""
    settings = settings_for(config, data_dir)
    if not settings.wal_dir.is_dir():
        raise InvalidInput(f"no WAL in {settings.data_dir} (expected {settings.wal_dir})", field="data_dir")
    return settings


def remote_client(url: str | None, token: str | None, data_dir: Path | None, config: Path | None) -> AsyncClient:
    """An SDK client for the running service, with the given token or one signed by the dev key."""
    settings = settings_for(config, data_dir)
    base_url = url or f"http://{settings.http_host}:{settings.http_port}"
    if token is None:
        key_file = keys_dir(settings) / SIGNING_KEY_FILENAME
        if not key_file.exists():
            raise InvalidInput(
                f"give --token (or TOLLWAY_TOKEN): there is no development key in {keys_dir(settings)}", field="token"
            )
        key = read_signing_key(key_file)
        token = issue_token(key, settings, ["billing:admin"], subject=CLI_SUBJECT, ttl_s=CLI_TOKEN_TTL_S)
    return AsyncClient(base_url, token)


def tollway_command() -> str:
    """How to run tollway from this shell, for hints: ``tollway`` when on ``PATH``, else this script's path.

    After ``make demo`` the console script is ``.venv/bin/tollway`` and not on ``PATH`` until the
    environment is activated; a hint saying a bare ``tollway`` would not work as written.
    """
    if shutil.which("tollway") is not None:
        return "tollway"
    script = Path(sys.argv[0])
    if script.name != "tollway":
        return f"{sys.executable} -m tollway"
    relative = os.path.relpath(script)
    return str(script.absolute()) if relative.startswith("..") else relative


def print_json(value: Any) -> None:
    """One JSON document on stdout."""
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=str))
