"""The settlement simulator (SPEC §8): a real HTTP server speaking the settlement contract.

It stands in for the external settlement ledger in tests and demos: it verifies the JWT,
finalizes each reservation exactly once (200, then 409), lists what it finalized, and injects
faults on demand (error rate, latency, outage, a forced status). What a request goes through is
described in :mod:`tollway.settlement.sim_app`; settings and faults in
:mod:`tollway.settlement.sim_config`.

This module runs it: :class:`SimulatorServer` (an async context manager, for tests and the
demo, on a free loopback port by default) and :func:`serve_simulator` (for the CLI). Both run
uvicorn inside the caller's event loop on a socket bound here, so the port is known before the
first request. Servers bind ``127.0.0.1`` unless told otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

import uvicorn
from fastapi import FastAPI

from tollway.core.errors import ConfigError
from tollway.net import bind
from tollway.settlement.sim_app import SimulatorState, create_simulator_app
from tollway.settlement.sim_config import Faults, SimulatorConfig, fault_status, update_faults

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "Faults",
    "SimulatorConfig",
    "SimulatorServer",
    "SimulatorState",
    "create_simulator_app",
    "fault_status",
    "serve_simulator",
    "update_faults",
]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8787
STARTUP_TIMEOUT_S: Final = 10.0
GRACEFUL_SHUTDOWN_S: Final = 5
"""Seconds in-flight requests (a long injected latency) get before shutdown cancels them."""
LISTEN_BACKLOG: Final = 128
_STARTUP_POLL_S: Final = 0.005


class SimulatorServer:
    """The simulator served by uvicorn in this event loop, on a socket it binds itself.

    ``async with SimulatorServer(config) as server:`` binds ``127.0.0.1`` on a free port
    (``port=0``), returns once the server accepts connections, and shuts it down gracefully on
    exit. ``server.url`` is the base URL; ``server.state`` the live state (for assertions).
    """

    def __init__(self, config: SimulatorConfig, host: str = DEFAULT_HOST, port: int = 0) -> None:
        self.app = create_simulator_app(config)
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> SimulatorState:
        """The running simulator's state."""
        return _state_of(self.app)

    @property
    def url(self) -> str:
        """The base URL clients use (the settlement_url)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> SimulatorServer:
        sock = bind(self.host, self.port, LISTEN_BACKLOG)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,  # logging is the composition root's business
            access_log=False,
            ws="none",
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        try:
            await self._wait_started(self._server, self._task)
        except BaseException:
            self._server.should_exit = True
            await asyncio.wait({self._task})  # whatever stopped it is already being raised
            sock.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()

    async def wait_closed(self) -> None:
        """Wait until the server stops (a signal); cancelling the waiter does not stop it."""
        assert self._task is not None, "use `async with SimulatorServer(...)`"
        await asyncio.shield(self._task)

    @staticmethod
    async def _wait_started(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT_S
        while not server.started:
            if task.done():
                task.result()  # re-raises what stopped it
                raise ConfigError("the settlement simulator stopped during startup")
            if loop.time() > deadline:
                raise TimeoutError(f"the settlement simulator did not start within {STARTUP_TIMEOUT_S} s")
            await asyncio.sleep(_STARTUP_POLL_S)

    async def _stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.shield(self._task)


def _state_of(app: FastAPI) -> SimulatorState:
    state: SimulatorState = app.state.simulator
    return state


async def serve_simulator(
    config: SimulatorConfig,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    ready: asyncio.Event | None = None,
    *,
    on_ready: Callable[[str], object] | None = None,
) -> None:
    """Serve the simulator until SIGINT/SIGTERM or until the calling task is cancelled.

    ``ready`` is set, and ``on_ready(url)`` called, once connections are accepted; ``port=0``
    picks a free port (the URL tells which). On a signal uvicorn shuts down gracefully and then
    re-raises the signal; under ``asyncio.run`` a SIGINT then ends the run quietly (or as a
    ``KeyboardInterrupt``, which a CLI should treat as a normal stop).
    """
    async with SimulatorServer(config, host, port) as server:
        if on_ready is not None:
            on_ready(server.url)
        if ready is not None:
            ready.set()
        await server.wait_closed()
