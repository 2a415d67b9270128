"""The server under test for ``bench/http.py`` and ``bench/rates.py``: a real ``tollway serve``.

:func:`served` starts it in a scratch data directory with the default settings (plus any
``--setting``), pinned to its own CPU when the machine has two, and stops it with SIGTERM; the
helpers below get it ready (tokens, funded accounts, ``/readyz``) and read what it reports about
its WAL (``/readyz``, ``/metrics``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.load import FUNDING_MICRO, REQUEST_TIMEOUT_S, BenchError, Target, account_name
from tollway.config import ENV_PREFIX, Settings, load_settings
from tollway.core.errors import ConfigError

SERVER_CPU: Final = 0
GENERATOR_CPU: Final = 1
START_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 30.0
FUNDING_CONCURRENCY: Final = 32


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
    """A token from ``tollway token issue``; ``--new-key`` creates the development key before the first start.

    Code from before that option (an A/B run against an older ``src``) made the key without it: asked again so.
    """
    args = ("--scope", scope, "--ttl-s", "86400", "--subject", "bench", "--new-key")
    done = _token_issue(data_dir, args)
    if done.returncode != 0 and "No such option: --new-key" in done.stderr:
        done = _token_issue(data_dir, args[:-1])
    if done.returncode != 0:
        raise BenchError(f"tollway token issue failed: {done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1]


def _token_issue(data_dir: Path, args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli("token", "issue", "--data-dir", str(data_dir), *args),
        capture_output=True,
        text=True,
        env=clean_environment(),
        timeout=START_TIMEOUT_S,
        check=False,
    )


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


HELLO: Final = Path(__file__).resolve().parent / "hello.py"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def served_hello(root: Path, pin: bool) -> Iterator[Target]:
    """``bench/hello.py`` (a raw ASGI hello on tollway's stack) on a free port, on CPU 0 when ``pin``."""
    port = free_port()
    with (root / "hello.log").open("w") as log:
        if pin:
            os.sched_setaffinity(0, {SERVER_CPU})
        process = subprocess.Popen([sys.executable, str(HELLO), "--port", str(port)], stdout=log, stderr=log, text=True)
        if pin:
            os.sched_setaffinity(0, {GENERATOR_CPU})
        try:
            _wait_listening("127.0.0.1", port, process)
            yield Target("127.0.0.1", port, "", "", process.pid)
        finally:
            stop(process)


def _wait_listening(host: str, port: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"bench/hello.py did not listen on {host}:{port}") from None
            time.sleep(0.02)
        else:
            return


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
