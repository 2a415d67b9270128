"""``tollway serve`` as a real process stopped under concurrent SDK load: kill -9 and SIGTERM lose nothing acked."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from pathlib import Path
from typing import Final

import pytest

from tests.e2e_gateway import (
    AckLog,
    Gateways,
    accounts_of,
    check_acknowledged,
    check_exactly_once,
    check_unanswered_had_no_effect,
    retry_unacknowledged,
)
from tests.e2e_support import Serve, audit, sdk, serving

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to follow the embedded redis-server")

TASKS: Final = 16
ACCOUNTS: Final = 4
KILL_CYCLES: Final = 3
SEED: Final = 20_260_401
LOAD_S_MIN: Final = 0.3
LOAD_S_MAX: Final = 1.2
GATEWAYS_END_TIMEOUT_S: Final = 30.0
ACCOUNT_IDS: Final = accounts_of(TASKS, ACCOUNTS)


class Tokens:
    """The admin and gateway tokens the first start printed (valid across restarts: same key)."""

    def __init__(self, serve: Serve) -> None:
        self.admin = serve.printed_token("admin")
        self.gateway = serve.printed_token("gateway")


async def _load_then_stop(
    serve: Serve, tokens: Tokens, log: AckLog, run: int, rng: random.Random, *, sig: signal.Signals
) -> int:
    """Run every gateway, send ``sig`` at a random point of the load, wait for the gateways; the exit status."""
    acked_before = len(log.acks())
    async with sdk(serve.url, tokens.gateway) as gateway, sdk(serve.url, tokens.admin) as admin:
        gateways = Gateways(gateway, admin, log)
        tasks = [
            asyncio.create_task(gateways.run(run, task, account, random.Random(rng.randrange(1 << 32))))
            for task, account in enumerate(ACCOUNT_IDS)
        ]
        try:
            await asyncio.sleep(rng.uniform(LOAD_S_MIN, LOAD_S_MAX))  # the random stop point is the point
            ended = [task for task in tasks if task.done()]
            await asyncio.gather(*ended)  # re-raises what ended a gateway early
            assert [] == ended, "a gateway ended before the stop signal"
            code = await (serve.sigkill() if sig == signal.SIGKILL else serve.sigterm())
            async with asyncio.timeout(GATEWAYS_END_TIMEOUT_S):
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
    assert len(log.acks()) > acked_before, f"run {run}: nothing was acknowledged before the stop"
    return code


async def _recover_and_check(serve: Serve, tokens: Tokens, log: AckLog, *, graceful: bool = False) -> None:
    """Acknowledged ops present (read-only first), then retries of the rest, then exactly once and replayed.

    After a ``graceful`` stop, an operation that got no answer must also have had no effect.
    """
    async with sdk(serve.url, tokens.gateway) as gateway, sdk(serve.url, tokens.admin) as admin:
        assert [] == await check_acknowledged(admin, log, ACCOUNT_IDS)
        if graceful:
            assert [] == await check_unanswered_had_no_effect(admin, log, ACCOUNT_IDS)
        gateways = Gateways(gateway, admin, log)
        await retry_unacknowledged(gateways)
        assert [] == log.unanswered()
        assert [] == await check_exactly_once(gateways, ACCOUNT_IDS)


@pytest.mark.slow
async def test_kill_9_under_load_loses_no_acknowledged_operation(tmp_path: Path) -> None:
    """After each kill -9 under load and a restart, every acked op is present once and replays; audit is clean."""
    rng = random.Random(SEED)
    data, log = tmp_path / "d", AckLog(tmp_path / "acks.jsonl")
    try:
        async with serving(data, tmp_path, "serve-0") as serve:
            tokens = Tokens(serve)
            assert -signal.SIGKILL == await _load_then_stop(serve, tokens, log, 0, rng, sig=signal.SIGKILL)
        for run in range(1, KILL_CYCLES + 1):
            async with serving(data, tmp_path, f"serve-{run}") as serve:
                await _recover_and_check(serve, tokens, log)
                if run < KILL_CYCLES:
                    assert -signal.SIGKILL == await _load_then_stop(serve, tokens, log, run, rng, sig=signal.SIGKILL)
                else:
                    assert 0 == await serve.sigterm()
    finally:
        log.close()
    result = await audit(data, tmp_path)
    assert 0 == result.returncode, result.stdout + result.stderr


@pytest.mark.slow
async def test_sigterm_under_load_loses_nothing(tmp_path: Path) -> None:
    """SIGTERM under load exits 0, audits clean; after a restart every acked op is there once, nothing unanswered is."""
    rng = random.Random(SEED + 1)
    data, log = tmp_path / "d", AckLog(tmp_path / "acks.jsonl")
    try:
        async with serving(data, tmp_path, "serve-0") as serve:
            tokens = Tokens(serve)
            assert 0 == await _load_then_stop(serve, tokens, log, 0, rng, sig=signal.SIGTERM)
        result = await audit(data, tmp_path)
        assert 0 == result.returncode, result.stdout + result.stderr
        async with serving(data, tmp_path, "serve-1") as serve:
            await _recover_and_check(serve, tokens, log, graceful=True)
            assert 0 == await serve.sigterm()
    finally:
        log.close()
    result = await audit(data, tmp_path)
    assert 0 == result.returncode, result.stdout + result.stderr
