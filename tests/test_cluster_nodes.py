"""Three real ``tollway serve --postgres-url`` nodes and the session's PostgreSQL, on loopback (CLUSTER.md §6).

Every request goes over HTTP to a node; a node answers a shard it holds with its engine and
forwards any other one hop to the owner. The load clients send to every node and retry a
retryable answer (503 ``shard_moved``, a node that does not answer) with the same request id,
which is what makes a retry take effect once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import asyncpg
import httpx
import pytest

from tests.cluster_support import Cluster, Node, run_cli
from tollway.core.shard import shard

SHARDS: Final = 8
LEASE_TTL_MS: Final = 2_000
STEADY_LEASE_TTL_MS: Final = 10_000
"""For tests of a cluster that should not move: a loaded machine must not expire a lease under them."""
RETRY_DEADLINE_S: Final = 90.0
RETRY_BACKOFF_MAX_S: Final = 1.0
ACCOUNTS: Final = [f"acct-{i}" for i in range(16)]

pytestmark = pytest.mark.timeout(240)


async def started(pg_url: str, tmp_path: Path, lease_ttl_ms: int) -> AsyncIterator[Cluster]:
    """A cluster of eight shards with three running nodes, every shard served."""
    made = Cluster(pg_url, tmp_path, shards=SHARDS, lease_ttl_ms=lease_ttl_ms)
    try:
        await made.start(3)
        async with httpx.AsyncClient(timeout=10) as client:
            await made.settled(client, made.nodes)
        yield made
    finally:
        made.close()


@pytest.fixture
async def cluster(pg_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Three nodes with short leases, for tests that kill, pause or stop one."""
    async for made in started(pg_url, tmp_path, LEASE_TTL_MS):
        yield made


