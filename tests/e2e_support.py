"""Real processes for the end-to-end tests: ``tollway serve``, ``tollway settlement-sim``, ``tollway audit``.

Each process is started with ``sys.executable -m tollway.cli …`` in the test's own ``tmp_path``,
its stdout and stderr in files next to the data directory (read them when a test fails), with
every ``TOLLWAY_*`` variable of the caller's environment removed so only the test's settings
apply. Nothing is slept blindly: a process is ready when it printed its URL (it binds port 0, so
the port is always free) *and* answers its readiness endpoint; every wait polls at
:data:`POLL_S` and gives up after a timeout.

``tollway serve`` starts a private ``redis-server`` as a child. :class:`Serve` records that
child's pid once the service is ready, and :meth:`Serve.close` (always called in a ``finally``)
checks it is gone after the service stopped — however it stopped, ``kill -9`` included — and
SIGKILLs a leftover by that pid only.

The tests talk to the service only through the SDK (:class:`tollway.client.AsyncClient`) and to
the simulator through its admin endpoints and its settlement contract over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Final

import httpx

from tollway import Settings
from tollway.client import AsyncClient, TransportFailure
from tollway.service import settlement_signing_key
from tollway.settlement.client import FinalizedItem, SettlementAuth, SettlementClient

START_TIMEOUT_S: Final = 45.0
"""From spawn until ready (WAL recovery, Redis, guard checks); generous for a loaded machine."""
STOP_TIMEOUT_S: Final = 30.0
"""From a stop signal until the process exited (the service drains and snapshots)."""
REDIS_GONE_TIMEOUT_S: Final = 10.0
AUDIT_TIMEOUT_S: Final = 60.0
POLL_S: Final = 0.05
LOOPBACK: Final = "127.0.0.1"
REDIS_BINARY_NAME: Final = "redis-server"
POOL_CONNECTIONS_DEFAULT: Final = 64


class ProcessFailed(AssertionError):
    """A process under test did not start, or exited when it should not have; the message quotes its output."""


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without ``TOLLWAY_*``, unbuffered, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TOLLWAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def tollway_argv(*args: str) -> list[str]:
    """The command line of ``tollway ARGS`` in this interpreter."""
    return [sys.executable, "-m", "tollway.cli", *args]


def sdk(url: str, token: str, *, connections: int = POOL_CONNECTIONS_DEFAULT, timeout_s: float = 30.0) -> AsyncClient:
    """An SDK client of ``url`` with a connection pool of ``connections`` (no proxies from the environment)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return AsyncClient(url, token, transport=httpx.AsyncHTTPTransport(limits=limits), timeout_s=timeout_s)


# -- processes ---------------------------------------------------------------------------------


