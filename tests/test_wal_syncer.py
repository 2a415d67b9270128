"""The WAL sync helper process: syncs, errors, its death, signals, and its end."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tollway.core.errors import WalIOFailure
from tollway.wal.syncer import SyncProcess

EXIT_TIMEOUT_S = 10


@pytest.fixture
async def syncer() -> AsyncIterator[SyncProcess]:
    """A running helper; closed after the test."""
    started = SyncProcess.start()
    try:
        yield started
    finally:
        await started.close()


async def wait_exited(syncer: SyncProcess) -> int | None:
    """The helper's exit status once it has exited (None: it did not within the timeout)."""
    process = syncer._process
    for _ in range(EXIT_TIMEOUT_S * 100):
        if process.poll() is not None:
            return process.returncode
        await asyncio.sleep(0.01)
    return None


async def test_syncs_the_file_it_is_given_and_follows_a_new_one(syncer: SyncProcess, tmp_path: Path) -> None:
    """A sync answers once fdatasync returned; a new generation hands the helper the new descriptor."""
    first = os.open(tmp_path / "a", os.O_WRONLY | os.O_CREAT, 0o644)
    second = os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for generation, fd in ((1, first), (1, first), (2, second), (2, second)):
            os.write(fd, b"record")
            await asyncio.wait_for(syncer.sync(fd, generation), EXIT_TIMEOUT_S)
    finally:
        os.close(first)
        os.close(second)


async def test_a_failed_fdatasync_is_a_wal_io_failure(syncer: SyncProcess) -> None:
    """fdatasync failing in the helper (here: on a pipe, EINVAL) fails the sync with its error."""
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(WalIOFailure, match=r"WAL fdatasync failed: .*Invalid argument"):
            await asyncio.wait_for(syncer.sync(write_end, 1), EXIT_TIMEOUT_S)
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_one_sync_at_a_time(syncer: SyncProcess, tmp_path: Path) -> None:
    """A second request while one is in flight is a bug in the caller, refused at once."""
    fd = os.open(tmp_path / "a", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        first = syncer.sync(fd, 1)
        with pytest.raises(RuntimeError, match="already in flight"):
            syncer.sync(fd, 1)
        await asyncio.wait_for(first, EXIT_TIMEOUT_S)
    finally:
        os.close(fd)


async def test_a_dead_helper_fails_the_sync_in_flight_and_every_later_one(syncer: SyncProcess, tmp_path: Path) -> None:
    """kill -9 of the helper: the sync waiting for it and each later one fail with WalIOFailure."""
    fd = os.open(tmp_path / "a", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        await asyncio.wait_for(syncer.sync(fd, 1), EXIT_TIMEOUT_S)
        os.kill(syncer.pid, signal.SIGSTOP)  # hold it, so the next request is surely in flight
        in_flight = syncer.sync(fd, 1)
        os.kill(syncer.pid, signal.SIGKILL)
        with pytest.raises(WalIOFailure, match=f"the WAL sync process {syncer.pid} is gone"):
            await asyncio.wait_for(in_flight, EXIT_TIMEOUT_S)
        for _ in range(2):
            with pytest.raises(WalIOFailure, match="is gone"):
                await asyncio.wait_for(syncer.sync(fd, 1), EXIT_TIMEOUT_S)
    finally:
        os.close(fd)


async def test_the_helper_ignores_terminal_and_group_stop_signals(syncer: SyncProcess, tmp_path: Path) -> None:
    """SIGINT and SIGTERM (a Ctrl-C, a signal to the process group) leave it serving the drain."""
    fd = os.open(tmp_path / "a", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        await asyncio.wait_for(syncer.sync(fd, 1), EXIT_TIMEOUT_S)  # started: its handlers are set
        os.kill(syncer.pid, signal.SIGINT)
        os.kill(syncer.pid, signal.SIGTERM)
        await asyncio.sleep(0.1)
        await asyncio.wait_for(syncer.sync(fd, 1), EXIT_TIMEOUT_S)
        assert syncer._process.poll() is None
    finally:
        os.close(fd)


async def test_close_stops_the_helper() -> None:
    """close() ends the helper cleanly (exit status 0), and a sync after it fails."""
    syncer = SyncProcess.start()
    await syncer.close()
    assert 0 == syncer._process.returncode
    with pytest.raises(WalIOFailure, match="stopped"):
        await syncer.sync(0, 1)


async def test_the_helper_exits_when_its_engine_goes_away() -> None:
    """The engine's end of the socket closing, as when the engine's process dies, ends the helper."""
    syncer = SyncProcess.start()
    asyncio.get_running_loop().remove_reader(syncer._channel.fileno())
    syncer._channel.close()
    assert 0 == await wait_exited(syncer)
