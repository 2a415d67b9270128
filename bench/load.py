"""Load generation for ``bench/http.py`` and ``bench/rates.py``: the HTTP client, closed and open loops, wrk.

The closed loops count what ``--concurrency`` connections get done back to back, with wrk (the
pairs through ``bench/wrk_pairs.lua``) or a minimal HTTP/1.1 keep-alive client on asyncio
protocols; the open loop starts pairs on a fixed schedule and measures each reserve from when it
was *due*. Every phase reports how busy the generator and the server were (CPU over wall time).
Nothing here starts or stops the server (``bench/server.py``) or shapes the report
(``bench/report.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

FUNDING_MICRO: Final = 10**12  # per account: far more than any run can spend
ESTIMATE_MICRO: Final = 20_000
ACTUAL_MICRO: Final = 12_345
REQUEST_TIMEOUT_S: Final = 10.0
HEALTH_PATH: Final = "/healthz"
GENERATOR_LAG_P99_MS_MAX: Final = 1.0
"""An open-loop phase whose generator started pairs later than this at p99, though their
connections were free, measured the generator: ``valid`` is false (a tenth of the p99 target)."""
_ENTRY_ID: Final = re.compile(rb'"billing_entry_id":"([0-9A-Z]{26})"')
WRK_PAIRS_LUA: Final = Path(__file__).with_name("wrk_pairs.lua")


class BenchError(RuntimeError):
    """The benchmark itself went wrong (a refusal, a server that did not start): its numbers are void."""


# -- a minimal HTTP/1.1 keep-alive client ----------------------------------------------------


class Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; responses must carry Content-Length."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        """Complete the waiting request once its whole response is here."""
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        start = head.find(b"\r\ncontent-length:")
        if start < 0:
            self.waiter.set_exception(BenchError(f"a response without content-length: {head[:200]!r}"))
            return
        stop = head.find(b"\r\n", start + 2)
        length = int(head[start + 17 : stop if stop >= 0 else len(head)])
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        self.waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail the waiting request."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(BenchError(f"the server closed the connection: {exc}"))

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send one request; (status, body) of its response (callers bound the time of a whole phase)."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter

    def close(self) -> None:
        """Close the connection."""
        if self.transport is not None:
            self.transport.close()


@dataclass(frozen=True)
class Target:
    """The server under test and how to talk to it."""

    host: str
    port: int
    gateway_token: str
    admin_token: str
    server_pid: int | None = None

    def request(self, method: str, path: str, body: bytes = b"", *, admin: bool = False) -> bytes:
        """The bytes of one HTTP/1.1 request."""
        token = self.admin_token if admin else self.gateway_token
        head = f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\nauthorization: Bearer {token}\r\n"
        if body:
            head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        return head.encode() + b"\r\n" + body

    async def connect(self) -> Connection:
        """A new keep-alive connection."""
        _, protocol = await asyncio.get_running_loop().create_connection(Connection, self.host, self.port)
        return protocol


def account_name(index: int) -> str:
    return f"acct-{index:06d}"


def reserve_request(target: Target, account: str, request_id: str) -> bytes:
    body = b'{"account_id":"%s","request_id":"%s","estimated_cost_micro":"%d"}' % (
        account.encode(),
        request_id.encode(),
        ESTIMATE_MICRO,
    )
    return target.request("POST", "/v1/reservations", body)


def commit_request(target: Target, entry_id: bytes) -> bytes:
    body = b'{"actual_cost_micro":"%d"}' % ACTUAL_MICRO
    return target.request("POST", f"/v1/reservations/{entry_id.decode()}/commit", body)


async def pair(connection: Connection, target: Target, account: str, request_id: str) -> int:
    """One reserve → commit pair; when the reserve's answer arrived (perf_counter ns).

    Anything but 201 then 200 voids the run.
    """
    status, body = await connection.exchange(reserve_request(target, account, request_id))
    reserved_ns = time.perf_counter_ns()
    found = _ENTRY_ID.search(body)
    if status != 201 or found is None:
        raise BenchError(f"reserve answered {status}: {body[:300]!r}")
    status, body = await connection.exchange(commit_request(target, found.group(1)))
    if status != 200:
        raise BenchError(f"commit answered {status}: {body[:300]!r}")
    return reserved_ns


# -- closed loop in Python -------------------------------------------------------------------


@dataclass
class Window:
    """What the workers saw while the measuring window was open."""

    measuring: bool = False
    stop: bool = False
    done: int = 0
    reserve_ns: list[int] = field(default_factory=list)


Step = Callable[[Connection, int, int], Awaitable[int | None]]


async def closed_loop(target: Target, concurrency: int, seconds: float, warmup_s: float, step: Step) -> dict[str, Any]:
    """``concurrency`` connections each running ``step`` back to back; counts steps done in the window."""
    window = Window()
    connections = [await target.connect() for _ in range(concurrency)]

    async def worker(number: int, connection: Connection) -> None:
        index = 0
        while not window.stop:
            measured = window.measuring
            sample = await step(connection, number, index)
            index += 1
            if measured and window.measuring:
                window.done += 1
                if sample is not None:
                    window.reserve_ns.append(sample)

    tasks = [asyncio.create_task(worker(number, conn)) for number, conn in enumerate(connections)]
    try:
        await asyncio.sleep(warmup_s)
        before = Usage.now(target.server_pid)
        window.measuring = True
        await asyncio.sleep(seconds)
        window.measuring = False
        after = Usage.now(target.server_pid)
        window.stop = True
        await asyncio.wait_for(asyncio.gather(*tasks), REQUEST_TIMEOUT_S)
    finally:
        for task in tasks:
            task.cancel()
        for connection in connections:
            connection.close()
    elapsed = after.wall_s - before.wall_s
    return {"done": window.done, "window_s": round(elapsed, 3), "reserve_ns": window.reserve_ns} | after.busy(before)


def billing_step(target: Target, run: str, accounts: int) -> Step:
    async def step(connection: Connection, worker: int, index: int) -> int:
        account = account_name((worker * 7919 + index) % accounts)
        started_ns = time.perf_counter_ns()
        return await pair(connection, target, account, f"{run}-{worker}-{index}") - started_ns

    return step


def bare_step(target: Target) -> Step:
    request = target.request("GET", HEALTH_PATH)

    async def step(connection: Connection, worker: int, index: int) -> None:  # noqa: ARG001 - a Step
        status, body = await connection.exchange(request)
        if status != 200:
            raise BenchError(f"{HEALTH_PATH} answered {status}: {body[:300]!r}")

    return step


# -- open loop: a fixed schedule at a share of the maximum rate ------------------------------


@dataclass
class OpenLoop:
    """Pairs due on a fixed schedule, started in order by whichever connection is free first.

    Each connection's worker takes the next pair of the schedule as soon as it is free and
    waits for its due time (if it is not already late): the same as a queue of due pairs in
    front of a connection pool, without a task per pair.
    """

    target: Target
    accounts: int
    count: int
    start_ns: int
    interval_ns: float
    run: str
    next_index: int = 0
    reserve_ns: list[int] = field(default_factory=list)  # answer time minus due time
    start_lag_ns: list[int] = field(default_factory=list)  # when the pair was sent, minus due time
    generator_lag_ns: list[int] = field(default_factory=list)  # the same, for pairs whose connection was free in time

    async def worker(self, connection: Connection) -> None:
        """Start pairs, one at a time, until the schedule is exhausted."""
        while self.next_index < self.count:
            index = self.next_index
            self.next_index += 1
            due_ns = self.start_ns + int(index * self.interval_ns)
            free_ns = time.perf_counter_ns()
            await sleep_until(due_ns)
            sent_ns = time.perf_counter_ns()
            self.start_lag_ns.append(sent_ns - due_ns)
            if free_ns < due_ns:  # nothing of the server's held this pair back: its lateness is the generator's
                self.generator_lag_ns.append(sent_ns - due_ns)
            account = account_name(index % self.accounts)
            reserved_ns = await pair(connection, self.target, account, f"{self.run}-{index}")
            self.reserve_ns.append(reserved_ns - due_ns)


async def open_loop(
    target: Target, rate_per_s: float, seconds: float, concurrency: int, accounts: int
) -> dict[str, Any]:
    """Pairs due every ``1 / rate_per_s`` s for ``seconds``; reserve latency counted from when each was due."""
    count = max(1, math.floor(rate_per_s * seconds))
    opened = [await target.connect() for _ in range(concurrency)]
    run = OpenLoop(
        target, accounts, count, time.perf_counter_ns() + 1_000_000, 1e9 / rate_per_s, f"open{time.time_ns()}"
    )
    before = Usage.now(target.server_pid)
    tasks = [asyncio.create_task(run.worker(connection)) for connection in opened]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), seconds + REQUEST_TIMEOUT_S * 2)
    finally:
        for task in tasks:
            task.cancel()
        for connection in opened:
            connection.close()
    after = Usage.now(target.server_pid)
    generator_lag_p99_ms = percentile_ms(run.generator_lag_ns, 99)
    return {
        "rate_pairs_per_s": round(rate_per_s, 1),
        "scheduled": count,
        "completed": len(run.reserve_ns),
        "achieved_pairs_per_s": round(len(run.reserve_ns) / (after.wall_s - before.wall_s), 1),
        "reserve_p50_ms": percentile_ms(run.reserve_ns, 50),
        "reserve_p99_ms": percentile_ms(run.reserve_ns, 99),
        "reserve_max_ms": percentile_ms(run.reserve_ns, 100),
        "start_lag_p99_ms": percentile_ms(run.start_lag_ns, 99),
        "generator_lag_p99_ms": generator_lag_p99_ms,
        "generator_lag_samples": len(run.generator_lag_ns),
        "valid": generator_lag_p99_ms is None or generator_lag_p99_ms <= GENERATOR_LAG_P99_MS_MAX,
        "connections": concurrency,
    } | after.busy(before)


async def sleep_until(due_ns: int) -> None:
    """Sleep until ``due_ns``, yielding to the loop (not sleeping) for the last 1.5 ms: timers are coarse."""
    while (wait_ns := due_ns - time.perf_counter_ns()) > 0:  # noqa: ASYNC110 - a deadline, not an event
        await asyncio.sleep(0 if wait_ns < 1_500_000 else (wait_ns - 1_000_000) / 1e9)


# -- CPU usage: is it the server's limit or the generator's? ---------------------------------


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), from ``/proc`` (Linux)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def child_pids(pid: int) -> list[int] | None:
    """The live child processes of ``pid``, from ``/proc`` (Linux); None when it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return None


