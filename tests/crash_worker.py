"""Billing load that runs until it is killed: the subprocess of ``tests/test_crash.py``.

Usage: ``python crash_worker.py DATA_DIR ACK_LOG RUN SEED``.

Many asyncio tasks mint, reserve, commit and release against a few shared accounts with unique
ids, durability ``fsync``. Before each operation a task appends an ``intent`` line to ACK_LOG,
and after the engine acknowledged it an ``ack`` line (one ``os.write`` each on an ``O_APPEND``
descriptor, so a kill leaves whole lines and at most one partial last line).

At start, after recovery, it prints ``ready`` and retries every intent of earlier runs that has
no ack, with the same idempotency key, as a gateway would after a crash: a retry must never
create a second hold or a second credit. Then it generates load until the test kills it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Final

from tollway import (
    Commit,
    Credit,
    CreditKind,
    CreditResult,
    Engine,
    EntryResult,
    Refusal,
    RefusalCode,
    Release,
    Reserve,
    Settings,
)

TASKS: Final = 24
ACCOUNTS: Final = 4
MINT_MICRO: Final = 40_000
ITERATIONS_MAX: Final = 100_000  # a bound, so a worker that is never killed still ends
SEGMENT_BYTES: Final = 4 << 20  # small enough to rotate a few times under load
SNAPSHOT_EVERY_EVENTS: Final = 2_000


class AckLog:
    """Append-only JSON lines, each written with one system call."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, kind: str, **fields: Any) -> None:
        """Append one line: ``kind`` is "intent" or "ack"."""
        os.write(self._fd, (json.dumps({"kind": kind, **fields}, sort_keys=True) + "\n").encode())


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every complete line of an ack log (a kill can leave the last one partial)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text.split("\n")[:-1]]


async def mint(engine: Engine, log: AckLog, account: str, credit_id: str) -> None:
    """Mint ``MINT_MICRO`` under ``credit_id``; log intent and acknowledgement."""
    log.write("intent", op="mint", account=account, id=credit_id, amount=MINT_MICRO)
    result = await engine.execute(Credit(account, credit_id, CreditKind.MINT, MINT_MICRO))
    if isinstance(result, CreditResult):
        log.write("ack", op="mint", account=account, id=credit_id, amount=MINT_MICRO)


async def reserve(engine: Engine, log: AckLog, account: str, request_id: str, estimate: int) -> str | None:
    """Reserve ``estimate``; returns the entry id of a hold to settle, or None."""
    log.write("intent", op="reserve", account=account, id=request_id, amount=estimate)
    held = await engine.execute(Reserve(account, request_id, estimate))
    if isinstance(held, Refusal):
        if held.code is RefusalCode.REQUEST_IN_PROGRESS:  # a retry of a hold that survived the crash
            entry_id = held.details["billing_entry_id"]
            assert isinstance(entry_id, str)
            return entry_id
        return None
    assert isinstance(held, EntryResult)
    log.write("ack", op="reserve", account=account, id=request_id, entry=held.entry.billing_entry_id, amount=estimate)
    return held.entry.billing_entry_id if held.created else None


async def settle(engine: Engine, log: AckLog, entry_id: str, rng: random.Random, estimate: int) -> None:
    """Commit (most of the time, sometimes over the estimate) or release a hold."""
    if rng.random() < 0.7:
        actual = rng.randint(0, estimate + 1_000)
        done = await engine.execute(Commit(entry_id, actual))
        if isinstance(done, EntryResult):
            log.write("ack", op="commit", entry=entry_id, amount=actual)
    else:
        done = await engine.execute(Release(entry_id, "pre_stream_failure"))
        if isinstance(done, EntryResult):
            log.write("ack", op="release", entry=entry_id)


async def client(engine: Engine, log: AckLog, run: int, task: int, rng: random.Random) -> None:
    """One simulated gateway connection."""
    account = f"acct-{task % ACCOUNTS}"
    for index in range(ITERATIONS_MAX):
        if index % 4 == 0:
            await mint(engine, log, account, f"m-{run}-{task}-{index}")
        estimate = rng.randint(1, 5_000)
        entry_id = await reserve(engine, log, account, f"r-{run}-{task}-{index}", estimate)
        if entry_id is not None:
            await settle(engine, log, entry_id, rng, estimate)


async def retry_unacknowledged(engine: Engine, log: AckLog, previous: list[dict[str, Any]], rng: random.Random) -> None:
    """Repeat every earlier intent without an ack, with the same key and parameters."""
    acked = {(line["op"], line.get("account"), line.get("id")) for line in previous if line["kind"] == "ack"}
    for line in previous:
        if line["kind"] != "intent" or (line["op"], line["account"], line["id"]) in acked:
            continue
        if line["op"] == "mint":
            await mint(engine, log, line["account"], line["id"])
        else:
            entry_id = await reserve(engine, log, line["account"], line["id"], line["amount"])
            if entry_id is not None:
                await settle(engine, log, entry_id, rng, line["amount"])


async def main(data_dir: Path, ack_path: Path, run: int, seed: int) -> None:
    """Recover, say ready, retry what earlier runs left unanswered, then load until killed."""
    settings = Settings(data_dir=data_dir, segment_bytes=SEGMENT_BYTES, snapshot_every_events=SNAPSHOT_EVERY_EVENTS)
    previous = read_lines(ack_path)
    log = AckLog(ack_path)
    async with Engine.open(settings=settings) as engine:
        print("ready", flush=True)
        await retry_unacknowledged(engine, log, previous, random.Random(seed))
        await asyncio.gather(
            *(client(engine, log, run, task, random.Random(seed * 1_000 + task)) for task in range(TASKS))
        )


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
