"""Which live node should own each shard: even, deterministic, and moving few shards on change.

Every node computes the same map from the same inputs (the shard count and the set of live
node ids), so no coordinator is needed; the leases in PostgreSQL then make the map real, one
acquisition at a time. The rule is rendezvous (highest-random-weight) hashing with quotas:

1. Each pair ``(shard, node)`` gets a score: the first 8 bytes of
   ``SHA-256("<shard>/<node_id>")`` (UTF-8), big-endian.
2. With ``N`` nodes and ``S`` shards every node may hold ``⌊S/N⌋`` shards, and ``S mod N``
   of them one more (whichever get there first).
3. The pairs are visited from the highest score down (ties by shard, then node id); a pair
   assigns its shard to its node when the shard is still free and the node below its quota.

Step 3 always places every shard (the quotas add up to ``S``, and a node under ``⌊S/N⌋``
accepts any shard). Each node ends with ``⌊S/N⌋`` or ``⌈S/N⌉`` shards. Because scores do not
depend on the other nodes, a node joining or leaving mostly moves only the shards it takes or
gives up (plain rendezvous hashing moves exactly those; the quotas add a few more, measured in
the tests).

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from tollway.core.errors import InvalidInput
from tollway.core.shard import check_shards

NODES_MAX = 1024


def score(shard_number: int, node_id: str) -> int:
    """The rendezvous score of ``node_id`` for ``shard_number``: higher wins."""
    return int.from_bytes(hashlib.sha256(f"{shard_number}/{node_id}".encode()).digest()[:8], "big")


def assign(shards: int, node_ids: Iterable[str]) -> dict[int, str]:
    """The owner of each shard ``0 … shards-1`` among ``node_ids`` (empty when there is no node)."""
    check_shards(shards)
    nodes = sorted(set(node_ids))
    if len(nodes) > NODES_MAX:
        raise InvalidInput(f"at most {NODES_MAX} nodes, not {len(nodes)}", field="node_ids")
    if not nodes:
        return {}
    floor, extra = divmod(shards, len(nodes))
    pairs = sorted(
        ((score(shard_number, node), shard_number, node) for shard_number in range(shards) for node in nodes),
        key=lambda pair: (-pair[0], pair[1], pair[2]),
    )
    owners: dict[int, str] = {}
    held = dict.fromkeys(nodes, 0)
    for _, shard_number, node in pairs:
        if shard_number in owners:
            continue
        if held[node] < floor or (held[node] == floor and extra > 0):
            if held[node] == floor:
                extra -= 1
            owners[shard_number] = node
            held[node] += 1
            if len(owners) == shards:
                break
    return dict(sorted(owners.items()))


def moved(before: dict[int, str], after: dict[int, str]) -> set[int]:
    """The shards whose owner differs between two maps (a shard missing from one counts)."""
    return {
        shard_number
        for shard_number in before.keys() | after.keys()
        if before.get(shard_number) != after.get(shard_number)
    }
