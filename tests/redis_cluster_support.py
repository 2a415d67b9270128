"""A Redis Cluster of three masters on loopback, for the cluster tests: the redis-server tollway finds.

Each master is a ``redis-server --cluster-enabled yes`` on a free TCP port (its cluster bus on
the port + 10000) in its own directory, persisting nothing but its ``nodes.conf`` (the cluster
configuration). The cluster is formed with redis-py, not ``redis-cli``: ``CLUSTER ADDSLOTS``
gives each master a third of the 16,384 slots, ``CLUSTER MEET`` joins them, and the masters
are ready once each reports ``cluster_state:ok``. ``cluster-require-full-coverage no`` keeps the
other masters' slots served while one master is down.

:meth:`RedisClusterNodes.kill` and :meth:`RedisClusterNodes.restart` make "a master killed and
restarted empty": the same port and ``nodes.conf`` (so the same node id and slots), no data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Final

import redis.asyncio as aioredis
import redis.exceptions
from redis.crc import key_slot

from tollway.redis.server import find_binary

SLOTS: Final = 16_384
READY_TIMEOUT_S: Final = 30.0
BUS_OFFSET: Final = 10_000


def _free_port_pair() -> int:
    """A loopback port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port + BUS_OFFSET > 65_535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + BUS_OFFSET))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of ports for a Redis Cluster node")


class RedisClusterNodes:
    """Three (or ``count``) masters on loopback; see the module docstring."""

    def __init__(self, directory: Path, count: int = 3) -> None:
        self.directory = directory
        self.ports = [_free_port_pair() for _ in range(count)]
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * count

    @property
    def url(self) -> str:
        """A URL of the first master (a cluster client discovers the others)."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def _spawn(self, index: int) -> None:
        port = self.ports[index]
        directory = self.directory / f"redis-{port}"
        directory.mkdir(parents=True, exist_ok=True)
        for dump in directory.glob("*.rdb"):
            dump.unlink()
        argv = [
            str(find_binary()),
            *("--port", str(port)),
            *("--bind", "127.0.0.1"),
            *("--dir", str(directory)),
            *("--logfile", str(directory / "redis.log")),
            *("--cluster-enabled", "yes"),
            *("--cluster-config-file", "nodes.conf"),
            *("--cluster-node-timeout", "2000"),
            *("--cluster-require-full-coverage", "no"),
            *("--save", ""),
            *("--appendonly", "no"),
        ]
        self.processes[index] = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    async def start(self) -> None:
        """Start the masters, give each its slots, join them, wait for ``cluster_state:ok``."""
        for index in range(len(self.ports)):
            self._spawn(index)
        clients = [aioredis.Redis(host="127.0.0.1", port=port) for port in self.ports]
        try:
            for client in clients:
                await _wait_ping(client)
            share = SLOTS // len(clients)
            for index, client in enumerate(clients):
                last = SLOTS - 1 if index == len(clients) - 1 else (index + 1) * share - 1
                await client.execute_command("CLUSTER", "ADDSLOTS", *range(index * share, last + 1))  # type: ignore[no-untyped-call]
            for client in clients[1:]:
                await client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[0])  # type: ignore[no-untyped-call]
            await self.wait_ok()
        finally:
            for client in clients:
                await client.aclose()

    async def wait_ok(self) -> None:
        """Until every running master says ``cluster_state:ok`` and knows every other one."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            states = []
            for index, port in enumerate(self.ports):
                if self.processes[index] is None:
                    continue
                client = aioredis.Redis(host="127.0.0.1", port=port)
                try:
                    info = (await client.execute_command("CLUSTER", "INFO")).decode()  # type: ignore[no-untyped-call]
                    states.append("cluster_state:ok" in info and f"cluster_known_nodes:{len(self.ports)}" in info)
                except (OSError, redis.exceptions.RedisError):
                    states.append(False)
                finally:
                    await client.aclose()
            if all(states):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Redis Cluster did not become ready: {states}")
            await asyncio.sleep(0.1)

    def master_of(self, key: str) -> int:
        """The index of the master serving ``key`` (slots as :meth:`start` assigned them)."""
        return min(key_slot(key.encode()) // (SLOTS // len(self.ports)), len(self.ports) - 1)

    def kill(self, index: int) -> None:
        """SIGKILL master ``index`` (its data is gone: it persists none)."""
        process = self.processes[index]
        if process is not None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            self.processes[index] = None

    async def restart(self, index: int) -> None:
        """Start master ``index`` again, empty, with its ``nodes.conf``; wait for the cluster to be ok."""
        self._spawn(index)
        client = aioredis.Redis(host="127.0.0.1", port=self.ports[index])
        try:
            await _wait_ping(client)
        finally:
            await client.aclose()
        await self.wait_ok()

    def close(self) -> None:
        """Kill every master still running."""
        for index, process in enumerate(self.processes):
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                self.processes[index] = None


async def _wait_ping(client: aioredis.Redis) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            await client.ping()
        except (OSError, redis.exceptions.RedisError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
        else:
            return
