"""Real cluster nodes for the multi-process tests: ``tollway serve --postgres-url`` on loopback.

A :class:`Cluster` creates a cluster in the test's fresh database (``tollway cluster init``),
one development key shared by its nodes (``tollway token issue --new-key`` in a shared data
directory, which holds nothing else in cluster mode), and starts nodes that bind port 0 and
print their URL. :meth:`Cluster.settled` waits until every shard is served by exactly one live
node, as ``GET /v1/cluster`` of each node tells.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Final

import httpx

from tests.e2e_support import LOOPBACK, POLL_S, Process, ProcessFailed, clean_environment, tollway_argv
from tollway.core.assignment import assign

SETTLE_TIMEOUT_S: Final = 60.0


def run_cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``tollway ARGS`` to completion, output captured."""
    return subprocess.run(
        tollway_argv(*args), capture_output=True, text=True, env=clean_environment(), timeout=timeout_s, check=False
    )


class Node:
    """One ``tollway serve --postgres-url`` process."""

    def __init__(
        self,
        name: str,
        postgres_url: str,
        data_dir: Path,
        log_dir: Path,
        lease_ttl_ms: int,
        *,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        args = [
            "serve",
            "--postgres-url",
            postgres_url,
            "--data-dir",
            str(data_dir),
            "--host",
            LOOPBACK,
            "--port",
            "0",
            "--node-id",
            name,
            "--lease-ttl-ms",
            str(lease_ttl_ms),
            "--log-level",
            "warning",
            *extra_args,
        ]
        self.name = name
        self.process = Process(name, tollway_argv(*args), log_dir, env=env)
        self.url = ""

    async def started(self) -> None:
        """Wait until it printed its URL."""
        line = await self.process.wait_for_output("serving on ")
        self.url = line.split("serving on ", 1)[1].split()[0]

    async def wait_for_log(self, marker: str, timeout_s: float = 30.0) -> None:
        """Wait until its log (stderr) says ``marker``."""
        deadline = time.monotonic() + timeout_s
        while marker not in self.process.err_path.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise ProcessFailed(
                    f"{self.name} did not log {marker!r} within {timeout_s} s: {self.process.describe()}"
                )
            await asyncio.sleep(POLL_S)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` (SIGKILL, SIGSTOP, SIGCONT, SIGTERM)."""
        self.process.popen.send_signal(sig)


class Cluster:
    """A cluster of ``tollway serve`` nodes on one fresh database."""

    def __init__(
        self,
        postgres_url: str,
        tmp_path: Path,
        *,
        shards: int,
        lease_ttl_ms: int,
        node_args: tuple[str, ...] = (),
        node_env: dict[str, str] | None = None,
    ) -> None:
        self.postgres_url = postgres_url
        self.node_args = node_args  # e.g. --redis-url, --settlement-url
        self.node_env = node_env
        self.dir = tmp_path
        self.shards = shards
        self.lease_ttl_ms = lease_ttl_ms
        self.data_dir = tmp_path / "keys"
        self.nodes: list[Node] = []
        init = run_cli("cluster", "init", "--postgres-url", postgres_url, "--shards", str(shards))
        assert 0 == init.returncode, init.stderr
        self.admin = self._token("admin")
        self.gateway = self._token("gateway")

    def _token(self, scope: str) -> str:
        issued = run_cli("token", "issue", "--new-key", "--data-dir", str(self.data_dir), "--scope", scope)
        assert 0 == issued.returncode, issued.stderr
        return issued.stdout.strip().splitlines()[-1]

    async def start(self, count: int) -> list[Node]:
        """Start ``count`` more nodes and wait until each printed its URL."""
        new = [
            Node(
                f"node-{len(self.nodes) + i}",
                self.postgres_url,
                self.data_dir,
                self.dir,
                self.lease_ttl_ms,
                extra_args=self.node_args,
                env=self.node_env,
            )
            for i in range(count)
        ]
        self.nodes.extend(new)
        await asyncio.gather(*(node.started() for node in new))
        return new

    def auth(self, token: str | None = None) -> dict[str, str]:
        """The Authorization header (admin by default)."""
        return {"Authorization": f"Bearer {token or self.admin}"}

    async def view(self, client: httpx.AsyncClient, node: Node) -> dict[str, Any]:
        """``GET /v1/cluster`` of ``node``."""
        response = await client.get(f"{node.url}/v1/cluster", headers=self.auth())
        assert 200 == response.status_code, response.text
        body: dict[str, Any] = response.json()
        return body

    async def settled(self, client: httpx.AsyncClient, alive: list[Node]) -> dict[int, str]:
        """Wait until the shards are served as :func:`assign` spreads them over ``alive``, and every map says so.

        Exactly one serving node per shard is not enough: a node that joined late serves nothing
        until the others hand it its share, and a test that picks "a shard of node 2" needs it to.
        """
        target = assign(self.shards, [node.name for node in alive])
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            served: dict[int, list[str]] = {}
            views = [await self._view_or_none(client, node) for node in alive]
            for node, view in zip(alive, views, strict=True):
                for number in view.get("serving", []) if view else []:
                    served.setdefault(number, []).append(node.name)
            owners = {number: names[0] for number, names in served.items() if len(names) == 1}
            if owners == target and all(view and _agrees(view, owners) for view in views):
                return owners
            if time.monotonic() > deadline:
                raise ProcessFailed(f"shards not settled: {served}\n" + "\n".join(n.process.describe() for n in alive))
            await asyncio.sleep(POLL_S * 4)

    async def _view_or_none(self, client: httpx.AsyncClient, node: Node) -> dict[str, Any] | None:
        try:
            return await self.view(client, node)
        except httpx.HTTPError:
            return None

    def close(self) -> None:
        """SIGCONT (a stopped node cannot die otherwise) and SIGKILL every node still running."""
        for node in self.nodes:
            if node.process.popen.poll() is None:
                node.signal(signal.SIGCONT)
            node.process.kill()


def _agrees(view: dict[str, Any], owners: dict[int, str]) -> bool:
    """Whether a node's shard map names the serving owner of every shard (so it forwards right)."""
    return all(row["owner"] == owners[row["shard"]] for row in view["shard_map"])
