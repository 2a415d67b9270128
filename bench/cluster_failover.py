"""Failover times of ``bench/cluster.py``: a node killed, and the PostgreSQL primary killed.

- :func:`node_failover`: two real nodes, eight shards; ``kill -9`` of the node that owns an
  account's shard, then a read of that account through the survivor every 20 ms until it
  answers: ``kill_to_answer_s`` against the lease time (target: ≤ lease + 2 s).
- :func:`pg_failover`: a primary with a synchronous standby made by ``pg_basebackup``
  (:func:`tollway.pg.replicated.replicated`), two nodes on the multi-host URL
  (``target_session_attrs=read-write``), one funded account per shard. ``kill -9`` of the
  primary, then at once the standby promoted; from the kill, every :data:`PROBE_EVERY_S` a new
  reserve per shard not yet answered (a fresh connection, the nodes in turn, at most
  :data:`PROBES_IN_FLIGHT_MAX` waiting per shard) until each shard acknowledged one:
  ``kill_to_first_ack_s`` (any shard), ``kill_to_all_shards_ack_s``, and the same from the
  end of the promotion. The nodes are never restarted: their pools reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.cluster_nodes import SHARDS, Nodes, Tokens, create_cluster, fund, get, request, start_nodes
from bench.load import BenchError
from tollway.core.shard import shard
from tollway.pg.replicated import replicated

ACCOUNTS: Final = [f"bench-{i}" for i in range(64)]
POLL_S: Final = 0.02
PROBE_EVERY_S: Final = 0.05
PROBES_IN_FLIGHT_MAX: Final = 8  # per shard
PROBE_TIMEOUT_S: Final = 30.0
PG_FAILOVER_DEADLINE_S: Final = 120.0


async def node_failover(nodes: Nodes, token: str, ttl_ms: int) -> dict[str, Any]:
    """Seconds from kill -9 of the second node to the first answering for one of its shards."""
    victim_shards = set((await get(nodes.urls[1], "/v1/cluster", token))[1]["serving"])
    account = next(a for a in ACCOUNTS if shard(a, SHARDS) in victim_shards)
    nodes.processes[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    while (await get(nodes.urls[0], f"/v1/accounts/{account}", token))[0] != 200:  # noqa: ASYNC110 - polling
        await asyncio.sleep(POLL_S)
    return {"lease_ttl_s": ttl_ms / 1000, "kill_to_answer_s": round(time.monotonic() - killed, 3)}


@dataclass
class Probes:
    """Reserves sent from the kill on until every shard acknowledged one; what came back meanwhile."""

    urls: list[str]
    token: str
    accounts: dict[int, str]  # shard -> a funded account of it
    started: float = field(default_factory=time.monotonic)
    acked_s: dict[int, float] = field(default_factory=dict)  # shard -> seconds from the kill to its first 201
    refused: dict[str, int] = field(default_factory=dict)  # status (or "error") -> count
    turn: itertools.count[int] = field(default_factory=itertools.count)

    async def attempt(self, number: int, index: int) -> None:
        """One reserve on a fresh connection; its first 201 marks the shard answered again."""
        body = {"account_id": self.accounts[number], "request_id": f"ha-{number}-{index}", "estimated_cost_micro": "1"}
        url = self.urls[next(self.turn) % len(self.urls)]
        try:
            answer = await asyncio.wait_for(request(url, "POST", "/v1/reservations", self.token, body), PROBE_TIMEOUT_S)
            outcome = str(answer[0])
        except (OSError, TimeoutError, BenchError) as exc:
            outcome = type(exc).__name__
        if outcome == "201":
            self.acked_s.setdefault(number, time.monotonic() - self.started)
        else:
            self.refused[outcome] = self.refused.get(outcome, 0) + 1

    async def shard(self, number: int) -> None:
        """New attempts every :data:`PROBE_EVERY_S` until the shard answered; the ones in flight cancelled then."""
        pending: set[asyncio.Task[None]] = set()
        try:
            for index in itertools.count():
                if number in self.acked_s:
                    return
                if len(pending) < PROBES_IN_FLIGHT_MAX:
                    pending.add(asyncio.create_task(self.attempt(number, index)))
                done, pending = await asyncio.wait(pending, timeout=PROBE_EVERY_S)
                for task in done:
                    task.result()
        finally:
            for task in pending:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pending, return_exceptions=True)


def shard_accounts() -> dict[int, str]:
    """One account name per shard."""
    found: dict[int, str] = {}
    for index in itertools.count():
        found.setdefault(shard(f"ha-{index}", SHARDS), f"ha-{index}")
        if len(found) == SHARDS:
            return found
    raise AssertionError  # pragma: no cover - count() never ends


async def pg_failover(root: Path, ttl_ms: int, tokens: Tokens) -> dict[str, Any]:
    """Seconds until each shard acknowledges a reserve after kill -9 of the primary and the standby's promotion."""
    async with replicated(root / "pg-ha") as pair:
        await create_cluster(pair.url)
        nodes = await start_nodes(["ha-a", "ha-b"], pair.url, root, ttl_ms, tokens.admin)
        try:
            accounts = shard_accounts()
            await fund(nodes.urls, tokens.admin, list(accounts.values()))
            pair.primary.kill()
            probes = Probes(nodes.urls, tokens.gateway, accounts, started=time.monotonic())
            running = asyncio.gather(*(probes.shard(number) for number in accounts))
            await pair.standby.promote()
            promoted_s = time.monotonic() - probes.started
            await asyncio.wait_for(running, PG_FAILOVER_DEADLINE_S)
            alive = [process.poll() is None for process in nodes.processes]
        finally:
            nodes.stop()
    first, last = min(probes.acked_s.values()), max(probes.acked_s.values())
    return {
        "lease_ttl_s": ttl_ms / 1000,
        "kill_to_promoted_s": round(promoted_s, 3),
        "kill_to_first_ack_s": round(first, 3),
        "kill_to_all_shards_ack_s": round(last, 3),
        "promoted_to_first_ack_s": round(first - promoted_s, 3),
        "promoted_to_all_shards_ack_s": round(last - promoted_s, 3),
        "refused": dict(sorted(probes.refused.items())),
        "nodes_kept_running": all(alive),
    }
