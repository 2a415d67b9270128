"""A projection that diverges from the WAL is noticed within seconds and repaired from the WAL, without a restart.

Redis written behind tollway's back (an out-of-band ``HINCRBY``) used to stop the projector for
good while ``/readyz`` said ready, holds were still taken and committed charges never reached
the finalize stream. Now the divergence — found by the projection script (a balance that would
go negative) or by the guard's periodic parity check — degrades the guard (SPEC §9), is written
to the WAL as an audit event, and the projection is rebuilt from the engine state at once.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from tests.test_service import eventually
from tollway import Settings
from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.core.commands import CreditKind, EntryResult, Refusal, RefusalCode
from tollway.core.guard import GuardState
from tollway.core.lifecycle import EntryState
from tollway.redis.parity import differences
from tollway.redis.projector import AUDIT_DIVERGENCE, AUDIT_REBUILT
from tollway.service import Service, settlement_signing_key
from tollway.settlement.sim_config import SimulatorConfig
from tollway.settlement.simulator import SimulatorServer
from tollway.wal.segments import iter_events

WAIT_S = 20.0


def _audits(service: Service) -> list[str]:
    return [
        event.payload.action
        for event in iter_events(service.engine.settings.wal_dir)
        if isinstance(event.payload, ev.Audit) and event.payload.actor == "projector"
    ]


async def _funded_hold(service: Service) -> None:
    await service.engine.execute(cmd.Credit("acct", "m", CreditKind.MINT, 10_000))
    held = await service.engine.execute(cmd.Reserve("acct", "r0", 1_000))
    assert isinstance(held, EntryResult)
    await eventually(lambda: service.projector.applied_seq == service.engine.durable_sequence)


async def test_a_batch_refused_after_tampering_is_repaired_and_the_guard_degrades(tmp_path: Path) -> None:
    """An out-of-band HINCRBY makes the next batch a violation: rebuilt from the WAL, audited, guard degraded."""
    settings = Settings(data_dir=tmp_path / "data", parity_check_interval_s=0)
    async with Service.running(settings) as service:
        await _funded_hold(service)
        await service.redis.hincrby(service.keys.account("acct"), "available", -9_000)  # behind tollway's back
        held = await service.engine.execute(cmd.Reserve("acct", "r1", 500))  # its batch would go negative
        assert isinstance(held, EntryResult)
        await eventually(lambda: [AUDIT_DIVERGENCE, AUDIT_REBUILT] == _audits(service), WAIT_S)
        await eventually(lambda: service.projector.applied_seq == service.engine.durable_sequence, WAIT_S)
        assert 1 == service.projector.status().divergences
        assert [] == await differences(service.redis, service.keys, service.engine.state)
        guard = service.guard.status()
        assert (GuardState.DEGRADED, True, False) == (guard.state, guard.recovery_stopped, guard.holds_allowed)
        assert "balance would go negative" in (service.projector.status().last_divergence or "")
        refused = await service.engine.execute(cmd.Reserve("acct", "r2", 1))
        assert isinstance(refused, Refusal)
        assert RefusalCode.GUARD_UNAVAILABLE == refused.code
        await service.guard.reset("ops")  # the operator audited: the projection is in parity again
        assert GuardState.READY == service.guard.status().state


async def test_a_silent_divergence_is_found_by_the_periodic_parity_check(tmp_path: Path) -> None:
    """A tampered balance that breaks no script check is found by the parity check within its interval and rebuilt."""
    settings = Settings(data_dir=tmp_path / "data", parity_check_interval_s=1)
    async with Service.running(settings) as service:
        await _funded_hold(service)
        await service.redis.hincrby(service.keys.account("acct"), "available", 1_000_000)  # money out of nowhere
        await eventually(lambda: [AUDIT_DIVERGENCE, AUDIT_REBUILT] == _audits(service), WAIT_S)
        await eventually(lambda: service.projector.applied_seq == service.engine.durable_sequence, WAIT_S)
        assert 1 == service.projector.status().divergences
        assert [] == await differences(service.redis, service.keys, service.engine.state)
        assert GuardState.DEGRADED == service.guard.status().state


async def test_tampering_under_load_is_repaired_and_every_charge_is_finalized_once(tmp_path: Path) -> None:
    """Gateways bill on while Redis is tampered with: repaired, and settlement finalizes each charge exactly once."""
    data = tmp_path / "data"
    key, _ = settlement_signing_key(Settings(data_dir=data))
    async with SimulatorServer(SimulatorConfig(keys={key.kid: key.public()})) as simulator:
        settings = Settings(data_dir=data, settlement_url=simulator.url, parity_check_interval_s=1)
        async with Service.running(settings) as service:
            engine = service.engine
            for account in ("a", "b"):
                await engine.execute(cmd.Credit(account, "m", CreditKind.MINT, 10_000_000))
            stop = asyncio.Event()
            committed: dict[str, int] = {}

            async def gateway(name: str) -> None:
                rng = random.Random(name)
                for step in range(10_000):
                    if stop.is_set():
                        return
                    held = await engine.execute(cmd.Reserve(rng.choice("ab"), f"{name}-{step}", 2_000))
                    if not isinstance(held, EntryResult):  # the guard is degraded: no new holds until the reset
                        await asyncio.sleep(0.01)
                        continue
                    charged = rng.randint(0, 2_000)
                    done = await engine.execute(cmd.Commit(held.entry.billing_entry_id, charged))
                    assert isinstance(done, EntryResult)
                    committed[held.entry.billing_entry_id] = charged

            tasks = [asyncio.create_task(gateway(f"g{n}")) for n in range(4)]
            await eventually(lambda: len(committed) >= 50, WAIT_S)
            async with service.redis.pipeline(transaction=True) as tamper:  # both at once: a repair in
                tamper.hincrby(service.keys.account("a"), "available", -10_000_000)  # between would leave
                tamper.hincrby(service.keys.account("b"), "charged", 777)  # one for the next parity check
                await tamper.execute()
            await eventually(lambda: service.projector.status().divergences >= 1, WAIT_S)
            await service.guard.reset("ops")
            count = len(committed)
            await eventually(lambda: len(committed) >= count + 50, WAIT_S)
            stop.set()
            await asyncio.gather(*tasks)
            await eventually(
                lambda: all(engine.state.entry_state(i) is EntryState.FINALIZE_ACKED for i in committed), WAIT_S
            )
            # Everything applied durable and projected: the last acknowledgements may be applied but
            # not yet durable when the entries read FINALIZE_ACKED above.
            last = engine.state.last_sequence
            await eventually(lambda: service.projector.applied_seq == engine.durable_sequence >= last, WAIT_S)
            assert [] == await differences(service.redis, service.keys, engine.state)
        page, _ = simulator.state.book.page(None, 100_000)
        assert committed == {record.reservation_id: record.actual_cost_micro for record in page}
