"""The ``tollway`` command line: a composition root.

This package (with the ASGI app factory) is the only place that reads the environment,
configures logging or tunes the process. Settings come from
:func:`~tollway.config.settings_from_environment`: an optional TOML file (``--config`` or
``TOLLWAY_CONFIG``), then ``TOLLWAY_*`` variables, then the command's own options.

Exit codes: 0 — done and sound; 1 — the command ran and found a problem (a corrupt WAL, an
audit difference, a demo whose verdict is not clean, a fatal engine error while serving); 2 —
it could not run at all (bad options or settings, a locked or unreadable data directory, an
API error): one ``tollway: error: …`` line on stderr, never a traceback.

Commands (one module each)::

    tollway serve          --data-dir D [--host H] [--port P] [--redis-url U] [--settlement-url U]   serve.py
    tollway token issue    --data-dir D --scope S [--accounts a,b*] [--ttl-s N] [--new-key]        serve.py
    tollway wal verify|inspect, tollway audit                                                        local.py
    tollway demo                                                                                     demo.py
    tollway accounts balance|mint|history, tollway dlq list|replay   (through the HTTP API)         remote.py
    tollway --version
    tollway settlement-sim [--data-dir D] [--public-key F]... [faults]                              sim.py
    tollway cluster init|status|verify|audit --postgres-url URL   (PostgreSQL only, no node needed) cluster.py
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from typing import Annotated

import typer

from tollway.cli import cluster, demo, local, remote, serve, sim
from tollway.cli.common import Group
from tollway.logs import configure_logging

app = typer.Typer(
    cls=Group,
    name="tollway",
    help="tollway: the billing loop for AI-inference gateways (reserve, commit, finalize).",
    epilog="Exit codes: 0 done and sound; 1 a problem was found (corrupt WAL, audit difference); 2 could not run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs are re-flowed; [brackets] are not markup
)
for module in (serve, local, demo, remote, sim, cluster):
    module.register(app)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tollway {version('tollway')}")
        raise typer.Exit


@app.callback()
def _options(
    *,
    show_version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """tollway: the billing loop for AI-inference gateways (reserve, commit, finalize)."""


def main() -> None:
    """The ``tollway`` console script: warnings and errors logged (JSON unless on a terminal), then the command."""
    configure_logging("WARNING", json=not sys.stderr.isatty())
    app()


__all__ = ["app", "main"]