def children_cpu_s(pid: int) -> float | None:
    """CPU seconds of the live child processes of ``pid`` (the server's embedded redis-server)."""
    children = child_pids(pid)
    return None if children is None else sum(process_cpu_s(child) or 0.0 for child in children)


@dataclass(frozen=True)
class Usage:
    """Wall clock and CPU time of the generator (this process and its children, e.g. wrk) and of the server."""

    wall_s: float
    generator_s: float
    server_s: float | None
    server_children_s: float | None

    @classmethod
    def now(cls, server_pid: int | None = None) -> Usage:
        """The counters now."""
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = time.process_time() + children.ru_utime + children.ru_stime
        server = process_cpu_s(server_pid) if server_pid else None
        return cls(time.perf_counter(), own, server, children_cpu_s(server_pid) if server_pid else None)

    def busy(self, before: Usage) -> dict[str, float | None]:
        """CPU time over wall time since ``before``: 1.0 is one core saturated."""
        elapsed = self.wall_s - before.wall_s

        def share(now: float | None, then: float | None) -> float | None:
            return None if now is None or then is None else round((now - then) / elapsed, 3)

        return {
            "generator_cpu_busy": share(self.generator_s, before.generator_s),
            "server_cpu_busy": share(self.server_s, before.server_s),
            "server_children_cpu_busy": share(self.server_children_s, before.server_children_s),
        }


