"""Shard assignment (CLUSTER.md §4): even, deterministic, few shards moved when a node comes or goes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollway.core.assignment import assign, moved

node_names = st.lists(st.text("abcdefghij-0123456789.:", min_size=1, max_size=12), min_size=1, max_size=20, unique=True)
shard_counts = st.sampled_from([1 << n for n in range(11)])


def test_pinned_vectors() -> None:
    """Every node must compute the same map, so the rule is pinned by vectors (like the shard function)."""
    assert {0: "node-a", 1: "node-b", 2: "node-a", 3: "node-c", 4: "node-c", 5: "node-b", 6: "node-a", 7: "node-c"} == (
        assign(8, ["node-a", "node-b", "node-c"])
    )
    assert {0: "node-a", 1: "node-b", 2: "node-c", 3: "node-e"} == assign(
        4, ["node-e", "node-d", "node-c", "node-b", "node-a"]
    )


def test_no_node_no_owner() -> None:
    """With no live node no shard has an owner."""
    assert {} == assign(64, [])


@given(shard_counts, node_names)
def test_every_shard_gets_one_live_owner_evenly(shards: int, nodes: list[str]) -> None:
    """Each shard has one owner among the nodes; each node holds ⌊S/N⌋ or ⌈S/N⌉; input order does not matter."""
    owners = assign(shards, nodes)
    shuffled = list(reversed(nodes)) + nodes[:1]  # another order, with a duplicate
    assert owners == assign(shards, shuffled)
    assert list(range(shards)) == sorted(owners)
    assert set(owners.values()) <= set(nodes)
    counts = [list(owners.values()).count(node) for node in nodes]
    assert {shards // len(nodes), math.ceil(shards / len(nodes))} >= set(counts)


@pytest.mark.parametrize("shards", [1, 2, 4, 16, 64, 256, 1024])
def test_a_joining_or_leaving_node_moves_few_shards(shards: int) -> None:
    """A node joining moves at most 2x its fair share; a node leaving moves at most 2x its shards + 1."""
    for count in range(1, 13):
        nodes = [f"n{i}.example:{8000 + i}" for i in range(count)]
        before = assign(shards, nodes)
        joined = assign(shards, [*nodes, "joiner"])
        assert len(moved(before, joined)) <= 2 * math.ceil(shards / (count + 1))
        for leaving in nodes:
            after = assign(shards, [node for node in nodes if node != leaving])
            held = sum(1 for owner in before.values() if owner == leaving)
            assert len(moved(before, after)) <= 2 * held + 1, (shards, count, leaving)
            assert {s for s, owner in before.items() if owner == leaving} <= moved(before, after)