@pytest.fixture
async def steady_cluster(pg_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Three nodes with long leases, for tests where no shard should move."""
    async for made in started(pg_url, tmp_path, STEADY_LEASE_TTL_MS):
        yield made


class Load:
    """Clients that send to every node in turn and retry retryable answers with the same body."""

    def __init__(self, cluster: Cluster, client: httpx.AsyncClient, nodes: list[Node]) -> None:
        self.cluster = cluster
        self.client = client
        self.nodes = nodes
        self.turn = itertools.count()
        self.retryable = 0
        self.other_failures: list[str] = []
        self.answered: list[tuple[int, int, str, float, float]] = []  # shard, epoch, node, sent, received

    async def send(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
    ) -> httpx.Response:
        """The first non-retryable answer, trying the nodes in turn."""
        deadline = time.monotonic() + RETRY_DEADLINE_S
        attempt = 0
        while True:
            node = self.nodes[next(self.turn) % len(self.nodes)]
            sent = time.monotonic()
            response: httpx.Response | None = None
            with contextlib.suppress(httpx.TransportError):  # a dead or stopped node: retryable
                response = await self.client.request(
                    method, node.url + path, json=body, headers=self.cluster.auth(token)
                )
                self.note(response, sent)
            if response is not None and not (response.status_code == 503 and response.json()["error"] == "shard_moved"):
                if response.status_code >= 500:
                    self.other_failures.append(f"{response.status_code} {response.text}")
                return response
            self.retryable += 1
            assert time.monotonic() < deadline, f"{method} {path} not answered within {RETRY_DEADLINE_S} s"
            await asyncio.sleep(backoff_s(attempt))
            attempt += 1

    def note(self, response: httpx.Response, sent: float) -> None:
        """Record which node answered for which shard and epoch, and when."""
        answered_by = response.headers.get("x-tollway-answered-by")
        if answered_by is not None:
            node, number, epoch = answered_by.split()
            self.answered.append((int(number), int(epoch), node, sent, time.monotonic()))

    def overlaps(self) -> list[str]:
        """Answers of an older epoch of a shard sent after an answer of a newer epoch was received."""
        first_received: dict[tuple[int, int], float] = {}
        for number, epoch, _, _, received in self.answered:
            first_received[(number, epoch)] = min(received, first_received.get((number, epoch), received))
        return [
            f"shard {number}: epoch {epoch} answered by {node} after epoch {newer} had answered"
            for number, epoch, node, sent, _ in self.answered
            for (other, newer), received in first_received.items()
            if other == number and newer > epoch and received < sent
        ]


def backoff_s(attempt: int) -> float:
    """Seconds before retry number ``attempt``: capped exponential backoff with jitter.

    A thousand callers retrying every 50 ms while shards move would be a retry storm that keeps a
    loaded node from renewing its leases; a well-behaved client backs off.
    """
    return random.uniform(0.5, 1.0) * min(RETRY_BACKOFF_MAX_S, 0.05 * 2.0**attempt)


async def mint_all(load: Load, amount_micro: int) -> None:
    for account in ACCOUNTS:
        response = await load.send(
            "POST",
            f"/v1/accounts/{account}/credits",
            {"credit_id": "seed", "kind": "mint", "amount_micro": amount_micro},
        )
        assert 201 == response.status_code, response.text


async def test_a_thousand_reserves_against_funds_for_a_hundred_grant_exactly_a_hundred(steady_cluster: Cluster) -> None:
    """1,000 concurrent reserves of 10 against 1,000 micro-USD, spread over three nodes: exactly 100 granted."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as client:
        load = Load(steady_cluster, client, steady_cluster.nodes)
        response = await load.send(
            "POST", "/v1/accounts/scarce/credits", {"credit_id": "seed", "kind": "mint", "amount_micro": 1_000}
        )
        assert 201 == response.status_code, response.text
        body = {"account_id": "scarce", "estimated_cost_micro": 10}
        answers = await asyncio.gather(
            *(
                load.send("POST", "/v1/reservations", {**body, "request_id": f"r-{i}"}, steady_cluster.gateway)
                for i in range(1_000)
            )
        )
        statuses = sorted(r.status_code for r in answers)
        balance = (await load.send("GET", "/v1/accounts/scarce")).json()
    assert (100, 900) == (statuses.count(201), statuses.count(402))
    assert ("0", "1000") == (balance["available_micro"], balance["held_micro"])


class Traffic:
    """Workers reserving 10 and committing 7, each pair retried to completion; what was acknowledged."""

    def __init__(self, load: Load, gateway: str) -> None:
        self.load = load
        self.gateway = gateway
        self.committed: dict[str, list[str]] = {account: [] for account in ACCOUNTS}
        self.stop = asyncio.Event()
        self.answers: list[tuple[float, int]] = []  # (monotonic time, status) of every pair's end

    async def pair(self, account: str, request_id: str) -> None:
        body = {"account_id": account, "request_id": request_id, "estimated_cost_micro": 10}
        held = await self.load.send("POST", "/v1/reservations", body, self.gateway)
        assert held.status_code in (201, 409), held.text  # 409 request_in_progress: a retry of a hold that landed
        entry_id = held.json()["billing_entry_id"]
        commit = await self.load.send(
            "POST", f"/v1/reservations/{entry_id}/commit", {"actual_cost_micro": 7}, self.gateway
        )
        assert 200 == commit.status_code, commit.text
        self.committed[account].append(entry_id)

    async def worker(self, number: int, accounts: list[str] = ACCOUNTS) -> None:
        for i in itertools.count():
            if self.stop.is_set():
                return
            await self.pair(accounts[(number + i) % len(accounts)], f"w{number}-{i}")

    async def check_balances(self, funded_micro: int) -> None:
        """Every acknowledged commit charged exactly once, nothing held, nothing else charged."""
        for account, entries in self.committed.items():
            balance = (await self.load.send("GET", f"/v1/accounts/{account}")).json()
            expected = (str(funded_micro - 7 * len(entries)), "0", str(7 * len(entries)))
            assert expected == (balance["available_micro"], balance["held_micro"], balance["charged_micro"])
            assert len(entries) == len(set(entries))


async def first_answer_s(load: Load, account: str, started: float) -> float:
    """Seconds from ``started`` until the account's shard answers a read again."""
    response = await load.send("GET", f"/v1/accounts/{account}")
    assert 200 == response.status_code, response.text
    return time.monotonic() - started


async def test_kill_9_of_a_node_under_load_loses_nothing_and_its_shards_answer_again(cluster: Cluster) -> None:
    """kill -9 of one of three nodes under load: its shards answer elsewhere within lease + recovery, exactly once."""
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
        load = Load(cluster, client, cluster.nodes)
        await mint_all(load, 1_000_000)
        owners = await cluster.settled(client, cluster.nodes)
        victim = cluster.nodes[2]
        orphan = next(a for a in ACCOUNTS if owners[shard(a, SHARDS)] == victim.name)
        traffic = Traffic(load, cluster.gateway)
        workers = [asyncio.create_task(traffic.worker(n)) for n in range(12)]
        await asyncio.sleep(1.5)
        victim.signal(signal.SIGKILL)
        killed = time.monotonic()
        recovered_s = await first_answer_s(Load(cluster, client, cluster.nodes[:2]), orphan, killed)
        await asyncio.sleep(1.0)
        traffic.stop.set()
        await asyncio.gather(*workers)
        await traffic.check_balances(1_000_000)
    audit = run_cli("cluster", "audit", "--postgres-url", cluster.postgres_url)
    assert 0 == audit.returncode, audit.stdout + audit.stderr
    assert [] == load.other_failures
    assert [] == load.overlaps()
    assert recovered_s < LEASE_TTL_MS / 1000 + 5.0, recovered_s
    assert sum(len(e) for e in traffic.committed.values()) > 0


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30.0) -> None:
    """Poll ``check`` until it says yes; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.05)


async def appends_waiting(watcher: asyncpg.Connection, node: Node) -> int:
    """How many of ``node``'s batch statements wait for a lock in PostgreSQL (its connections name it)."""
    found: int = await watcher.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'"
        " AND query LIKE '%INSERT INTO tollway.events%'",
        f"tollway {node.name}",
    )
    return found


