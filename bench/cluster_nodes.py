"""The cluster under ``bench/cluster.py``: real ``tollway serve --postgres-url`` processes and plain HTTP to them.

A :class:`Nodes` is what a phase loads: either ``count`` separate nodes, each on its own port
(:func:`start_nodes`), or one ``tollway serve --processes N`` parent whose ``N`` children
share one port (:func:`start_processes`). Either way it knows the ports a client connects to,
each node's own URL and name (to wait until the shards settle as :func:`assign` spreads them)
and the node processes' pids (for their CPU time). The requests here are plain HTTP/1.1 on
asyncio streams: ``bench/http.py`` shadows the standard ``http`` package for scripts in this
directory. Nothing here measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg

from bench.load import FUNDING_MICRO, BenchError, Connection, Target, child_pids
from tollway.api.auth import Scope, development_key, issue_token
from tollway.config import Settings
from tollway.core.assignment import assign
from tollway.pg.schema import init_cluster

START_TIMEOUT_S: Final = 60.0
POLL_S: Final = 0.02
SHARDS: Final = 8
FUND_RETRY_503_S: Final = 60.0
FUND_RETRY_S: Final = 0.2


@dataclass(frozen=True)
class Tokens:
    """The run's tokens: one signing key in ``<root>/keys`` serves every node of every phase."""

    admin: str
    gateway: str


def issue_tokens(root: Path) -> Tokens:
    """An admin and a gateway token signed with the development key of ``<root>/keys``, made here.

    As ``tollway token issue --new-key --data-dir <root>/keys`` would, without two CLI starts
    (seconds each on a busy machine); every node runs with ``--data-dir <root>/keys``.
    """
    settings = Settings(data_dir=root / "keys")
    key, _ = development_key(settings)
    admin = issue_token(key, settings, [Scope.ADMIN.value], subject="bench")
    return Tokens(admin, issue_token(key, settings, [Scope.GATEWAY.value], subject="bench"))


async def create_cluster(url: str, shards: int = SHARDS) -> None:
    """``tollway cluster init`` in this process (a CLI start costs seconds on a busy machine)."""
    connection = await asyncpg.connect(url)
    try:
        await init_cluster(connection, shards=shards)
    finally:
        await connection.close()


def node_env() -> dict[str, str]:
    """The environment without ``TOLLWAY_*`` settings: the nodes get theirs from the command line."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}


def spawn(name: str, argv: list[str], root: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """``tollway <argv>``, its output in ``root/<name>.out`` and ``.err``."""
    out = root / f"{name}.out"
    with out.open("w") as stdout, out.with_suffix(".err").open("w") as stderr:
        command = [sys.executable, "-m", "tollway.cli", *argv]
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=node_env(), cwd=root)
    return process, out


def serve_argv(url: str, root: Path, name: str, ttl_ms: int) -> list[str]:
    argv = ["serve", "--postgres-url", url, "--data-dir", str(root / "keys"), "--host", "127.0.0.1", "--port", "0"]
    return [*argv, "--node-id", name, "--lease-ttl-ms", str(ttl_ms), "--log-level", "warning"]


def start_node(name: str, url: str, root: Path, ttl_ms: int) -> tuple[subprocess.Popen[bytes], Path]:
    """One node on a port of its own."""
    return spawn(name, serve_argv(url, root, name, ttl_ms), root)


async def printed(out: Path, process: subprocess.Popen[bytes], marker: str) -> str:
    """The first word after ``marker`` in the process's output, once it printed it."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        for line in out.read_text().splitlines():  # noqa: ASYNC240 - a few lines of a local file
            if marker in line:
                return line.split(marker, 1)[1].split()[0]
        await asyncio.sleep(POLL_S)
    err = out.with_suffix(".err").read_text()[-2000:]
    raise BenchError(f"{out.stem} did not start: {out.read_text()[-2000:]} {err}")  # noqa: ASYNC240 - failing anyway


async def node_url(out: Path, process: subprocess.Popen[bytes]) -> str:
    return await printed(out, process, "serving on ")


