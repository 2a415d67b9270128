"""A TCP proxy between tollway and PostgreSQL that cuts connections at the worst moments.

It forwards bytes both ways, on loopback, and on demand cuts a connection (both sides closed
at once, as a lost network would) instead of forwarding:

- **a reply** that matches a pattern (:meth:`CuttingProxy.cut_replies`), e.g. the
  ``CommandComplete`` of an append (``INSERT 0 <n>``, n > 0): the server has committed the
  batch, the client never hears it, so the commit's outcome is unknown to the client;
- **the next requests** (:meth:`CuttingProxy.cut_requests`): the statement never reaches the
  server, so the batch did not land, and the client cannot tell that apart from the case above.

:meth:`CuttingProxy.refuse` closes every connection and refuses new ones until :meth:`accept`
(a server that is gone for a while). Each cut is counted, so a test can check it cut something.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Final

LOOPBACK: Final = "127.0.0.1"
CHUNK_BYTES: Final = 65_536
APPEND_REPLY: Final = re.compile(rb"INSERT 0 [1-9]")
"""The ``CommandComplete`` tag of an ``INSERT`` that stored rows (an append, a snapshot row or a heartbeat)."""


class CuttingProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``; see the module docstring."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cuts = 0
        self._reply_pattern: re.Pattern[bytes] | None = None
        self._reply_every = 1
        self._reply_seen = 0
        self._requests_to_cut = 0
        self._refusing = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        """Listen on a free loopback port; return it."""
        self._server = await asyncio.start_server(self._connected, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def url(self, postgres_url: str) -> str:
        """``postgres_url`` (``postgresql://user@host:port/db``) pointed at this proxy."""
        head, tail = postgres_url.split("@", 1)
        return f"{head}@{LOOPBACK}:{self.port}/{tail.split('/', 1)[1]}"

    def cut_replies(self, pattern: re.Pattern[bytes] | None, *, every: int = 1) -> None:
        """Cut instead of forwarding every ``every``-th reply chunk matching ``pattern`` (None: stop cutting)."""
        self._reply_pattern = pattern
        self._reply_every = every
        self._reply_seen = 0

    def cut_requests(self, count: int) -> None:
        """Cut instead of forwarding the next ``count`` request chunks, whichever connection sends them."""
        self._requests_to_cut = count

    def refuse(self) -> None:
        """Close every connection and refuse new ones."""
        self._refusing = True
        for writer in list(self._writers):
            writer.transport.abort()

    def accept(self) -> None:
        """Accept connections again."""
        self._refusing = False

    async def close(self) -> None:
        """Stop listening and close every connection."""
        self.refuse()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connected(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            client_writer.transport.abort()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        pair = (client_writer, server_writer)
        self._writers.update(pair)
        try:
            await asyncio.gather(
                self._pump(client_reader, server_writer, pair, request=True),
                self._pump(server_reader, client_writer, pair, request=False),
            )
        finally:
            for writer in pair:
                writer.transport.abort()
                self._writers.discard(writer)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        *,
        request: bool,
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while chunk := await reader.read(CHUNK_BYTES):
                if self._cut(chunk, request=request):
                    self.cuts += 1
                    break
                writer.write(chunk)
                await writer.drain()
        for each in pair:  # one side closed or cut: the connection is gone both ways
            each.transport.abort()

    def _cut(self, chunk: bytes, *, request: bool) -> bool:
        if request:
            if self._requests_to_cut > 0:
                self._requests_to_cut -= 1
                return True
            return False
        if self._reply_pattern is None or not self._reply_pattern.search(chunk):
            return False
        self._reply_seen += 1
        return self._reply_seen % self._reply_every == 0