async def epochs_of(watcher: asyncpg.Connection, numbers: list[int]) -> dict[int, tuple[int, str | None]]:
    """Each shard's lease epoch and owner."""
    rows = await watcher.fetch("SELECT shard, epoch, owner FROM tollway.leases WHERE shard = ANY($1)", numbers)
    return {row["shard"]: (row["epoch"], row["owner"]) for row in rows}


async def rows_of_epochs(watcher: asyncpg.Connection, epochs: dict[int, int]) -> dict[int, int]:
    """How many event rows each shard holds written under its given epoch."""
    return {
        number: await watcher.fetchval(
            "SELECT count(*) FROM tollway.events WHERE shard = $1 AND epoch = $2", number, epoch
        )
        for number, epoch in epochs.items()
    }


async def late_rows(watcher: asyncpg.Connection, epochs: dict[int, int]) -> list[str]:
    """Rows of a shard's old epoch stored after the first row of a newer epoch (the fence forbids any)."""
    late = []
    for number, epoch in epochs.items():
        first_new = await watcher.fetchval(
            "SELECT min(seq) FROM tollway.events WHERE shard = $1 AND epoch > $2", number, epoch
        )
        count = await watcher.fetchval(
            "SELECT count(*) FROM tollway.events WHERE shard = $1 AND epoch <= $2 AND seq > $3",
            number,
            epoch,
            first_new,
        )
        if first_new is None or count:
            late.append(f"shard {number}: new epoch's first row {first_new}, {count} old-epoch row(s) after it")
    return late