async def request(url: str, method: str, path: str, token: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """One HTTP/1.1 request on a new connection: (status, decoded JSON body or None)."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        writer.write(head.encode() + b"\r\n" + data)
        answer = await reader.read()
    finally:
        writer.close()
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    if not head_bytes:
        raise BenchError(f"{method} {path}: the connection closed without an answer")
    with contextlib.suppress(ValueError):
        return int(head_bytes.split()[1]), json.loads(payload) if payload else None
    return int(head_bytes.split()[1]), None


async def get(url: str, path: str, token: str) -> tuple[int, Any]:
    return await request(url, "GET", path, token)


async def post(url: str, path: str, token: str, body: dict[str, Any]) -> int:
    """A POST; its status."""
    return (await request(url, "POST", path, token, body))[0]


async def settled(urls: list[str], names: list[str], token: str, shards: int = SHARDS) -> None:
    """Wait until each node serves exactly the shards :func:`assign` gives it."""
    target = assign(shards, names)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        views = [(await get(u, "/v1/cluster", token))[1] for u in urls]
        served = {number: name for name, view in zip(names, views, strict=True) for number in view["serving"]}
        if served == target and sum(len(view["serving"]) for view in views) == shards:
            return
        await asyncio.sleep(0.1)
    raise BenchError("the cluster did not settle")


async def fund(urls: list[str], token: str, accounts: list[str]) -> None:
    """Mint :data:`FUNDING_MICRO` to each account through the nodes in turn; a 503 is retried for a while.

    A 503 is a shard still starting or moving, which on a loaded machine can last a while after
    the shard map settled; up to :data:`FUND_RETRY_503_S` per account.
    """
    for index, account in enumerate(accounts):
        credit = {"credit_id": "seed", "kind": "mint", "amount_micro": FUNDING_MICRO}
        deadline = time.monotonic() + FUND_RETRY_503_S
        while True:
            status, body = await request(
                urls[index % len(urls)], "POST", f"/v1/accounts/{account}/credits", token, credit
            )
            if status != 503 or time.monotonic() >= deadline:
                break
            await asyncio.sleep(FUND_RETRY_S)
        if status != 201:
            raise BenchError(f"funding {account} answered {status}: {body}")


@dataclass
class Nodes:
    """Node processes serving one cluster: where a client connects, and each node's own URL and pid."""

    processes: list[subprocess.Popen[bytes]]  # the nodes, or the one parent of --processes
    ports: tuple[int, ...]  # where clients connect (one shared port with --processes)
    urls: list[str]  # each node's own URL
    names: list[str]
    shared: bool = False

    def pids(self) -> list[int]:
        """The node processes (the parent's children with ``--processes``)."""
        if not self.shared:
            return [p.pid for p in self.processes]
        return child_pids(self.processes[0].pid) or []

    def stop(self) -> None:
        """SIGKILL every node (the parent first, or it would restart its children)."""
        children = self.pids() if self.shared else []
        for process in self.processes:
            process.kill()
            process.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def start_nodes(names: list[str], url: str, root: Path, ttl_ms: int, token: str) -> Nodes:
    """One node per name, each on its own port; returned once the shards settled over them."""
    started = [start_node(name, url, root, ttl_ms) for name in names]
    nodes = Nodes([p for p, _ in started], (), [], names)
    try:
        nodes.urls = [await node_url(out, process) for process, out in started]
        nodes.ports = tuple(int(u.rsplit(":", 1)[1].rstrip("/")) for u in nodes.urls)
        await settled(nodes.urls, names, token)
    except BaseException:
        nodes.stop()
        raise
    return nodes


async def start_processes(base: str, count: int, url: str, root: Path, *, ttl_ms: int, token: str) -> Nodes:
    """``tollway serve --processes count --node-id base``: children ``base-<i>`` on one port; once settled."""
    argv = [*serve_argv(url, root, base, ttl_ms), "--processes", str(count)]
    parent, out = spawn(base, argv, root)
    names = [f"{base}-{i}" for i in range(count)]
    nodes = Nodes([parent], (), [], names, shared=True)
    try:
        shared = "http://" + await printed(out, parent, "nodes sharing ")
        nodes.ports = (int(shared.rsplit(":", 1)[1]),)
        nodes.urls = await advertised(shared, names, token)
        await settled(nodes.urls, names, token)
    except BaseException:
        nodes.stop()
        raise
    return nodes


async def advertised(shared: str, names: list[str], token: str) -> list[str]:
    """Each child's private URL, from the registry, once all of ``names`` registered."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, BenchError):
            status, view = await get(shared, "/v1/cluster", token)
            if status == 200:
                urls = {node["node_id"]: node["advertise_url"] for node in view["nodes"]}
                if all(name in urls for name in names):
                    return [urls[name].rstrip("/") for name in names]
        await asyncio.sleep(0.1)
    raise BenchError(f"the nodes {names} never all registered")


@dataclass(frozen=True)
class Spread(Target):
    """A target whose connections go to each port in turn (``ports``), as a client that does not route."""

    ports: tuple[int, ...] = ()
    turn: Iterator[int] = field(default_factory=itertools.count)

    async def connect(self) -> Connection:
        """A keep-alive connection to the next port."""
        port = self.ports[next(self.turn) % len(self.ports)]
        _, protocol = await asyncio.get_running_loop().create_connection(Connection, self.host, port)
        return protocol
