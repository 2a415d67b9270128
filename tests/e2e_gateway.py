"""Simulated gateways over real HTTP with an ack log, and the check that every acknowledged operation is there once.

A gateway task loops: now and then an admin top-up (mint), then reserve, then commit (most of
the time, sometimes over the estimate), release, or leave the hold open. Before each operation
it appends an ``intent`` line to the :class:`AckLog`, and once the service answered it an
``ack`` line with the result (entry id, charged amount), or a ``refused`` line when the hold
was refused for funds. When the service goes away (a transport
failure or a 503) the task ends, its last intent unacknowledged — exactly what a gateway sees
when the billing service is killed under it.

After a restart, :func:`check_acknowledged` reads every entry through the SDK *before* writing
anything and requires each acknowledged operation with its result; :func:`retry_unacknowledged`
then repeats every unacknowledged intent with the same idempotency key, as a gateway would; and
:func:`check_exactly_once` requires each request id once, balances that add up, and every
acknowledged operation to answer ``replayed`` (or ``request_in_progress`` for an open hold).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tollway.client import (
    AsyncClient,
    Entry,
    InsufficientFunds,
    RequestInProgress,
    ServiceUnavailable,
    TransportFailure,
)

MINT_MICRO: Final = 200_000
ESTIMATE_MICRO_MAX: Final = 5_000
OVERRUN_MICRO_MAX: Final = 1_000
MINT_EVERY: Final = 5  # a gateway tops its account up every this many iterations
ITERATIONS_MAX: Final = 100_000  # a bound: a gateway whose service is never stopped still ends
CHECK_CONCURRENCY: Final = 32
GONE: Final = (TransportFailure, ServiceUnavailable)
"""What a gateway sees when the service stops under it."""


class AckLog:
    """Append-only JSON lines; every line is one ``os.write`` on an ``O_APPEND`` descriptor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, kind: str, op_id: str, **fields: Any) -> None:
        """One line: ``kind`` is ``intent`` or ``ack``; ``op_id`` names the operation and its key."""
        line = json.dumps({"kind": kind, "op_id": op_id, **fields}, sort_keys=True) + "\n"
        os.write(self._fd, line.encode())

    def lines(self) -> list[dict[str, Any]]:
        """Every line so far."""
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def acks(self) -> dict[str, dict[str, Any]]:
        """The acknowledged operations by op_id."""
        return {line["op_id"]: line for line in self.lines() if line["kind"] == "ack"}

    def unanswered(self) -> list[dict[str, Any]]:
        """Intents the service neither acknowledged nor refused, in the order they were made."""
        answered = {line["op_id"] for line in self.lines() if line["kind"] != "intent"}
        return [line for line in self.lines() if line["kind"] == "intent" and line["op_id"] not in answered]

    def close(self) -> None:
        """Close the descriptor."""
        os.close(self._fd)


@dataclass
class Gateways:
    """The clients and the log the simulated gateways share."""

    gateway: AsyncClient  # billing:gateway token
    admin: AsyncClient  # billing:admin token (mints, reads)
    log: AckLog

    async def mint(self, account: str, credit_id: str, amount: int = MINT_MICRO) -> None:
        """A top-up, logged."""
        op_id = f"mint:{account}:{credit_id}"
        self.log.write("intent", op_id, op="mint", account=account, key=credit_id, amount=amount)
        result = await self.admin.credit(account, credit_id, amount)
        self.log.write("ack", op_id, op="mint", account=account, key=credit_id, amount=result.amount_micro)

    async def reserve(self, account: str, request_id: str, estimate: int) -> str | None:
        """A hold, logged; its entry id, or None when refused for funds."""
        op_id = f"reserve:{account}:{request_id}"
        self.log.write("intent", op_id, op="reserve", account=account, key=request_id, amount=estimate)
        try:
            entry = await self.gateway.reserve(account, request_id, estimated_cost_micro=estimate)
        except InsufficientFunds:
            self.log.write("refused", op_id, op="reserve", account=account, key=request_id, amount=estimate)
            return None
        except RequestInProgress as exc:  # a retry of a hold that reached the WAL before the crash
            entry_id = str(exc.details["billing_entry_id"])
        else:
            entry_id = entry.billing_entry_id
        self.log.write("ack", op_id, op="reserve", account=account, key=request_id, amount=estimate, entry=entry_id)
        return entry_id

    async def commit(self, entry_id: str, actual: int) -> None:
        """A commit, logged with what was charged."""
        op_id = f"commit:{entry_id}"
        self.log.write("intent", op_id, op="commit", entry=entry_id, amount=actual)
        entry = await self.gateway.commit(entry_id, actual_cost_micro=actual)
        self.log.write("ack", op_id, op="commit", entry=entry_id, amount=actual, charged=entry.charged_micro)

    async def release(self, entry_id: str) -> None:
        """A release, logged."""
        op_id = f"release:{entry_id}"
        self.log.write("intent", op_id, op="release", entry=entry_id)
        await self.gateway.release(entry_id, "pre_stream_failure")
        self.log.write("ack", op_id, op="release", entry=entry_id)

    async def run(self, run: int, task: int, account: str, rng: random.Random) -> None:
        """One gateway until the service goes away (or ``ITERATIONS_MAX``)."""
        try:
            for index in range(ITERATIONS_MAX):
                if index % MINT_EVERY == 0:
                    await self.mint(account, f"m-{run}-{task}-{index}")
                estimate = rng.randint(1, ESTIMATE_MICRO_MAX)
                entry_id = await self.reserve(account, f"r-{run}-{task}-{index}", estimate)
                roll = rng.random()
                if entry_id is None or roll >= 0.9:  # one hold in ten stays open across the crash
                    continue
                if roll < 0.7:
                    await self.commit(entry_id, rng.randint(0, estimate + OVERRUN_MICRO_MAX))
                else:
                    await self.release(entry_id)
        except GONE:
            return