async def test_a_paused_nodes_batch_in_flight_is_refused_by_the_fence_and_its_callers_retries_succeed_once(
    cluster: Cluster,
) -> None:
    """SIGSTOP with a batch waiting in PostgreSQL, takeover, SIGCONT: that batch writes nothing, retries land once.

    A test transaction holds ``tollway.events`` in SHARE mode, so every batch statement waits
    before touching the lease row (leases, heartbeats and recovery go on). Once one of the
    zombie's batches waits, it is stopped; the others take its shards (new epochs, recovered
    from what is stored); the lock is let go and the zombie's statement runs with the old epoch:
    the fence matches nothing. SIGCONT: the zombie answers nothing for those shards any more,
    and its callers' retries reach the new owners and take effect exactly once.
    """
    # node-0: when it goes, assign() moves no shard between the other two, so no hand-off waits on the lock
    zombie, survivors = cluster.nodes[0], cluster.nodes[1:]
    watcher = await asyncpg.connect(cluster.postgres_url)
    blocker = await asyncpg.connect(cluster.postgres_url)
    try:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            load = Load(cluster, client, cluster.nodes)
            await mint_all(load, 1_000_000)
            owners = await cluster.settled(client, cluster.nodes)
            its_shards = sorted(n for n, name in owners.items() if name == zombie.name)
            old = {n: epoch for n, (epoch, _) in (await epochs_of(watcher, its_shards)).items()}
            traffic = Traffic(load, cluster.gateway)
            workers = [asyncio.create_task(traffic.worker(n)) for n in range(12)]
            await asyncio.sleep(1.0)
            blocking = blocker.transaction()
            await blocking.start()
            await blocker.execute("LOCK TABLE tollway.events IN SHARE MODE")
            # The twelve may all be waiting on the other nodes' shards by now: one more works the zombie's alone.
            zombie_accounts = [a for a in ACCOUNTS if owners[shard(a, SHARDS)] == zombie.name] or ACCOUNTS
            workers.append(asyncio.create_task(traffic.worker(len(workers), zombie_accounts)))
            await wait_until(lambda: _positive(appends_waiting(watcher, zombie)), "a batch of the zombie waits")
            zombie.signal(signal.SIGSTOP)

            async def taken_over() -> bool:
                now = await epochs_of(watcher, its_shards)
                return all(epoch > old[n] and owner not in (None, zombie.name) for n, (epoch, owner) in now.items())

            await wait_until(taken_over, "the zombie's shards acquired by the others")
            written_before = await rows_of_epochs(watcher, old)
            await blocking.commit()  # the zombie's waiting statement runs now, with its old epoch
            await wait_until(lambda: _zero(appends_waiting(watcher, zombie)), "the zombie's statement ran")
            written_after = await rows_of_epochs(watcher, old)
            taken = await cluster.settled(client, survivors)
            zombie.signal(signal.SIGCONT)
            await zombie.wait_for_log("refused by the fence")
            await asyncio.sleep(LEASE_TTL_MS / 1000)
            traffic.stop.set()
            await asyncio.gather(*workers)
            await traffic.check_balances(1_000_000)
            after = await cluster.settled(client, cluster.nodes)
        late = await late_rows(watcher, old)
    finally:
        await blocker.close()
        await watcher.close()
    audit = run_cli("cluster", "audit", "--postgres-url", cluster.postgres_url)
    assert 0 == audit.returncode, audit.stdout + audit.stderr
    assert written_before == written_after  # the batch in flight under the old epoch wrote nothing
    assert [] == late
    assert ([], []) == (load.other_failures, load.overlaps())
    assert load.retryable > 0
    assert zombie.name not in taken.values()
    assert sorted(owners) == sorted(after)


async def _positive(count: Awaitable[int]) -> bool:
    return await count > 0


async def _zero(count: Awaitable[int]) -> bool:
    return await count == 0


