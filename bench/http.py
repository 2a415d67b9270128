"""HTTP benchmark of ``tollway serve``: billing throughput and latency against the bare stack.

``python bench/http.py --json`` prints one JSON object; without ``--json`` a short table. It
starts a real ``tollway serve`` (durability fsync, the embedded Redis, default settings, the
default log level) in a temporary data directory, pinned to CPU 0, and loads it from this
process pinned to CPU 1, so server and load generator never share a core. Phases, in order:

- **warm-up**: reserve → commit pairs for ``--warmup`` seconds (not reported);
- **bare**: ``GET /healthz`` — the service's no-op route, on the same server stack (uvicorn
  with httptools, the FastAPI app, its middleware and router) — in a closed loop at
  ``--concurrency`` connections: ``ceiling.bare_requests_per_s``, what this stack answers on
  one core when a request costs nothing else;
- **billing**: ``--concurrency`` connections each looping ``POST /v1/reservations`` then
  ``POST /v1/reservations/{id}/commit`` (gateway token from ``tollway token issue``) against
  ``--accounts`` funded accounts: ``pairs_per_s`` and ``billing_requests_per_s`` (= 2 × pairs);
- **open loop**: pairs started on a fixed schedule at 80 % of the measured pair rate, each
  taking a free keep-alive connection (at most ``--concurrency``): ``reserve_p50_ms`` and
  ``reserve_p99_ms``, measured from the moment the pair was *due*, so a late start (no free
  connection, a slow server) counts as latency instead of hiding it.

The closed-loop phases use ``wrk`` (HTTP/1.1 keep-alive, one thread; pairs through a small
Lua script) when it is installed and ``--generator`` allows it; otherwise, and always for
the open loop, a minimal HTTP/1.1 client on asyncio protocols (uvloop) in this process. The
report names the generator and how busy it and the server were (CPU time over wall time):
a generator near 1.0 means the figure is the generator's limit, not the server's.
"""

# ruff: noqa: A005 - the name the issue gives; this script imports nothing that needs the stdlib's http

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import uvloop

from tollway.config import ENV_PREFIX, Settings, load_settings
from tollway.core.errors import ConfigError

if __package__ in (None, ""):  # run as a script: make the repository root importable for bench.*
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import (
    add_scratch_arguments,
    emit,
    idle_cost,
    loadavg,
    machine_facts,
    scratch_dir,
    slow_windows,
    wakeup_latency,
)