def accounts_of(tasks: int, accounts: int) -> list[str]:
    """The account of each gateway task (several tasks share one account)."""
    return [f"acct-{task % accounts}" for task in range(tasks)]


async def bounded(calls: Iterable[Awaitable[Any]], limit: int = CHECK_CONCURRENCY) -> list[Any]:
    """Await ``calls`` with at most ``limit`` in flight; results in order."""
    semaphore = asyncio.Semaphore(limit)

    async def one(call: Awaitable[Any]) -> Any:
        async with semaphore:
            return await call

    return await asyncio.gather(*(one(call) for call in calls))


async def all_entries(admin: AsyncClient, accounts: Iterable[str]) -> list[Entry]:
    """Every entry of ``accounts``, read page by page through the SDK."""
    found: list[Entry] = []
    for account in sorted(set(accounts)):
        found.extend([entry async for entry in admin.iter_entries(account, limit=1000)])
    return found


def _problems_of(ack: dict[str, Any], by_request: dict[tuple[str, str], list[Entry]], by_id: dict[str, Entry]) -> str:
    """Why the acknowledged operation ``ack`` is not in ``entries`` as acknowledged ('' when it is)."""
    op = ack["op"]
    if op == "reserve":
        same = by_request.get((ack["account"], ack["key"]), [])
        ids = [entry.billing_entry_id for entry in same]
        if ids != [ack["entry"]] or same[0].estimated_cost_micro != ack["amount"]:
            return f"reserve {ack['key']}: entries {ids}"
        return ""
    if op == "mint":
        return ""  # mints have no entry; the balances and the replay check them
    entry = by_id.get(ack["entry"])
    if entry is None:
        return f"{op} of a missing entry {ack['entry']}"
    if op == "commit" and ("COMMITTED", ack["amount"], ack["charged"]) != (
        entry.state,
        entry.actual_cost_micro,
        entry.charged_micro,
    ):
        return f"commit {entry.billing_entry_id}: {entry.state} actual {entry.actual_cost_micro}"
    if op == "release" and entry.state != "RELEASED":
        return f"release {entry.billing_entry_id}: {entry.state}"
    return ""


def _index(entries: list[Entry]) -> tuple[dict[tuple[str, str], list[Entry]], dict[str, Entry]]:
    by_request: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    for entry in entries:
        by_request[entry.account_id, entry.request_id].append(entry)
    return by_request, {entry.billing_entry_id: entry for entry in entries}


async def check_acknowledged(admin: AsyncClient, log: AckLog, accounts: Iterable[str]) -> list[str]:
    """Every acknowledged operation that is not present with its acknowledged result (read-only)."""
    by_request, by_id = _index(await all_entries(admin, accounts))
    return [why for ack in log.acks().values() if (why := _problems_of(ack, by_request, by_id))]