async def test_forwarding_answers_exactly_as_the_owner(steady_cluster: Cluster) -> None:
    """Every v1 endpoint through a non-owner answers as through the owner: status, body, replays and errors."""
    async with httpx.AsyncClient(timeout=30) as client:
        owners = await steady_cluster.settled(client, steady_cluster.nodes)
        account = ACCOUNTS[0]
        owner = next(n for n in steady_cluster.nodes if n.name == owners[shard(account, SHARDS)])
        other = next(n for n in steady_cluster.nodes if n is not owner)
        gw, admin = steady_cluster.auth(steady_cluster.gateway), steady_cluster.auth()

        async def both(method: str, path: str, body: dict[str, Any] | None = None, headers: Any = None) -> Any:
            """The same request through the owner and through the other node: (status, body) of each."""
            answers = []
            for node in (owner, other):
                response = await client.request(method, node.url + path, json=body, headers=headers)
                answers.append((response.status_code, response.json()))
            return answers

        def first(method: str, path: str, body: dict[str, Any], headers: Any) -> Any:
            return client.request(method, other.url + path, json=body, headers=headers)  # forwarded

        credit = {"credit_id": "c1", "kind": "mint", "amount_micro": 1_000}
        assert 201 == (await first("POST", f"/v1/accounts/{account}/credits", credit, admin)).status_code
        pairs = [await both("POST", f"/v1/accounts/{account}/credits", credit, admin)]
        hold = {"account_id": account, "request_id": "r1", "estimated_cost_micro": 100}
        entry = (await first("POST", "/v1/reservations", hold, gw)).json()["billing_entry_id"]
        pairs.append(await both("POST", "/v1/reservations", hold, gw))  # 409 request_in_progress
        pairs.append(await both("GET", f"/v1/reservations/{entry}", None, gw))
        pairs.append(await both("GET", f"/v1/accounts/{account}", None, gw))
        await first("POST", f"/v1/reservations/{entry}/extend", {"ttl_s": 600}, gw)
        await first("POST", f"/v1/reservations/{entry}/commit", {"actual_cost_micro": 60}, gw)
        pairs.append(await both("POST", f"/v1/reservations/{entry}/commit", {"actual_cost_micro": 60}, gw))
        pairs.append(await both("POST", f"/v1/reservations/{entry}/extend", {"ttl_s": 600}, gw))  # 409
        await first("POST", f"/v1/entries/{entry}/void", {"reason": "refund"}, admin)
        pairs.append(await both("POST", f"/v1/entries/{entry}/void", {"reason": "refund"}, admin))
        pairs.append(await both("POST", f"/v1/entries/{entry}/finalize", None, admin))  # 409
        second = {"account_id": account, "request_id": "r2", "estimated_cost_micro": 10}
        held = (await first("POST", "/v1/reservations", second, gw)).json()["billing_entry_id"]
        await first("POST", f"/v1/reservations/{held}/release", {"reason": "user_cancel"}, gw)
        pairs.append(await both("POST", f"/v1/reservations/{held}/release", {"reason": "user_cancel"}, gw))
        charge = {"account_id": account, "request_id": "ch1", "amount_micro": 5}
        assert 201 == (await first("POST", "/v1/charges", charge, gw)).status_code
        pairs.append(await both("POST", "/v1/charges", charge, gw))
        pairs.append(await both("GET", f"/v1/accounts/{account}/entries", None, gw))
        pairs.append(await both("GET", f"/v1/accounts/{account}", None, gw))
        unknown = entry[:10] + held[10:12] + "0" * 14  # an unknown id of the same shard
        pairs.append(await both("GET", f"/v1/reservations/{unknown}", None, gw))  # 404
        pairs.append(
            await both("POST", "/v1/reservations", {**hold, "request_id": "big", "estimated_cost_micro": 10**9}, gw)
        )
        pairs.append(await both("POST", "/v1/reservations", {"account_id": account}, gw))  # 400
        pairs.append(await both("GET", f"/v1/accounts/{account}", None, None))  # 401
    statuses = [owner_answer[0] for owner_answer, _ in pairs]
    assert [a for a, _ in pairs] == [b for _, b in pairs]
    assert [200, 409, 200, 200, 200, 409, 200, 409, 200, 200, 200, 200, 404, 402, 400, 401] == statuses