class Process:
    """One child process with its stdout and stderr in ``<log_dir>/<name>.out`` / ``.err``."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.out_path = log_dir / f"{name}.out"
        self.err_path = log_dir / f"{name}.err"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=clean_environment(env), cwd=log_dir
            )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def output(self) -> str:
        """Everything it printed on stdout so far."""
        return self.out_path.read_text(errors="replace")

    def describe(self) -> str:
        """Its exit status and the tails of its output, for failure messages."""
        out = self.output()[-2000:]
        err = self.err_path.read_text(errors="replace")[-4000:]
        return f"{self.name} (pid {self.pid}, exit {self.popen.poll()}):\n--- stdout\n{out}\n--- stderr\n{err}"

    async def wait_for_output(self, marker: str, timeout_s: float = START_TIMEOUT_S) -> str:
        """The first stdout line containing ``marker``; fails if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.output().splitlines():
                if marker in line:
                    return line
            if self.popen.poll() is not None:
                raise ProcessFailed(f"exited before printing {marker!r}: {self.describe()}")
            if time.monotonic() > deadline:
                raise ProcessFailed(f"did not print {marker!r} within {timeout_s} s: {self.describe()}")
            await asyncio.sleep(POLL_S)

    async def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """The exit status, once it exited; fails after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (code := self.popen.poll()) is None:
            if time.monotonic() > deadline:
                raise ProcessFailed(f"did not exit within {timeout_s} s: {self.describe()}")
            await asyncio.sleep(POLL_S)
        return code

    async def stop(self, sig: signal.Signals, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Send ``sig`` and return the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        return await self.wait_exit(timeout_s)

    def kill(self) -> None:
        """SIGKILL it (if it still runs) and reap it: the ``finally`` path."""
        if self.popen.poll() is None:
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(STOP_TIMEOUT_S)


def _proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(command name, state letter, parent pid) of a live process, None once it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    state, ppid = text[text.rindex(")") + 2 :].split()[:2]
    return None if state in {"Z", "X"} else (name, state, int(ppid))


def children_named(parent_pid: int, name: str) -> list[int]:
    """The live child processes of ``parent_pid`` whose command name is ``name`` (Linux ``/proc``)."""
    found = []
    for entry in Path("/proc").iterdir():
        stat = _proc_stat(int(entry.name)) if entry.name.isdecimal() else None
        if stat is not None and stat[0] == name and stat[2] == parent_pid:
            found.append(int(entry.name))
    return sorted(found)


async def wait_gone(pids: list[int], name: str, timeout_s: float = REDIS_GONE_TIMEOUT_S) -> list[int]:
    """Wait until none of ``pids`` runs ``name`` any more; the ones still running after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [pid for pid in pids if (stat := _proc_stat(pid)) is not None and stat[0] == name]
        if not alive or time.monotonic() > deadline:
            return alive
        await asyncio.sleep(POLL_S)


