"""A :class:`~tollway.api.forwarding.Forwarder` over an httpx client, for node apps run in process.

``tollway serve`` forwards with aiohttp over real sockets; tests that mount node apps on
``httpx.ASGITransport`` forward through one of these instead (the owner's app as the transport),
so the same handlers run without a listening port.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from tollway.api.forwarding import Answer, ForwardFailed


class HttpxForwarder:
    """Sends through ``client`` (for example one over ``httpx.ASGITransport(app)``)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def send(
        self, method: str, url: str, *, content: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Answer:
        """One request; :class:`ForwardFailed` when the transport gives no answer."""
        try:
            answer = await self.client.request(method, url, content=content, headers=headers, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise ForwardFailed(f"{type(exc).__name__}: {exc}") from exc
        return Answer(answer.status_code, answer.headers, answer.content)
