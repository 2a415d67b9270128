"""``tollway serve`` at run time: the service, its guard and metrics, and the API under uvicorn.

The composition root's runtime half. In one event loop (uvloop), in this order:

1. :meth:`Service.running` recovers the engine from disk, starts Redis (embedded unless
   ``redis_url``), the projector, the expiry sweeper, in settlement mode the worker, and runs
   the conservation guard's startup checks (new holds wait until they pass);
2. uvicorn (httptools) serves :func:`~tollway.api.create_app` on a socket bound here.

On SIGTERM or SIGINT the server stops accepting, lets in-flight requests finish (at most
``GRACEFUL_SHUTDOWN_S``), then the service drains in reverse order: background tasks stop,
every acknowledged command is already durable, the projection gets a last chance to catch up,
and the engine writes a final snapshot. A second signal during the shutdown only hurries the
HTTP part; the WAL is never cut short. Signal handling is ours, not uvicorn's: uvicorn would
re-raise the signal after its own shutdown and kill the process before the drain.

A fatal engine error (fail-stop) stops the server too, and the command exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Final

import uvicorn

from tollway.api import Authenticator, create_app
from tollway.config import Settings
from tollway.core.pricing import PriceTable
from tollway.net import url_of
from tollway.service import Service

log = logging.getLogger("tollway.serve")

GRACEFUL_SHUTDOWN_S: Final = 10
"""Seconds in-flight requests get to finish after a stop signal."""
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """What ``tollway serve`` runs with, besides the settings."""

    pricing: PriceTable
    authenticator: Authenticator
    guard_bypass: bool = False
    access_log: bool = False


class _Server(uvicorn.Server):
    """uvicorn without its signal handling (ours keeps the process alive through the drain)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Generator[None, None, None]:
    """Call ``stop()`` on SIGTERM/SIGINT while the block runs (and ignore nothing else)."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


class _Control:
    """Stop requests (signals, a fatal engine error) and the server they stop."""

    def __init__(self) -> None:
        self.stops = 0  # one may come before the server exists
        self.fatal: BaseException | None = None
        self.server: uvicorn.Server | None = None

    def stop(self) -> None:
        self.stops += 1
        if self.server is not None:
            self.server.force_exit = self.stops > 1  # a second signal: stop waiting for slow requests
            self.server.should_exit = True

    def on_fatal(self, exc: BaseException) -> None:
        self.fatal = exc
        self.stop()

    def attach(self, server: uvicorn.Server) -> uvicorn.Server:
        self.server = server
        server.should_exit = self.stops > 0
        return server


async def serve(settings: Settings, sock: socket.socket, options: ServeOptions, on_ready: Callable[[str], None]) -> int:
    """Run everything until a stop signal (exit code 0) or a fatal engine error (1)."""
    control = _Control()
    with stop_on_signals(control.stop):
        async with Service.running(settings, guard_bypass=options.guard_bypass) as service:
            app = create_app(service, authenticator=options.authenticator, pricing=options.pricing)
            service.engine.on_fatal = control.on_fatal
            server = control.attach(_Server(_uvicorn_config(app, options)))
            announcer = asyncio.create_task(_announce(server, on_ready, url_of(sock)))
            try:
                await server.serve(sockets=[sock])
            finally:
                announcer.cancel()
    return 1 if control.fatal is not None else 0


def _uvicorn_config(app: object, options: ServeOptions) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        http="httptools",
        ws="none",
        lifespan="off",
        log_config=None,  # logging is configured by the composition root
        access_log=options.access_log,
        # X-Forwarded-For/-Proto from a local proxy only change what the access log shows, and
        # checking the peer against the trusted hosts costs ~3 us per request: only with the log.
        proxy_headers=options.access_log,
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


async def _announce(server: uvicorn.Server, on_ready: Callable[[str], None], url: str) -> None:
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.01)
    on_ready(url)