async def check_unanswered_had_no_effect(admin: AsyncClient, log: AckLog, accounts: Iterable[str]) -> list[str]:
    """Unanswered intents that took effect anyway (read-only): after a graceful stop there must be none.

    A reserve left no entry, a commit or release left its hold open, and each account's money
    (available + held + charged) is exactly its acknowledged mints.
    """
    entries = await all_entries(admin, accounts)
    by_request, by_id = _index(entries)
    problems = []
    for line in log.unanswered():
        if line["op"] == "reserve" and (line["account"], line["key"]) in by_request:
            problems.append(f"unanswered reserve {line['key']} created an entry")
        if line["op"] in {"commit", "release"} and by_id[line["entry"]].state != "RESERVE_HELD":
            problems.append(f"unanswered {line['op']} of {line['entry']} took effect")
    for account, (available, held, charged) in _balance_expectations(entries, log.acks()).items():
        balance = await admin.balance(account)
        if available + held + charged != balance.available_micro + balance.held_micro + balance.charged_micro:
            problems.append(f"{account}: money differs from the acknowledged mints")
    return problems


async def retry_unacknowledged(gateways: Gateways) -> int:
    """Repeat every intent without an ack, with the same key and parameters; how many were repeated."""
    intents = gateways.log.unanswered()
    for line in intents:
        match line["op"]:
            case "mint":
                await gateways.mint(line["account"], line["key"], line["amount"])
            case "reserve":
                await gateways.reserve(line["account"], line["key"], line["amount"])
            case "commit":
                await gateways.commit(line["entry"], line["amount"])
            case "release":
                await gateways.release(line["entry"])
    return len(intents)


async def _replay_problem(gateways: Gateways, ack: dict[str, Any]) -> str:
    """Why repeating the acknowledged ``ack`` did not answer as a repeat ('' when it did)."""
    client, op = gateways.gateway, ack["op"]
    if op == "mint":
        credit = await gateways.admin.credit(ack["account"], ack["key"], ack["amount"])
        return "" if (True, ack["amount"]) == (credit.replayed, credit.amount_micro) else f"mint {ack['key']}"
    if op == "reserve":
        try:
            entry = await client.reserve(ack["account"], ack["key"], estimated_cost_micro=ack["amount"])
        except RequestInProgress as exc:  # the hold is still open: no second hold
            return "" if ack["entry"] == exc.details.get("billing_entry_id") else f"reserve {ack['key']} in progress"
        return "" if (True, ack["entry"]) == (entry.replayed, entry.billing_entry_id) else f"reserve {ack['key']}"
    if op == "commit":
        entry = await client.commit(ack["entry"], actual_cost_micro=ack["amount"])
        return "" if (True, ack["charged"]) == (entry.replayed, entry.charged_micro) else f"commit {ack['entry']}"
    entry = await client.release(ack["entry"], "pre_stream_failure")
    return "" if (True, "RELEASED") == (entry.replayed, entry.state) else f"release {ack['entry']}"


def _balance_expectations(entries: list[Entry], acks: dict[str, dict[str, Any]]) -> dict[str, tuple[int, int, int]]:
    """(available, held, charged) each account must show, from its entries and its acknowledged mints."""
    minted: Counter[str] = Counter()
    for ack in acks.values():
        if ack["op"] == "mint":
            minted[ack["account"]] += ack["amount"]
    held: Counter[str] = Counter()
    charged: Counter[str] = Counter()
    for entry in entries:
        if entry.state == "RESERVE_HELD":
            held[entry.account_id] += entry.estimated_cost_micro
        charged[entry.account_id] += entry.charged_micro
    return {
        account: (minted[account] - held[account] - charged[account], held[account], charged[account])
        for account in minted
    }


async def check_exactly_once(gateways: Gateways, accounts: Iterable[str]) -> list[str]:
    """After the retries: one entry per request id, balances that add up, every acknowledged op a repeat."""
    entries = await all_entries(gateways.admin, accounts)
    counts = Counter((entry.account_id, entry.request_id) for entry in entries)
    problems = [f"request {key} has {count} entries" for key, count in counts.items() if count != 1]
    acks = gateways.log.acks()
    for account, expected in _balance_expectations(entries, acks).items():
        balance = await gateways.admin.balance(account)
        actual = (balance.available_micro, balance.held_micro, balance.charged_micro)
        if expected != actual:
            problems.append(f"{account}: expected (available, held, charged) {expected}, got {actual}")
    replays = await bounded(_replay_problem(gateways, ack) for ack in acks.values())
    return problems + [why for why in replays if why]
