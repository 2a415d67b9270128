"""``tollway settlement-sim``: the settlement simulator as a process, for demos and end-to-end tests.

It trusts the public keys given with ``--public-key`` and, with ``--data-dir``, the service's own
settlement signing key (``<data_dir>/keys/settlement-signing-key.pem``, created if the service
has not made it yet), so ``tollway serve --data-dir D --settlement-url …`` and
``tollway settlement-sim --data-dir D`` work together without copying keys around.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Annotated

import typer

from tollway.cli.common import ConfigFile, clean_errors, settings_for
from tollway.core.errors import InvalidInput
from tollway.service import settlement_signing_key
from tollway.settlement.simulator import DEFAULT_HOST, DEFAULT_PORT, Faults, SimulatorConfig, serve_simulator
from tollway.tokens import VerificationKey


def _trusted_keys(data_dir: Path | None, config: Path | None) -> dict[str, VerificationKey]:
    if data_dir is None:
        return {}
    key, _ = settlement_signing_key(settings_for(config, data_dir))
    return {key.kid: key.public()}


@clean_errors
def settlement_sim(
    *,
    host: Annotated[str, typer.Option(help="Listen on this address.")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(min=0, max=65_535, help="Listen on this port (0: a free one).")] = DEFAULT_PORT,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", file_okay=False, help="Trust the settlement key of the service in this directory."),
    ] = None,
    public_key: Annotated[
        list[Path] | None,
        typer.Option("--public-key", dir_okay=False, help="Trust this PEM/JWK/JWKS file (repeatable)."),
    ] = None,
    audience: Annotated[str, typer.Option(help="The aud the tokens must carry.")] = "arrakis",
    error_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Fraction answered 500/503.")] = 0.0,
    latency_ms: Annotated[int, typer.Option(min=0, max=60_000, help="Delay before every answer.")] = 0,
    outage: Annotated[bool, typer.Option(help="Start in an outage (every call 503).")] = False,
    status_override: Annotated[int | None, typer.Option(help="Answer every call with this status.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the error-rate draws.")] = 0,
    state_file: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Keep the book of finalized reservations in this JSON file.")
    ] = None,
    config: ConfigFile = None,
) -> None:
    """Run a settlement service that verifies the JWT and finalizes each reservation exactly once.

    POST /api/internal/finalize answers 200 the first time and 409 after; faults can be
    injected at start (options) or at runtime (POST /admin/faults from loopback).
    """
    keys = _trusted_keys(data_dir, config)
    if not keys and not public_key:
        raise InvalidInput("give --data-dir or --public-key: the simulator must trust a key", field="public_key")
    faults = Faults(error_rate=error_rate, latency_ms=latency_ms, outage=outage, status_override=status_override)
    sim_config = SimulatorConfig(
        keys=keys,
        key_files=tuple(public_key or ()),
        audience=audience,
        faults=faults,
        seed=seed,
        state_path=state_file,
    )

    def ready(url: str) -> None:
        typer.echo(f"settlement simulator on {url} (finalize: {url}/api/internal/finalize)")

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_simulator(sim_config, host, port, on_ready=ready))


def register(app: typer.Typer) -> None:
    """Add ``settlement-sim`` to ``app``."""
    app.command("settlement-sim")(settlement_sim)
