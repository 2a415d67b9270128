"""Fanning an admin operation out to every node of the cluster, and merging the answers per shard.

Some admin operations act on what runs on a shard's owner (its finalize worker, its
conservation guard), so no single node can answer them for the whole cluster. The node that
receives one answers for the shards it serves (its ``local`` part) and sends the same request
(method, path, query, ``Authorization``) to every other live node, marked as forwarded so it is
answered there for that node's shards only and never fanned out again. Each answer carries its
parts under ``shards`` (the shard number as text); :func:`fan_out` merges them, the first
answer for a shard winning, and says which node answered for each shard, which nodes did not
answer, and which of the shards asked about nobody served.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from fastapi import Request

from tollway.api.forwarding import ForwardFailed

if TYPE_CHECKING:
    from tollway.api.node_app import NodeContext

FORWARDED_HEADER: Final = "x-tollway-forwarded-by"  # the node API's: answer here, never pass it on
FAN_OUT_TIMEOUT_S: Final = 30.0
"""How long a node waits for each other node's part of a fanned-out operation."""

Parts = dict[str, dict[str, object]]
"""A fanned-out operation's answer per shard (the shard number as text)."""


def is_part(request: Request) -> bool:
    """Whether ``request`` is another node's fan-out (answer for this node's shards only)."""
    return FORWARDED_HEADER in request.headers


async def fan_out(
    request: Request, ctx: NodeContext, local: Parts, shards: Iterable[int] | None = None
) -> tuple[Parts, dict[str, object]]:
    """The node's own part (``local``) merged with every other live node's answer to the same request.

    Returns the parts by shard, and what the merge found: which node answered for each shard,
    the nodes that did not answer, and the shards (of ``shards``, every shard by default) no
    node answered for.
    """
    node = ctx.node
    if is_part(request):
        return local, {"node_id": node.node_id}
    peers = {node_id: url for node_id, url in node.urls.items() if node_id != node.node_id}
    headers = {FORWARDED_HEADER: node.node_id, "authorization": request.headers.get("authorization", "")}
    answers = await asyncio.gather(*(_ask(ctx, request, url, headers) for url in peers.values()))
    merged: Parts = dict(local)
    owners = dict.fromkeys(local, node.node_id)
    unreachable = []
    for node_id, theirs in zip(peers, answers, strict=True):
        if theirs is None:
            unreachable.append(node_id)
            continue
        for number, part in theirs.items():
            if number.isdecimal() and number not in merged:
                merged[number], owners[number] = part, node_id
    asked = range(node.info.shards) if shards is None else shards
    about: dict[str, object] = {
        "owners": owners,
        "unreachable_nodes": sorted(unreachable),
        "unserved_shards": [n for n in asked if str(n) not in merged],
    }
    return dict(sorted(merged.items(), key=lambda item: int(item[0]))), about


async def _ask(ctx: NodeContext, request: Request, url: str, headers: dict[str, str]) -> Parts | None:
    """Another node's part of the operation (its ``shards``), or None when it did not answer it."""
    query = request.url.query
    try:
        answer = await ctx.forwarder.send(
            request.method,
            url.rstrip("/") + request.url.path + (f"?{query}" if query else ""),
            content=b"",
            headers=headers,
            timeout_s=FAN_OUT_TIMEOUT_S,
        )
        body = json.loads(answer.content) if answer.status == 200 else None
    except (ForwardFailed, ValueError):
        return None
    shards = body.get("shards") if isinstance(body, dict) else None
    if not isinstance(shards, dict):
        return None
    return {str(number): part for number, part in shards.items() if isinstance(part, dict)}