def percentile_ms(samples_ns: list[int], pct: float) -> float | None:
    """Nearest-rank percentile of nanosecond samples, in milliseconds."""
    if not samples_ns:
        return None
    ordered = sorted(samples_ns)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return round(ordered[rank - 1] / 1e6, 3)


# -- closed loop with wrk --------------------------------------------------------------------

_WRK_TOTAL: Final = re.compile(r"(\d+) requests in ([0-9.]+)(us|ms|s|m)\b")
_WRK_ERRORS: Final = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON_2XX: Final = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_WRK_PAIRS: Final = re.compile(r"TOLLWAY reserves=(\d+) commits=(\d+) failures=(\d+)")
_SECONDS_PER_UNIT: Final = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def run_wrk(
    target: Target, path: str, concurrency: int, seconds: float, script: Path | None = None, *script_args: str
) -> tuple[str, dict[str, Any]]:
    """Run wrk (one thread) against ``path``; its output and the CPU usage while it ran."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("wrk is not installed")
    duration_s = max(1, round(seconds))  # wrk takes whole seconds
    url = f"http://{target.host}:{target.port}{path}"
    command = [wrk, "-t1", f"-c{concurrency}", f"-d{duration_s}s", f"--timeout={int(REQUEST_TIMEOUT_S)}s"]
    command += ["-s", str(script), url, "--", *script_args] if script is not None else [url]
    before = Usage.now(target.server_pid)
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    after = Usage.now(target.server_pid)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip()[:500]}")
    errors = _WRK_ERRORS.search(done.stdout)
    if errors is not None and any(int(value) for value in errors.groups()):
        raise BenchError(f"wrk saw socket errors: {errors.group(0)}")
    if done.stderr.strip():
        raise BenchError(f"wrk reported: {done.stderr.strip()[:500]}")
    return done.stdout, after.busy(before)


def wrk_window(output: str) -> tuple[int, float]:
    """(requests, seconds) wrk reports for its whole run."""
    total = _WRK_TOTAL.search(output)
    if total is None:
        raise BenchError(f"unexpected wrk output: {output[:500]}")
    return int(total.group(1)), float(total.group(2)) * _SECONDS_PER_UNIT[total.group(3)]


def wrk_bare(target: Target, concurrency: int, seconds: float) -> dict[str, Any]:
    """``GET /healthz`` in a closed loop with wrk."""
    output, busy = run_wrk(target, HEALTH_PATH, concurrency, seconds)
    non_2xx = _WRK_NON_2XX.search(output)
    if non_2xx is not None:
        raise BenchError(f"{HEALTH_PATH} answered {non_2xx.group(1)} non-2xx responses")
    requests, window_s = wrk_window(output)
    return {"done": requests, "window_s": round(window_s, 3)} | busy


def wrk_pairs(target: Target, concurrency: int, seconds: float, accounts: int, script: Path) -> dict[str, Any]:
    """Reserve → commit pairs in a closed loop with wrk and :data:`WRK_PAIRS_LUA`."""
    run = f"wrk{time.time_ns()}"
    output, busy = run_wrk(target, "/", concurrency, seconds, script, run, str(accounts), target.gateway_token)
    counted = _WRK_PAIRS.search(output)
    if counted is None:
        raise BenchError(f"the wrk script reported nothing: {output[:500]}")
    reserves, commits, failures = (int(value) for value in counted.groups())
    if failures:
        raise BenchError(f"{failures} billing requests failed under wrk")
    _, window_s = wrk_window(output)
    return {"done": commits, "reserves": reserves, "window_s": round(window_s, 3), "reserve_ns": []} | busy


def write_wrk_script(path: Path) -> Path:
    """``bench/wrk_pairs.lua`` with this run's amounts, written to ``path``."""
    text = WRK_PAIRS_LUA.read_text().replace("ACTUAL", str(ACTUAL_MICRO)).replace("ESTIMATE", str(ESTIMATE_MICRO))
    path.write_text(text)
    return path


def use_wrk(choice: str) -> bool:
    if choice == "wrk" and shutil.which("wrk") is None:
        raise BenchError("--generator wrk: wrk is not installed")
    return choice == "wrk" or (choice == "auto" and shutil.which("wrk") is not None)


def wrk_version() -> str | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (done.stdout + done.stderr).strip().split("\n")[0][:80] or "installed"
