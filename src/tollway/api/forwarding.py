"""How a cluster node sends a request to another node: one small interface, aiohttp behind it.

A node forwards a request for a shard it does not serve to the shard's owner, and fans an admin
operation out to every node (:mod:`tollway.api.node_app`, :mod:`tollway.api.node_settlement`).
Both go through a :class:`Forwarder`. :class:`AiohttpForwarder` is the one ``tollway serve``
uses: one reused ``aiohttp.ClientSession`` (a pool of keep-alive connections), as the SDK and the
settlement client, because httpx's pool cost a forwarded request several times the CPU
(docs/cluster.md, "Pairs over HTTP"). Bodies pass as they are: no decompression, no added
``Accept-Encoding``. Tests that run node apps in process give a forwarder over
``httpx.ASGITransport`` instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, Protocol

import aiohttp

CONNECTIONS_MAX: Final = 64
"""Keep-alive connections a node keeps to the other nodes, in all."""


class ForwardFailed(Exception):
    """The other node gave no answer: refused, reset, timed out, or the answer was cut off."""


@dataclass(frozen=True, slots=True)
class Answer:
    """Another node's answer, as it came."""

    status: int
    headers: Mapping[str, str]
    content: bytes


class Forwarder(Protocol):
    """Sends one request to another node."""

    async def send(
        self, method: str, url: str, *, content: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Answer:
        """The answer to ``method url`` within ``timeout_s``; :class:`ForwardFailed` when there is none."""
        ...


class AiohttpForwarder:
    """A :class:`Forwarder` over one reused ``aiohttp.ClientSession``."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    @classmethod
    @asynccontextmanager
    async def open(cls) -> AsyncIterator[AiohttpForwarder]:
        """A forwarder with its own session, closed on exit (made inside the running loop)."""
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONNECTIONS_MAX, limit_per_host=CONNECTIONS_MAX),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        )
        async with session:
            yield cls(session)

    async def send(
        self, method: str, url: str, *, content: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Answer:
        """One request on a pooled connection."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self._session.request(method, url, data=content, headers=headers, timeout=timeout) as answer:
                return Answer(answer.status, answer.headers, await answer.read())
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ForwardFailed(f"{type(exc).__name__}: {exc}") from exc
