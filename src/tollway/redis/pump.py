"""The projection pump: encoding and applying projection batches in a process of their own.

Under load, encoding the projection's operations (:func:`~tollway.redis.projection.encode_batch`)
and the ``EVALSHA`` call took about 40 % of the event loop's time (a py-spy profile of
``bench/engine.py --redis``): CPU the engine's loop could have spent on commands, while the
machine's other core had room. The pump moves that work into a child process.

The projector still decides everything — what to apply next, gaps, rebuilds, violations,
backing off while Redis is away. It only hands the pump a run of durable events **as their WAL
records** (the framed bytes the engine just wrote, so nothing is encoded twice), and gets back
``apply_batch.lua``'s reply. The pump checks each record's checksum and sequence (the same
:func:`~tollway.wal.codec.scan` recovery uses), encodes the batch exactly as the projector
would, and runs the script on its own connection.

Wire, over a stream socket pair, one request at a time:

- projector → pump: u32 little-endian length, then that many bytes of framed WAL records;
- pump → projector: u32 little-endian length, then msgpack ``["reply", <the script's reply>]``,
  or ``["error", <kind>, <message>]`` where kind is ``connection``, ``timeout``, ``redis``
  (the client's exception classes) or ``records`` (records that do not scan: a bug).

The projector turns error replies back into the client's exception classes, so its handling
of an unreachable Redis is unchanged. If the pump dies or answers out of turn, the projector
stops using it and encodes in its own process again (:class:`PumpGone`); nothing is lost,
the batch is simply applied that way. The pump ignores SIGINT and SIGTERM (the service's last
sync at shutdown may still use it) and exits when its socket closes, which includes the
service's process dying.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import signal
import socket
import sys
import threading
from asyncio.subprocess import Process
from importlib import resources
from typing import Any, Final

import msgspec
import redis
import redis.exceptions

from tollway.core.errors import TollwayError
from tollway.redis.keys import Keys
from tollway.redis.projection import encode_batch
from tollway.wal import codec

LENGTH_BYTES: Final = 4
EXIT_TIMEOUT_S: Final = 10.0
REDIS_SOCKET_TIMEOUT_S: Final = 5.0
SCRIPT: Final = "apply_batch.lua"
QUEUED_MAX: Final = 4

_ENCODE: Final = msgspec.msgpack.Encoder()
_DECODE: Final = msgspec.msgpack.Decoder()


class PumpGone(TollwayError):
    """The pump cannot be used any more (it exited, or a request was cut short)."""


class ProjectionPump:
    """The projector's end: start the pump, send it batches, stop it.

    Requests may overlap (:meth:`submit` does not wait): the pump encodes the next batch while
    Redis runs the previous one, and answers in order.
    """

    def __init__(self, process: Process, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._process = process
        self._reader = reader
        self._writer = writer
        self._waiting: collections.deque[asyncio.Future[list[Any]]] = collections.deque()
        self._answers: asyncio.Task[None] | None = None
        self._broken: str | None = None
        self.batches = 0  # requests sent

    @classmethod
    async def start(cls, redis_url: str, keys: Keys, owner: str) -> ProjectionPump:
        """Start a pump projecting into ``redis_url`` with ``keys`` for the data directory ``owner``."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                __name__,
                str(theirs.fileno()),
                redis_url,
                keys.prefix,
                keys.shard,
                owner,
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        return cls(process, reader, writer)

    @property
    def pid(self) -> int:
        """The pump's process id."""
        return self._process.pid

    @property
    def failure(self) -> str | None:
        """Why the pump cannot be used (None while it can)."""
        return self._broken

    @property
    def usable(self) -> bool:
        """False once the pump failed: the projector encodes in its own process from then on."""
        return self._broken is None

    def submit(self, records: bytes) -> asyncio.Future[list[Any]]:
        """Send framed WAL records (consecutive sequences); the future gets ``apply_batch.lua``'s reply.

        It fails with the Redis client's ConnectionError, TimeoutError or ResponseError as the
        script call would, and with :class:`PumpGone` when the pump cannot answer.
        """
        answer: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if self._broken is not None:
            answer.set_exception(PumpGone(self._broken))
            return answer
        try:
            # one write, so one send and one wake-up of the pump (two cost twice as much)
            self._writer.write(len(records).to_bytes(LENGTH_BYTES, "little") + records)
        except (OSError, RuntimeError) as exc:
            self._fail(f"the projection pump {self.pid} is gone: {exc!r}")
            answer.set_exception(PumpGone(self._broken or ""))
            return answer
        self._waiting.append(answer)
        self.batches += 1
        if self._answers is None:
            self._answers = asyncio.create_task(self._read_answers(), name="projection-pump-answers")
        return answer

    async def apply(self, records: bytes) -> list[Any]:
        """:meth:`submit` and wait for the reply."""
        return await self.submit(records)

    async def _read_answers(self) -> None:
        """Hand each answer to the oldest waiting request, in order."""
        try:
            while True:
                size = int.from_bytes(await self._reader.readexactly(LENGTH_BYTES), "little")
                answer = _DECODE.decode(await self._reader.readexactly(size))
                waiter = self._waiting.popleft()
                if waiter.done():  # its caller was cancelled; the answer still comes in order
                    continue
                if answer[0] == "reply":
                    waiter.set_result(answer[1])
                else:
                    waiter.set_exception(self._exception_for(answer[1], answer[2]))
        except (OSError, asyncio.IncompleteReadError, msgspec.DecodeError, IndexError) as exc:
            self._fail(f"the projection pump {self.pid} is gone: {exc!r}")

    def _exception_for(self, kind: str, message: str) -> Exception:
        """The exception an error answer stands for; records that do not scan retire the pump."""
        if kind == "connection":
            return redis.exceptions.ConnectionError(message)
        if kind == "timeout":
            return redis.exceptions.TimeoutError(message)
        if kind == "redis":
            return redis.exceptions.ResponseError(message)
        self._fail(f"the projection pump refused a batch: {message}")
        return PumpGone(self._broken or message)

    def _fail(self, reason: str) -> None:
        self._broken = self._broken or reason
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(PumpGone(self._broken))

    async def close(self) -> None:
        """Stop the pump and wait for it to exit."""
        self._fail("the projection pump was stopped")
        self._writer.close()  # end-of-file: the pump exits
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        if self._answers is not None:
            self._answers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._answers
        try:
            async with asyncio.timeout(EXIT_TIMEOUT_S):
                await self._process.wait()
        except TimeoutError:
            self._process.kill()
            await self._process.wait()