TARGETS: Final[dict[str, float]] = {"billing_ratio_min": 0.5, "reserve_p99_ms_max_at_80pct": 10}
SERVER_CPU: Final = 0
GENERATOR_CPU: Final = 1
OPEN_LOOP_SHARE: Final = 0.8
WAKEUP_PROBE_S: Final = 2.0
WAKEUP_PROBE_S_QUICK: Final = 0.2
IDLE_COST_ROUNDS: Final = 100  # about 1.5 s: each round sleeps 14.5 ms
IDLE_COST_ROUNDS_QUICK: Final = 10
SLOW_PROBE_S: Final = 6.0  # the slow windows seen on a shared VM came every 1.3-1.7 s
SLOW_PROBE_S_QUICK: Final = 0.3
FUNDING_MICRO: Final = 10**12  # per account: far more than any run can spend
ESTIMATE_MICRO: Final = 20_000
ACTUAL_MICRO: Final = 12_345
START_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 30.0
REQUEST_TIMEOUT_S: Final = 10.0
FUNDING_CONCURRENCY: Final = 32
HEALTH_PATH: Final = "/healthz"
_ENTRY_ID: Final = re.compile(rb'"billing_entry_id":"([0-9A-Z]{26})"')


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

    async def worker(self, connection: Connection) -> None:
        """Start pairs, one at a time, until the schedule is exhausted."""
        while self.next_index < self.count:
            index = self.next_index
            self.next_index += 1
            due_ns = self.start_ns + int(index * self.interval_ns)
            await sleep_until(due_ns)
            self.start_lag_ns.append(time.perf_counter_ns() - due_ns)
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
    return {
        "rate_pairs_per_s": round(rate_per_s, 1),
        "scheduled": count,
        "completed": len(run.reserve_ns),
        "achieved_pairs_per_s": round(len(run.reserve_ns) / (after.wall_s - before.wall_s), 1),
        "reserve_p50_ms": percentile_ms(run.reserve_ns, 50),
        "reserve_p99_ms": percentile_ms(run.reserve_ns, 99),
        "reserve_max_ms": percentile_ms(run.reserve_ns, 100),
        "start_lag_p99_ms": percentile_ms(run.start_lag_ns, 99),
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

WRK_PAIRS_LUA: Final = r"""
-- reserve -> commit pairs for bench/http.py: a commit is sent for every reserve answered.
local threads = {}
local next_thread = 0

function setup(thread)
  next_thread = next_thread + 1
  thread:set("thread_number", next_thread)
  table.insert(threads, thread)
end

function init(args)
  run, accounts = args[1], tonumber(args[2])
  headers = {["Authorization"] = "Bearer " .. args[3], ["Content-Type"] = "application/json"}
  commit_body = '{"actual_cost_micro":"ACTUAL"}'
  due, head, tail, sent, reserves, commits, failures = {}, 1, 0, 0, 0, 0, 0
end

function request()
  if head <= tail then
    local id = due[head]
    due[head] = nil
    head = head + 1
    return wrk.format("POST", "/v1/reservations/" .. id .. "/commit", headers, commit_body)
  end
  sent = sent + 1
  local body = string.format('{"account_id":"acct-%06d","request_id":"%s-%d-%d","estimated_cost_micro":"ESTIMATE"}',
    (thread_number * 7919 + sent) % accounts, run, thread_number, sent)
  return wrk.format("POST", "/v1/reservations", headers, body)
end

function response(status, response_headers, body)
  local id = status == 201 and string.match(body, '"billing_entry_id":"(%w+)"')
  if id then
    tail = tail + 1
    due[tail] = id
    reserves = reserves + 1
  elseif status == 200 then
    commits = commits + 1
  else
    failures = failures + 1
    if failures <= 3 then io.stderr:write("bench: answered " .. status .. ": " .. body .. "\n") end
  end
end

function done(summary, latency, requests)
  local r, c, f = 0, 0, 0
  for _, thread in ipairs(threads) do
    r, c, f = r + thread:get("reserves"), c + thread:get("commits"), f + thread:get("failures")
  end
  io.write(string.format("TOLLWAY reserves=%d commits=%d failures=%d\n", r, c, f))
end
""".replace("ACTUAL", str(ACTUAL_MICRO)).replace("ESTIMATE", str(ESTIMATE_MICRO))

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


# -- the server under test -------------------------------------------------------------------


def clean_environment() -> dict[str, str]:
    """The environment without ``TOLLWAY_*`` settings: the server runs with the defaults."""
    return {key: value for key, value in os.environ.items() if not key.startswith("TOLLWAY_")}


def can_pin() -> bool:
    """Whether CPUs 0 and 1 both exist for this process (server and generator on their own core)."""
    return hasattr(os, "sched_setaffinity") and {SERVER_CPU, GENERATOR_CPU} <= os.sched_getaffinity(0)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tollway.cli", *args]


def issue_token(data_dir: Path, scope: str) -> str:
    """A token from ``tollway token issue``; ``--new-key`` creates the development key before the first start."""
    args = ("--scope", scope, "--ttl-s", "86400", "--subject", "bench", "--new-key")
    done = subprocess.run(
        cli("token", "issue", "--data-dir", str(data_dir), *args),
        capture_output=True,
        text=True,
        env=clean_environment(),
        timeout=START_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"tollway token issue failed: {done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1]


def read_url(process: subprocess.Popen[str]) -> str:
    """The URL ``tollway serve`` announces once uvicorn listens."""
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if "serving on " in line:
            return line.split("serving on ")[1].split()[0]
    raise BenchError("tollway serve did not start (see server.log in the scratch directory with --keep)")


@dataclass
class Server:
    """A running ``tollway serve`` and what it told us."""

    process: subprocess.Popen[str]
    target: Target
    pinned: bool
    exit_code: int | None = None


@contextlib.contextmanager
def served(
    root: Path,
    log_level: str,
    pin: bool,
    wal_syncer: str = "process",
    pump: str = "auto",
    *,
    settings: dict[str, str] | None = None,
) -> Iterator[Server]:
    """``tollway serve`` in ``root/data`` on a free port of 127.0.0.1 (on CPU 0 when ``pin``); SIGTERM at the end.

    ``settings`` (name → value) reach the server as ``TOLLWAY_*`` variables; nothing else does.
    """
    data = root / "data"
    admin, gateway = issue_token(data, "admin"), issue_token(data, "gateway")
    command = cli("serve", "--data-dir", str(data), "--host", "127.0.0.1", "--port", "0", "--log-level", log_level)
    with (root / "server.log").open("w") as log:
        if pin:  # the server (and the redis-server it starts) inherits this affinity
            os.sched_setaffinity(0, {SERVER_CPU})
        process = subprocess.Popen(
            [*command, "--log-format", "json"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=clean_environment()
            | {"TOLLWAY_WAL_SYNCER": wal_syncer, "TOLLWAY_PROJECTION_PUMP": pump}
            | {ENV_PREFIX + name.upper(): value for name, value in (settings or {}).items()},
        )
        if pin:
            os.sched_setaffinity(0, {GENERATOR_CPU})
        server = Server(process, Target("127.0.0.1", 0, gateway, admin, process.pid), pin)
        try:
            host_port = read_url(process).removeprefix("http://")
            host, port = host_port.rsplit(":", 1)
            server.target = Target(host, int(port), gateway, admin, process.pid)
            yield server
        finally:
            server.exit_code = stop(process)


def stop(process: subprocess.Popen[str]) -> int:
    """SIGTERM (the service drains and writes its final snapshot); SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()
    return process.returncode


async def wait_ready(target: Target) -> None:
    """Poll ``/readyz`` until new holds are allowed (the guard's startup checks passed)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    connection = await target.connect()
    try:
        while time.monotonic() < deadline:
            status, _ = await asyncio.wait_for(connection.exchange(target.request("GET", "/readyz")), REQUEST_TIMEOUT_S)
            if status == 200:
                return
            await asyncio.sleep(0.05)
    finally:
        connection.close()
    raise BenchError("the server did not become ready")


async def fund(target: Target, accounts: int) -> None:
    """Mint ``FUNDING_MICRO`` into every account (setup; not measured)."""
    names = iter(account_name(index) for index in range(accounts))

    async def worker() -> None:
        connection = await target.connect()
        try:
            for name in names:
                body = b'{"credit_id":"fund-%s","kind":"mint","amount_micro":"%d"}' % (name.encode(), FUNDING_MICRO)
                request = target.request("POST", f"/v1/accounts/{name}/credits", body, admin=True)
                status, answer = await connection.exchange(request)
                if status not in (200, 201):
                    raise BenchError(f"funding {name} answered {status}: {answer[:300]!r}")
        finally:
            connection.close()

    await asyncio.wait_for(
        asyncio.gather(*(worker() for _ in range(min(FUNDING_CONCURRENCY, accounts)))), START_TIMEOUT_S
    )


# -- the run ---------------------------------------------------------------------------------


def use_wrk(choice: str) -> bool:
    if choice == "wrk" and shutil.which("wrk") is None:
        raise BenchError("--generator wrk: wrk is not installed")
    return choice == "wrk" or (choice == "auto" and shutil.which("wrk") is not None)


def measure(runner: asyncio.Runner, server: Server, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, bare, billing, open loop — against the running server."""
    target, conc = server.target, args.concurrency
    runner.run(wait_ready(target))
    runner.run(fund(target, args.accounts))
    runner.run(closed_loop(target, conc, args.warmup, 0.0, billing_step(target, "warm", args.accounts)))
    settle_s = 0.0 if args.quick else 0.5
    wal = WalWatch(runner, target)
    script = root / "pairs.lua"
    script.write_text(WRK_PAIRS_LUA)

    def billing_max(run: str) -> dict[str, Any]:
        if use_wrk(args.generator):
            return wal.around(lambda: wrk_pairs(target, conc, args.seconds, args.accounts, script))
        step = billing_step(target, run, args.accounts)
        return wal.around(lambda: runner.run(closed_loop(target, conc, args.seconds, settle_s, step)))

    if use_wrk(args.generator):
        bare = wal.around(lambda: wrk_bare(target, conc, args.seconds))
    else:
        bare = wal.around(lambda: runner.run(closed_loop(target, conc, args.seconds, settle_s, bare_step(target))))
    billing = billing_max("max")
    top = billing["done"] / billing["window_s"]

    def at(share: float) -> dict[str, Any]:
        pool = args.open_connections
        phase = wal.around(lambda: runner.run(open_loop(target, share * top, args.seconds, pool, args.accounts)))
        return {"share": share} | phase | {"server_cpu_us_per_pair": cpu_us_per_request(phase, share * top)}

    opened = at(OPEN_LOOP_SHARE)
    curve = [at(share) for share in args.curve]
    again = billing_max("again")  # the maximum once more: did the machine's speed drift during the run?
    again.pop("reserve_ns", None)
    return {"bare": bare, "billing": billing, "open_loop": opened, "curve": curve, "billing_again": again}


@dataclass
class WalWatch:
    """The WAL's last sequence (from ``/readyz``) around a phase: events written, snapshots due during it."""

    runner: asyncio.Runner
    target: Target
    snapshot_every: int = field(default_factory=lambda: Settings().snapshot_every_events)

    def around(self, phase: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``phase`` and add ``wal_events`` and ``snapshots`` (a snapshot takes up to a fifth of the loop)."""
        before, batches_before = self.runner.run(last_sequence(self.target)), self.runner.run(wal_batches(self.target))
        result = phase()
        after, batches_after = self.runner.run(last_sequence(self.target)), self.runner.run(wal_batches(self.target))
        every, batches = self.snapshot_every, batches_after - batches_before
        return result | {
            "wal_events": after - before,
            "wal_batches": batches,
            "wal_events_per_batch": round((after - before) / batches, 1) if batches else None,
            "snapshots": after // every - before // every,
        }


async def fetch(target: Target, path: str) -> bytes:
    """The body of ``GET path`` on a connection of its own."""
    connection = await target.connect()
    try:
        _, body = await asyncio.wait_for(connection.exchange(target.request("GET", path)), REQUEST_TIMEOUT_S)
    finally:
        connection.close()
    return body


async def last_sequence(target: Target) -> int:
    """The WAL's last sequence, as ``/readyz`` reports it."""
    sequence: int = json.loads(await fetch(target, "/readyz"))["wal"]["last_sequence"]
    return sequence


async def wal_batches(target: Target) -> int:
    """Group-commit batches written so far (``wal_batch_records_count`` of ``/metrics``)."""
    body = await fetch(target, "/metrics")
    found = re.search(rb"^wal_batch_records_count ([0-9.e+]+)$", body, re.MULTILINE)
    if found is None:
        raise BenchError("/metrics has no wal_batch_records_count")
    return int(float(found.group(1)))


def summary(args: argparse.Namespace, measured: dict[str, Any], server: Server) -> dict[str, Any]:
    bare, billing, opened = measured["bare"], measured["billing"], measured["open_loop"]
    pairs_per_s = billing["done"] / billing["window_s"]
    bare_per_s = bare["done"] / bare["window_s"]
    ratio = 2 * pairs_per_s / bare_per_s
    again = measured["billing_again"]
    again_per_s = again["done"] / again["window_s"]
    p99 = opened["reserve_p99_ms"]
    closed_generator = "wrk" if use_wrk(args.generator) else "python"
    reserve_ns = billing.pop("reserve_ns")
    bare.pop("reserve_ns", None)
    bare["server_cpu_us_per_request"] = cpu_us_per_request(bare, bare_per_s)
    billing["server_cpu_us_per_request"] = cpu_us_per_request(billing, 2 * pairs_per_s)
    return {
        "pairs_per_s": round(pairs_per_s, 1),
        "billing_requests_per_s": round(2 * pairs_per_s, 1),
        "reserve_p50_ms": opened["reserve_p50_ms"],
        "reserve_p99_ms": p99,
        "ratio": round(ratio, 3),
        "ceiling": {"bare_requests_per_s": round(bare_per_s, 1), "endpoint": f"GET {HEALTH_PATH}"} | bare,
        "targets": TARGETS,
        "meets_targets": {
            "billing_ratio_min": ratio >= TARGETS["billing_ratio_min"],
            "reserve_p99_ms_max_at_80pct": p99 is not None and p99 <= TARGETS["reserve_p99_ms_max_at_80pct"],
        },
        "billing": billing
        | {
            "reserve_p50_ms_closed_loop": percentile_ms(reserve_ns, 50),
            "reserve_p99_ms_closed_loop": percentile_ms(reserve_ns, 99),
        },
        "open_loop": opened,
        "max_again": {
            "pairs_per_s": round(again_per_s, 1),
            "drift": round(again_per_s / pairs_per_s - 1, 3),
            "open_loop_share_of_it": round(opened["rate_pairs_per_s"] / again_per_s, 3),
            "server_cpu_us_per_request": cpu_us_per_request(again, 2 * again_per_s),
            "snapshots": again["snapshots"],
        },
        "open_loop_curve": [
            {key: point[key] for key in CURVE_KEYS} for point in sorted(measured["curve"], key=lambda p: p["share"])
        ],
        "generator": {"closed_loop": closed_generator, "open_loop": "python", "concurrency": args.concurrency},
        "server": {
            "command": "tollway serve --log-format json --log-level " + args.log_level,
            "durability": "fsync",
            "wal_syncer": args.wal_syncer,
            "projection_pump": args.projection_pump,
            "settings": args.setting,
            "redis": "embedded",
            "settlement": "standalone",
            "exit_code": server.exit_code,
        },
        "command": shlex.join(sys.orig_argv),
        "options": {
            "seconds": args.seconds,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "open_connections": args.open_connections,
            "accounts": args.accounts,
            "generator": args.generator,
            "quick": args.quick,
        },
        "notes": NOTES,
    }


def cpu_us_per_request(phase: dict[str, Any], requests_per_s: float) -> float | None:
    """CPU time of the server and its children per request (steadier than throughput on a busy machine)."""
    own: float | None = phase["server_cpu_busy"]
    children: float | None = phase["server_children_cpu_busy"]
    if own is None or not requests_per_s:
        return None
    return round((own + (children or 0.0)) / requests_per_s * 1e6, 1)


CURVE_KEYS: Final = (
    "share",
    "rate_pairs_per_s",
    "reserve_p50_ms",
    "reserve_p99_ms",
    "start_lag_p99_ms",
    "server_cpu_busy",
    "server_children_cpu_busy",
    "server_cpu_us_per_pair",
    "wal_events_per_batch",
    "snapshots",
)
NOTES: Final = [
    "billing_requests_per_s = 2 x pairs_per_s (a pair is POST /v1/reservations then POST .../commit)",
    "ratio = billing_requests_per_s / ceiling.bare_requests_per_s, both closed loop, same generator, same run",
    "GET /healthz goes through FastAPI's router; the gateway's billing routes are answered before it "
    "(tollway.api.hot), so a billing request pays less framework than the no-op does",
    "reserve_p50_ms/p99_ms: open loop at 80 % of pairs_per_s, counted from when each pair was due",
    "server pinned to CPU 0 (with its embedded redis-server), generator to CPU 1, when machine.pinned",
    "*_cpu_busy: CPU seconds per wall second of the server process, of its children (the embedded "
    "redis-server and the WAL sync helper, on the server's core) and of the generator (wrk included)",
    "server_cpu_us_per_request: CPU of the server and its children per request; steadier than rates",
    "open_loop.server_cpu_us_per_pair: the same per scheduled pair; compare it with 2 x billing.server_cpu_us_per_"
    "request: a pair costs more CPU at a lower rate (smaller batches, colder caches), so 80 % of the closed-loop "
    "maximum can keep the core busier than 80 %",
    "open_loop_curve: --curve shares (e.g. 0.5,0.65), each an open-loop phase like the 80 % one",
    "max_again: the closed-loop maximum measured once more after the open-loop phases; drift is its change "
    "from pairs_per_s (a VM's speed moves during a run), and open_loop_share_of_it what the 80 % phase was "
    "of it: above 0.8, the open loop ran closer to the machine's limit than intended",
    "wal_batches, wal_events_per_batch: group commits (syncs) during a phase, from /metrics; a pair pays "
    "for more syncs in the open loop than in the closed loop, and each costs the core CPU",
    "ceiling.wakeup_*: how late the server's core woke a thread sleeping 0.5 ms, before the server started "
    "(bench/machine.py wakeup_latency); a reserve waits for several wake-ups (server, sync helper, server, "
    "generator), so its p99 cannot be far below a few times wakeup_p99_ms",
    "ceiling.idle_cost_*: on the server's core before the server started (bench/machine.py idle_cost), the "
    "thread CPU time of a small piece of Python work right after the core sat idle 0.5, 1, 3 or 10 ms, over "
    "the same work at once again (idle_cost_work_us); near 1 on real hardware, larger where an idle CPU "
    "comes back cold (a VM halting into its hypervisor): at partial load the server idles between requests, "
    "so each one costs more CPU than at full load",
    "ceiling.slow_*: the same small work back to back on the server's core for a few seconds before the server "
    "started (bench/machine.py slow_windows), in 20 ms windows: slow_share is the share of windows at least twice "
    "as slow as the median one, slow_worst the slowest over the median; on a shared VM the CPU can run several "
    "times slower for tens of milliseconds without stopping, and requests answered then are late at any load, so "
    "a slow_share of a few per cent puts a p99 out of reach",
    "wal_events, snapshots: WAL events written during a phase and periodic snapshots due in it (each one "
    "takes up to a fifth of the event loop for about a second while it is encoded, which can show in that "
    "phase's tail latency)",
]


def machine(data_dir: Path, pinned: bool) -> dict[str, Any]:
    return machine_facts(data_dir) | {
        "pinned": pinned,
        "server_cpu": SERVER_CPU if pinned else None,
        "generator_cpu": GENERATOR_CPU if pinned else None,
        "wrk": wrk_version(),
    }


def wrk_version() -> str | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (done.stdout + done.stderr).strip().split("\n")[0][:80] or "installed"


# -- command line ----------------------------------------------------------------------------


def _shares(text: str) -> list[float]:
    """``0.5,0.65`` → [0.5, 0.65]; each share in (0, 1.5]."""
    try:
        shares = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not shares or any(not 0 < share <= 1.5 for share in shares):
        raise argparse.ArgumentTypeError(f"shares must be in (0, 1.5]: {text!r}")
    return shares


def _setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip().lower(), value.strip()


def add_setting_argument(parser: argparse.ArgumentParser) -> None:
    """``--setting NAME=VALUE`` (repeatable): a server setting; check them with :func:`checked_settings`."""
    parser.add_argument(
        "--setting",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another server setting (repeatable), e.g. wal_sync_gap_ms=0 to compare with the default",
    )


def checked_settings(parser: argparse.ArgumentParser, pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The ``--setting`` pairs as a dict, after tollway's own validation (a parser error if one is wrong)."""
    settings = dict(pairs)
    try:
        load_settings(settings)
    except ConfigError as exc:
        parser.error(f"--setting: {exc}")
    return settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark tollway's HTTP API against the bare server stack.")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=None, help="each measured phase (default 10; quick 1)")
    parser.add_argument("--warmup", type=float, default=None, help="billing warm-up (default 3; quick 0.3)")
    parser.add_argument("--concurrency", type=int, default=None, help="connections (default 64; quick 8)")
    parser.add_argument(
        "--open-connections",
        type=int,
        default=None,
        help="connections of the open-loop phases, at most (default: --concurrency)",
    )
    parser.add_argument("--accounts", type=int, default=None, help="funded accounts (default 1000; quick 20)")
    parser.add_argument(
        "--generator", choices=("auto", "wrk", "python"), default="auto", help="closed loops (auto: wrk if installed)"
    )
    parser.add_argument("--log-level", default="info", help="of the server (default info, as tollway serve)")
    parser.add_argument(
        "--wal-syncer",
        choices=("process", "thread"),
        default="process",
        help="the server's wal_syncer setting (default process, the production default; thread to compare)",
    )
    parser.add_argument(
        "--projection-pump",
        choices=("auto", "on", "off"),
        default="auto",
        help="the server's projection_pump setting (default auto: off on the one CPU the server is pinned to)",
    )
    add_setting_argument(parser)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument(
        "--curve",
        type=_shares,
        default=[],
        help="more open-loop phases at these shares of the maximum, comma-separated (e.g. 0.5,0.65)",
    )
    add_scratch_arguments(parser, "the scratch directory (data and server.log)")
    args = parser.parse_args(argv)
    args.setting = checked_settings(parser, args.setting)
    quick = args.quick
    args.seconds = args.seconds if args.seconds is not None else (1.0 if quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if quick else 3.0)
    args.concurrency = args.concurrency if args.concurrency is not None else (8 if quick else 64)
    args.open_connections = args.open_connections if args.open_connections is not None else args.concurrency
    args.accounts = args.accounts if args.accounts is not None else (20 if quick else 1000)
    if args.concurrency < 1 or args.open_connections < 1 or args.accounts < 1 or args.seconds <= 0:
        parser.error("--concurrency, --open-connections, --accounts and --seconds must be positive")
    return args


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    pinned = can_pin()
    before, started = loadavg(), time.perf_counter()
    wakeup = wakeup_latency(WAKEUP_PROBE_S_QUICK if args.quick else WAKEUP_PROBE_S, SERVER_CPU if pinned else None)
    wakeup |= idle_cost(IDLE_COST_ROUNDS_QUICK if args.quick else IDLE_COST_ROUNDS, SERVER_CPU if pinned else None)
    wakeup |= slow_windows(SLOW_PROBE_S_QUICK if args.quick else SLOW_PROBE_S, SERVER_CPU if pinned else None)
    with (
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
        served(root, args.log_level, pinned, args.wal_syncer, args.projection_pump, settings=args.setting) as server,
    ):
        measured = measure(runner, server, root, args)
    out = summary(args, measured, server)
    out["ceiling"] |= wakeup
    out["machine"] = machine(root, pinned) | {
        "loadavg_before": before,
        "loadavg_after": loadavg(),
        "run_s": round(time.perf_counter() - started, 1),
    }
    return out


def print_table(out: dict[str, Any]) -> None:
    met = out["meets_targets"]
    rows = [
        ("pairs_per_s", out["pairs_per_s"], ""),
        ("billing_requests_per_s", out["billing_requests_per_s"], ""),
        ("ceiling.bare_requests_per_s", out["ceiling"]["bare_requests_per_s"], ""),
        ("ratio (>= 0.5)", out["ratio"], "ok" if met["billing_ratio_min"] else "MISS"),
        ("reserve_p50_ms at 80 %", out["reserve_p50_ms"], ""),
        (
            "reserve_p99_ms at 80 % (<= 10)",
            out["reserve_p99_ms"],
            "ok" if met["reserve_p99_ms_max_at_80pct"] else "MISS",
        ),
        ("ceiling.wakeup_p99_ms", out["ceiling"]["wakeup_p99_ms"], ""),
        ("ceiling.idle_cost_ratio (3 ms)", out["ceiling"]["idle_cost_ratio"]["3ms"], ""),
        ("ceiling.slow_share", out["ceiling"]["slow_share"], ""),
        ("server CPU busy (billing)", out["billing"]["server_cpu_busy"], ""),
        ("generator CPU busy (billing)", out["billing"]["generator_cpu_busy"], ""),
    ]
    for name, value, verdict in rows:
        print(f"{name:<32} {value!s:>12}  {verdict}")
    for point in out["open_loop_curve"]:
        share = f"{point['share']:.0%}"
        print(f"{'reserve p50/p99 ms at ' + share:<32} {point['reserve_p50_ms']!s:>5}/{point['reserve_p99_ms']!s:<6}")
    print(
        f"generator: {out['generator']}; machine: {out['machine']['cpu_count']} CPUs, pinned {out['machine']['pinned']}"
    )
    print(f"command: {out['command']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with scratch_dir(args.data_dir, ".tollway-bench-http-", args.keep) as root:
        out = run(args, root)
    if out["server"]["exit_code"] != 0:
        raise BenchError(f"tollway serve exited with {out['server']['exit_code']} (expected 0 after SIGTERM)")
    emit(out, args.json, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
