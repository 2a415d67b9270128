"""Everything the demo runs: a settlement simulator process, and the service with its HTTP API.

:func:`demo_stack` starts, in this order, on free loopback ports:

1. ``tollway settlement-sim`` as a separate process (as the real settlement service would be),
   trusting the service's settlement signing key; faults are switched through its admin API;
2. the :class:`~tollway.service.Service` in settlement mode — engine (fsynced WAL), a private
   ``redis-server``, projector, finalize worker, expiry sweeper, conservation guard — with a
   short breaker cooldown so the outage and its recovery fit in a minute;
3. the HTTP API under uvicorn, and an SDK client with a gateway token for the remote gateways.

On exit everything stops in reverse order and the engine writes its final snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import uvicorn

from tollway.api import Authenticator, create_app
from tollway.api.auth import development_key, issue_token
from tollway.client import AsyncClient
from tollway.config import Settings
from tollway.core.errors import ConfigError
from tollway.net import bind, url_of
from tollway.pricing import default_prices
from tollway.service import Service, settlement_signing_key

DEMO_BREAKER_COOLDOWN_MS: Final = 3_000
DEMO_SWEEP_INTERVAL_MS: Final = 200
DEMO_WORKER_CONCURRENCY: Final = 64
SERVER_START_TIMEOUT_S: Final = 10.0
SIMULATOR_START_TIMEOUT_S: Final = 20.0
SIMULATOR_STOP_TIMEOUT_S: Final = 10.0
_READY: Final = re.compile(r"settlement simulator on (http://\S+?) ")


class SimulatorProcess:
    """``tollway settlement-sim`` in a child process, and its admin API."""

    def __init__(self, process: asyncio.subprocess.Process, url: str, admin: httpx.AsyncClient) -> None:
        self.process = process
        self.url = url
        self.admin = admin

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, data_dir: Path) -> AsyncIterator[SimulatorProcess]:
        """Start it on a free port, trusting ``data_dir``'s settlement key; stop it on exit."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tollway.cli",
            "settlement-sim",
            "--data-dir",
            str(data_dir),
            "--port",
            "0",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            url = await _announced_url(process)
            async with httpx.AsyncClient(base_url=url, timeout=5, trust_env=False) as admin:
                yield cls(process, url, admin)
        finally:
            if process.returncode is None:
                process.terminate()
                await asyncio.wait_for(process.wait(), SIMULATOR_STOP_TIMEOUT_S)

    async def set_faults(self, **faults: object) -> None:
        """Change the injected faults (``outage``, ``error_rate``, ``latency_ms``, ...)."""
        (await self.admin.post("/admin/faults", json=faults)).raise_for_status()

    async def stats(self) -> dict[str, Any]:
        """Calls by status, finalized count, faults."""
        response = await self.admin.get("/admin/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats


async def _announced_url(process: asyncio.subprocess.Process) -> str:
    """The URL the simulator prints when it is ready."""
    assert process.stdout is not None
    async with asyncio.timeout(SIMULATOR_START_TIMEOUT_S):
        while line := (await process.stdout.readline()).decode():
            match = _READY.search(line)
            if match:
                return match.group(1)
    raise ConfigError("the settlement simulator exited before it was ready")


@dataclass
class Stack:
    """The running parts the demo drives and watches."""

    service: Service
    simulator: SimulatorProcess
    api_url: str
    remote: AsyncClient


def demo_settings(settings: Settings, settlement_url: str) -> Settings:
    """The demo's settings: the user's, in settlement mode with demo-sized timers."""
    return settings.replace(
        settlement_url=settlement_url,
        breaker_cooldown_ms=DEMO_BREAKER_COOLDOWN_MS,
        sweep_interval_ms=DEMO_SWEEP_INTERVAL_MS,
        worker_concurrency=DEMO_WORKER_CONCURRENCY,
        http_port=0,
    )


@contextlib.asynccontextmanager
async def demo_stack(settings: Settings) -> AsyncIterator[Stack]:
    """Start the simulator, the service and the API; stop them all on exit."""
    settlement_signing_key(settings)  # created now, so the simulator can trust it
    async with SimulatorProcess.running(settings.data_dir) as simulator:
        configured = demo_settings(settings, simulator.url)
        async with (
            Service.running(configured) as service,
            _api(service, configured) as (url, token),
            AsyncClient(url, token) as remote,
        ):
            yield Stack(service, simulator, url, remote)


@contextlib.asynccontextmanager
async def _api(service: Service, settings: Settings) -> AsyncIterator[tuple[str, str]]:
    """The HTTP API on a free port, and a gateway token for it."""
    signing_key, _ = development_key(settings)
    app = create_app(service, authenticator=Authenticator.from_settings(settings), pricing=default_prices())
    sock = bind(settings.http_host, 0)
    config = uvicorn.Config(app, http="httptools", ws="none", lifespan="off", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(SERVER_START_TIMEOUT_S):
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
                await asyncio.sleep(0.01)
        yield url_of(sock), issue_token(signing_key, settings, ["billing:gateway"], subject="demo-gateway")
    finally:
        server.should_exit = True
        await task
        sock.close()