# -- the pump process ----------------------------------------------------------------------


def _read_exactly(channel: socket.socket, size: int) -> bytes | None:
    """``size`` bytes, or None at end-of-file."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = channel.recv(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def events_of(records: bytes) -> list[Any]:
    """The events of consecutive framed records; ValueError if any does not scan."""
    events: list[Any] = []
    end = codec.decode_run(records, 0, None, events, limit=len(records))  # a record has 9 bytes at least: no limit
    if end.stop is not None:
        raise ValueError(f"record at byte {end.offset}: {end.stop.value} {end.detail}")
    return events


def serve(channel: socket.socket, redis_url: str, keys: Keys, owner: str) -> None:
    """Answer requests, in order, until the projector closes its end.

    This thread reads and encodes; another runs the script and answers, so the next batch is
    encoded while Redis runs the previous one.
    """
    client = redis.Redis.from_url(redis_url, socket_timeout=REDIS_SOCKET_TIMEOUT_S)
    script = client.register_script(resources.files("tollway.redis").joinpath("lua", SCRIPT).read_text())
    work: queue.Queue[list[Any] | None] = queue.Queue(maxsize=QUEUED_MAX)
    answering = threading.Thread(target=_answer_all, args=(channel, script, work), name="pump-answers", daemon=True)
    answering.start()
    try:
        while True:
            header = _read_exactly(channel, LENGTH_BYTES)
            if header is None:
                return
            records = _read_exactly(channel, int.from_bytes(header, "little"))
            if records is None:
                return
            work.put(prepare(keys, records, owner))
    finally:
        work.put(None)
        answering.join()


def prepare(keys: Keys, records: bytes, owner: str) -> list[Any]:
    """``["batch", keys, argv]`` to run, or the error answer for records that do not scan."""
    try:
        events = events_of(records)
    except ValueError as exc:
        return ["error", "records", str(exc)]
    batch = encode_batch(keys, events, owner)
    return ["batch", batch.keys, batch.argv]


def run(script: Any, item: list[Any]) -> list[Any]:
    """The answer to one prepared request."""
    if item[0] != "batch":
        return item
    try:
        return ["reply", script(keys=item[1], args=item[2])]
    except redis.exceptions.ConnectionError as exc:
        return ["error", "connection", str(exc)]
    except redis.exceptions.TimeoutError as exc:
        return ["error", "timeout", str(exc)]
    except redis.exceptions.RedisError as exc:
        return ["error", "redis", str(exc)]


def _answer_all(channel: socket.socket, script: Any, work: queue.Queue[list[Any] | None]) -> None:
    listening = True
    while (item := work.get()) is not None:
        if not listening:  # keep taking work until told to stop, so the reader never blocks
            continue
        body = _ENCODE.encode(run(script, item))
        try:
            channel.sendall(len(body).to_bytes(LENGTH_BYTES, "little") + body)
        except OSError:  # the projector is gone: nobody is waiting for the answer
            listening = False


def main(argv: list[str]) -> int:
    """Entry point: ``python -m tollway.redis.pump <socket fd> <redis url> <prefix> <shard> <owner>``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with socket.socket(fileno=int(argv[1])) as channel:
        serve(channel, argv[2], Keys(argv[3], argv[4]), argv[5])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
