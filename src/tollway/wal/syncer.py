"""``fdatasync`` in a helper process, so a sync never waits for this process's GIL.

A sync done by a thread of the engine's process needs the GIL to start, again after each
system call, and to post its result. While the event loop is busy, each of those waits can last
up to the interpreter's switch interval (5 ms). Under load the round trip of a batch was then
2.4-3.5 ms for an ``fdatasync`` of 0.1-0.2 ms, and the event loop sat idle waiting for it
(``bench/engine.py``: ``batch_sync_ms_avg``, ``loop_busy``).

:class:`SyncProcess` avoids the GIL altogether. The engine writes each batch itself, on its event
loop (``os.write`` into the page cache; :meth:`~tollway.wal.log.WalWriter.append`), then asks the
helper (:mod:`tollway.wal.sync_helper`, a separate Python process) to ``fdatasync`` the segment
and waits for the answer on a socket the event loop watches. ``fdatasync`` makes durable the
file, not one descriptor, so the helper's copy of the descriptor covers the engine's writes; and
Linux reports a write-back error on every descriptor that was open before it happened, so the
helper sees those errors. At most one sync is in flight.

Failures are the engine's WAL I/O failures (:class:`~tollway.core.errors.WalIOFailure`, then
fail-stop): an ``fdatasync`` error reported by the helper, and the helper's death (end-of-file
on the socket) with a sync in flight or requested afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Final

from tollway.core.errors import WalIOFailure
from tollway.wal import sync_helper

HELPER: Final = Path(sync_helper.__file__)
EXIT_TIMEOUT_S: Final = 10.0
REPLY_BYTES_MAX: Final = 1024


class SyncProcess:
    """The helper process and the event loop's end of its socket. Create it with :meth:`start`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, channel: socket.socket, process: subprocess.Popen[bytes]):
        self._loop = loop
        self._channel = channel
        self._process = process
        self._holds: int | None = None  # the generation of the descriptor the helper holds
        self._waiter: asyncio.Future[None] | None = None
        self._gone: WalIOFailure | None = None
        channel.setblocking(False)
        loop.add_reader(channel.fileno(), self._on_reply)

    @classmethod
    def start(cls) -> SyncProcess:
        """Start the helper (on the running event loop)."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(  # noqa: S603 - this interpreter and a file of this package
                [sys.executable, "-I", "-S", str(HELPER), str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(loop, ours, process)

    @property
    def pid(self) -> int:
        """The helper's process id."""
        return self._process.pid

    def sync(self, fd: int, generation: int) -> asyncio.Future[None]:
        """``fdatasync(fd)`` in the helper; ``generation`` changes whenever ``fd`` names another file.

        The future fails with :class:`WalIOFailure` when the sync failed or the helper is gone.
        """
        if self._waiter is not None:
            raise RuntimeError("a WAL sync is already in flight")
        waiter = self._loop.create_future()
        if self._gone is not None:
            waiter.set_exception(self._gone)
            return waiter
        try:
            if self._holds != generation:
                socket.send_fds(self._channel, [sync_helper.SYNC], [fd])
                self._holds = generation
            else:
                self._channel.send(sync_helper.SYNC)
        except OSError as exc:
            waiter.set_exception(self._lost(f"could not reach it: {exc}"))
            return waiter
        self._waiter = waiter
        return waiter

    def _on_reply(self) -> None:
        failure: WalIOFailure | None = None
        try:
            reply = self._channel.recv(REPLY_BYTES_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            reply, failure = b"", self._lost(f"its socket failed: {exc}")
        if not reply:
            failure = failure or self._lost(f"it exited (status {self._process.poll()})")
        elif reply != sync_helper.OK:
            failure = WalIOFailure(f"WAL fdatasync failed: {reply[1:].decode(errors='replace')}")
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if failure is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(failure)

    def _lost(self, detail: str) -> WalIOFailure:
        """Remember that the helper is gone (every later sync fails at once)."""
        if self._gone is None:
            self._gone = WalIOFailure(f"the WAL sync process {self._process.pid} is gone: {detail}")
            self._loop.remove_reader(self._channel.fileno())
        return self._gone

    async def close(self) -> None:
        """Let a sync in flight finish, then stop the helper and wait for it to exit."""
        if self._waiter is not None:
            with contextlib.suppress(WalIOFailure):
                await asyncio.shield(self._waiter)
        if self._gone is None:
            self._loop.remove_reader(self._channel.fileno())
            self._gone = WalIOFailure("the WAL sync process was stopped")
        self._channel.close()  # end-of-file: the helper exits
        try:
            await asyncio.to_thread(self._process.wait, EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            await asyncio.to_thread(self._process.wait)
