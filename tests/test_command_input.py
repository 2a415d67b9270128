"""Whatever the engine acknowledges, recovery reads back; anything else is InvalidInput with nothing written.

The library takes commands from code, not from a schema-checked wire: a float or a bool amount,
``None`` where a string belongs, a reason of any length. Each is refused before it is decided
(or, for a record over the log's size limit, before anything changes); everything accepted
survives a reopen from the WAL alone, byte for byte the same state.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.strategies import HELD_ENTRY, careless_commands
from tollway import Commit, Credit, CreditKind, Engine, EntryState, InvalidInput, Reserve, Settings
from tollway.core import commands as cmd
from tollway.core.errors import RecordTooLarge
from tollway.core.ids import UNTRACED
from tollway.core.state import State
from tollway.testing import FakeClock
from tollway.wal.codec import MAX_RECORD_BYTES
from tollway.wal.segments import iter_events

ACCOUNT = "acct-1"


def _state_bytes(state: State) -> bytes:
    return msgspec.json.encode(state.to_snapshot())


def _with_held(command: cmd.Command, held_id: str) -> cmd.Command:
    """``command`` with the placeholder entry id replaced by the real hold's."""
    if getattr(command, "billing_entry_id", None) == HELD_ENTRY:
        return msgspec.structs.replace(command, billing_entry_id=held_id)
    return command


async def _reopened_from_the_wal(data_dir: Path, clock: FakeClock) -> bytes:
    """The state a restart rebuilds from the WAL alone (snapshots removed)."""
    shutil.rmtree(data_dir / "snapshots", ignore_errors=True)
    async with Engine.open(data_dir, clock=clock) as engine:
        return _state_bytes(engine.state)


async def _run(commands: list[cmd.Command], data_dir: Path) -> None:
    clock = FakeClock()
    settings_ = Settings(data_dir=data_dir, max_response_bytes=1 << 20)
    async with Engine.open(settings=settings_, clock=clock) as engine:
        await engine.execute(Credit(ACCOUNT, "seed", CreditKind.MINT, 1_000_000))
        held = await engine.execute(Reserve(ACCOUNT, "held", 10_000, ttl_s=3600))
        assert isinstance(held, cmd.EntryResult)
        for command in commands:
            before = _state_bytes(engine.state)
            try:
                await engine.execute(_with_held(command, held.entry.billing_entry_id))
            except InvalidInput:
                assert before == _state_bytes(engine.state)  # refused: nothing changed, nothing written
        expected = _state_bytes(engine.state)
    list(iter_events(data_dir / "wal"))  # every record reads back (raises on one that does not)
    assert expected == await _reopened_from_the_wal(data_dir, clock)


@settings(max_examples=60, deadline=None)
@given(commands=st.lists(careless_commands, min_size=1, max_size=8))
def test_every_acknowledged_command_survives_a_reopen(commands: list[cmd.Command]) -> None:
    """Any mix of commands with wrongly typed or oversized fields: what was accepted reads back after a reopen."""
    with tempfile.TemporaryDirectory() as scratch:
        asyncio.run(_run(commands, Path(scratch) / "data"))


async def _refused_without_a_write(engine: Engine, command: cmd.Command, field: str | None) -> None:
    before = engine.state.last_sequence
    with pytest.raises(InvalidInput) as refused:
        await engine.execute(command)
    assert (field, before) == (refused.value.field, engine.state.last_sequence)


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (Reserve(ACCOUNT, "r-float", 1.5), "estimated_cost_micro"),  # type: ignore[arg-type]
        (Reserve(ACCOUNT, "r-bool", True), "estimated_cost_micro"),
        (Credit(ACCOUNT, "c-float", CreditKind.MINT, 2.0), "amount_micro"),  # type: ignore[arg-type]
        (cmd.Charge(ACCOUNT, "ch", 10, allow_partial=1), "allow_partial"),  # type: ignore[arg-type]
        (cmd.FinalizeFail("01ARZ3NDEKTSV4RRFFQ69G5FAV", "r" * (2 << 20), 1), "reason"),
    ],
)
async def test_a_wrongly_typed_or_oversized_field_is_refused(
    engine: Engine, command: cmd.Command, field: str | None
) -> None:
    """A float or bool amount, an int for a bool, a 2 MiB reason: InvalidInput naming the field, nothing written."""
    await engine.execute(Credit(ACCOUNT, "seed", CreditKind.MINT, 1_000))
    await _refused_without_a_write(engine, command, field)


async def test_an_absent_correlation_id_is_recorded_as_untraced(tmp_path: Path, clock: FakeClock) -> None:
    """correlation_id=None means 'untraced' (SPEC §1), recorded so and read back after a reopen."""
    async with Engine.open(tmp_path / "data", clock=clock) as engine:
        await engine.execute(Credit(ACCOUNT, "seed", CreditKind.MINT, 1_000, correlation_id=None))  # type: ignore[arg-type]
        held = await engine.execute(Reserve(ACCOUNT, "r", 100, correlation_id=None))  # type: ignore[arg-type]
        assert isinstance(held, cmd.EntryResult)
    async with Engine.open(tmp_path / "data", clock=clock) as engine:
        assert UNTRACED == engine.state.entries[held.entry.billing_entry_id].correlation_id


async def test_a_record_over_the_log_limit_is_refused_before_the_hold_moves(tmp_path: Path, clock: FakeClock) -> None:
    """A commit whose record would exceed MAX_RECORD_BYTES is RecordTooLarge; the hold stays held, nothing lost."""
    settings_ = Settings(data_dir=tmp_path / "data", max_response_bytes=1 << 20)
    async with Engine.open(settings=settings_, clock=clock) as engine:
        await engine.execute(Credit(ACCOUNT, "seed", CreditKind.MINT, 1_000))
        held = await engine.execute(Reserve(ACCOUNT, "r", 100))
        assert isinstance(held, cmd.EntryResult)
        entry_id = held.entry.billing_entry_id
        with pytest.raises(RecordTooLarge):
            await engine.execute(Commit(entry_id, 50, response_json='"' + "z" * (MAX_RECORD_BYTES - 2) + '"'))
        assert EntryState.RESERVE_HELD == engine.state.entries[entry_id].state
        done = await engine.execute(Commit(entry_id, 50, response_json='{"ok": true}'))
        assert isinstance(done, cmd.EntryResult)
    async with Engine.open(tmp_path / "data", clock=clock) as engine:
        read = await engine.read_entry(entry_id)
        assert read is not None
        assert (EntryState.COMMITTED, '{"ok": true}') == (read[0].state, read[1])
