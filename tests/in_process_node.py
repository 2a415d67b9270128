"""A cluster node's API mounted in process, and a forwarder for it over an httpx client.

``tollway serve`` forwards with aiohttp over real sockets; tests that mount node apps on
``httpx.ASGITransport`` (:func:`node_client`) forward through an :class:`HttpxForwarder`
instead (the owner's app as the transport), so the same handlers run without a listening port.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from tollway.api.auth import Authenticator
from tollway.api.forwarding import Answer, ForwardFailed
from tollway.api.node_app import create_node_app
from tollway.cluster.node import Node
from tollway.core.pricing import PriceTable


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


def node_client(
    node: Node, *, authenticator: Authenticator, pricing: PriceTable, forwarder: httpx.AsyncClient
) -> httpx.AsyncClient:
    """A client of ``node``'s API run in process; what it forwards goes through ``forwarder``."""
    app = create_node_app(node, authenticator=authenticator, pricing=pricing, forwarder=HttpxForwarder(forwarder))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{node.node_id}")