class Serve:
    """One run of ``tollway serve --data-dir D --port 0`` (embedded Redis); a restart is a new instance."""

    def __init__(
        self,
        data_dir: Path,
        log_dir: Path,
        name: str,
        *,
        settlement_url: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        args = ["serve", "--data-dir", str(data_dir), "--host", LOOPBACK, "--port", "0", "--log-level", "warning"]
        if settlement_url is not None:
            args += ["--settlement-url", settlement_url]
        self.data_dir = data_dir
        self.process = Process(name, tollway_argv(*args), log_dir, env)
        self.url = ""
        self.redis_pids: list[int] = []

    async def ready(self) -> None:
        """Wait for the URL, then for ``/readyz`` to say ready (new holds allowed); note the Redis child."""
        line = await self.process.wait_for_output("serving on ")
        self.url = line.split("serving on ", 1)[1].split()[0]
        deadline = time.monotonic() + START_TIMEOUT_S
        async with AsyncClient(self.url, None) as client:
            while not await _ready(client):
                if self.process.popen.poll() is not None or time.monotonic() > deadline:
                    raise ProcessFailed(f"not ready at {self.url}: {self.process.describe()}")
                await asyncio.sleep(POLL_S)
        self.redis_pids = children_named(self.process.pid, REDIS_BINARY_NAME)
        assert 1 == len(self.redis_pids), f"expected one embedded redis-server: {self.redis_pids}"

    def printed_token(self, label: str) -> str:
        """The ``admin`` or ``gateway`` token a first start prints (the line after its label)."""
        lines = self.process.output().splitlines()
        for index, line in enumerate(lines[:-1]):
            if f"{label} token" in line:
                return lines[index + 1].strip()
        raise ProcessFailed(f"no {label} token printed: {self.process.describe()}")

    async def sigterm(self) -> int:
        """SIGTERM: the service drains and exits; its status."""
        return await self.process.stop(signal.SIGTERM)

    async def sigkill(self) -> int:
        """kill -9, as a crash; its status (``-SIGKILL``)."""
        return await self.process.stop(signal.SIGKILL)

    async def close(self) -> list[int]:
        """Kill the service if it still runs, then the embedded Redis pids still running afterwards (killed).

        The caller asserts the list is empty: a Redis that outlives its service is a defect.
        """
        self.process.kill()
        left = await wait_gone(self.redis_pids, REDIS_BINARY_NAME)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left


@contextlib.asynccontextmanager
async def serving(
    data_dir: Path,
    log_dir: Path,
    name: str,
    *,
    settlement_url: str | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Serve]:
    """A ready :class:`Serve`; on exit it is killed if still running and its Redis must be gone."""
    serve = Serve(data_dir, log_dir, name, settlement_url=settlement_url, env=env)
    try:
        await serve.ready()
        yield serve
    finally:
        left = await serve.close()
    assert [] == left, f"embedded redis-server still running after {name} stopped"


async def _ready(client: AsyncClient) -> bool:
    try:
        return bool((await client.ready()).get("ready"))
    except (TransportFailure, ValueError):  # not listening yet, or not JSON yet
        return False


class Simulator:
    """``tollway settlement-sim --data-dir D --port 0``: it trusts the settlement key of the service in D."""

    def __init__(self, data_dir: Path, log_dir: Path) -> None:
        args = ["settlement-sim", "--data-dir", str(data_dir), "--host", LOOPBACK, "--port", "0"]
        self.data_dir = data_dir
        self.process = Process("settlement-sim", tollway_argv(*args), log_dir)
        self.url = ""
        self._http: httpx.AsyncClient | None = None

    async def ready(self) -> None:
        """Wait for the URL, then for ``/admin/stats`` to answer."""
        line = await self.process.wait_for_output("settlement simulator on ")
        self.url = line.split("settlement simulator on ", 1)[1].split()[0]
        self._http = httpx.AsyncClient(base_url=self.url, timeout=10.0, trust_env=False)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await self._http.get("/admin/stats")).status_code == 200:
                    return
            if self.process.popen.poll() is not None or time.monotonic() > deadline:
                raise ProcessFailed(f"simulator not ready at {self.url}: {self.process.describe()}")
            await asyncio.sleep(POLL_S)

    async def set_faults(self, **changes: object) -> dict[str, Any]:
        """POST /admin/faults; the faults now in force."""
        assert self._http is not None
        response = await self._http.post("/admin/faults", json=changes)
        assert 200 == response.status_code, response.text
        faults: dict[str, Any] = response.json()
        return faults

    async def stats(self) -> dict[str, Any]:
        """GET /admin/stats: calls by status, finalized count, conflicts."""
        assert self._http is not None
        response = await self._http.get("/admin/stats")
        assert 200 == response.status_code, response.text
        stats: dict[str, Any] = response.json()
        return stats

    async def finalized(self) -> list[FinalizedItem]:
        """Every finalized reservation, read through the settlement contract with the service's key."""
        key, _ = settlement_signing_key(Settings(data_dir=self.data_dir))
        items: list[FinalizedItem] = []
        async with SettlementClient.from_url(self.url, SettlementAuth(signing_key=key), timeout_ms=10_000) as client:
            cursor: str | None = None
            for _ in range(10_000):  # a bound: pages of 1000
                page = await client.list_finalized(cursor, limit=1000)
                items.extend(page.items)
                if page.next_cursor is None:
                    return items
                cursor = page.next_cursor
        raise AssertionError("the finalized list did not end")

    async def close(self) -> None:
        """Stop it (SIGINT, a normal stop for it) or kill it; close the admin client."""
        if self._http is not None:
            await self._http.aclose()
        with contextlib.suppress(ProcessFailed):
            await self.process.stop(signal.SIGINT, timeout_s=10.0)
        self.process.kill()


async def audit(data_dir: Path, log_dir: Path) -> subprocess.CompletedProcess[str]:
    """``tollway audit --data-dir D``, run to completion."""
    return await asyncio.to_thread(
        subprocess.run,
        tollway_argv("audit", "--data-dir", str(data_dir)),
        capture_output=True,
        text=True,
        env=clean_environment(),
        cwd=log_dir,
        timeout=AUDIT_TIMEOUT_S,
        check=False,
    )