async def test_sigterm_hands_shards_off_under_load_with_only_retryable_refusals(cluster: Cluster) -> None:
    """SIGTERM of a node under load: snapshot, release, the others take over; only 503 shard_moved, nothing lost."""
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
        load = Load(cluster, client, cluster.nodes)
        await mint_all(load, 1_000_000)
        await cluster.settled(client, cluster.nodes)
        owners = await cluster.settled(client, cluster.nodes)
        leaving = cluster.nodes[0]
        handed = sorted(n for n, name in owners.items() if name == leaving.name)
        traffic = Traffic(load, cluster.gateway)
        workers = [asyncio.create_task(traffic.worker(n)) for n in range(12)]
        await asyncio.sleep(1.0)
        leaving.signal(signal.SIGTERM)
        code = await leaving.process.wait_exit()
        after = await cluster.settled(client, cluster.nodes[1:])
        await asyncio.sleep(0.5)
        traffic.stop.set()
        await asyncio.gather(*workers)
        await traffic.check_balances(1_000_000)
    audit = run_cli("cluster", "audit", "--postgres-url", cluster.postgres_url)
    connection = await asyncpg.connect(cluster.postgres_url)
    try:
        snapshotted = await connection.fetch("SELECT DISTINCT shard FROM tollway.snapshots ORDER BY shard")
    finally:
        await connection.close()
    assert (0, 0) == (code, audit.returncode), leaving.process.describe() + audit.stdout
    assert ([], []) == (load.other_failures, load.overlaps())
    assert leaving.name not in after.values()
    assert set(handed) <= {row["shard"] for row in snapshotted}  # each handed-off shard wrote a snapshot row


async def test_a_fourth_node_joining_under_load_takes_its_share_by_hand_off_losing_nothing(cluster: Cluster) -> None:
    """A node joins under load: its shards are handed over (snapshot, release), only 503 shard_moved, nothing lost."""
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
        load = Load(cluster, client, cluster.nodes)
        await mint_all(load, 1_000_000)
        before = await cluster.settled(client, cluster.nodes)
        epochs = {row["shard"]: row["epoch"] for row in (await cluster.view(client, cluster.nodes[0]))["shard_map"]}
        traffic = Traffic(load, cluster.gateway)
        workers = [asyncio.create_task(traffic.worker(n)) for n in range(12)]
        await asyncio.sleep(1.0)
        (joined,) = await cluster.start(1)
        load.nodes = cluster.nodes  # the clients send to the new node too
        after = await cluster.settled(client, cluster.nodes)
        await asyncio.sleep(1.0)
        traffic.stop.set()
        await asyncio.gather(*workers)
        await traffic.check_balances(1_000_000)
    moved = sorted(n for n in after if after[n] != before[n])
    audit = run_cli("cluster", "audit", "--postgres-url", cluster.postgres_url)
    connection = await asyncpg.connect(cluster.postgres_url)
    try:
        handed = await connection.fetch(
            "SELECT DISTINCT shard, epoch FROM tollway.snapshots WHERE shard = ANY($1)", moved
        )
        new_epochs = await epochs_of(connection, moved)
    finally:
        await connection.close()
    assert 0 == audit.returncode, audit.stdout + audit.stderr
    assert ([], []) == (load.other_failures, load.overlaps())
    assert joined.name in after.values()
    assert {(n, epochs[n]) for n in moved} <= {
        (row["shard"], row["epoch"]) for row in handed
    }  # the old owner's snapshot
    assert all(epoch > epochs[n] for n, (epoch, _) in new_epochs.items())
    assert sum(len(e) for e in traffic.committed.values()) > 0
