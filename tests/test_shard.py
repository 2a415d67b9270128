"""Shards (CLUSTER.md §1): the documented shard function and entry ids that carry their shard."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import account_ids, timestamps, ulids
from tollway.core.errors import InvalidInput, InvariantViolation
from tollway.core.ids import is_ulid
from tollway.core.shard import (
    SHARDS_MAX,
    ShardIds,
    check_shards,
    encode_shard,
    entry_id_shard,
    shard,
    shard_key,
    shard_of_entry_id,
)
from tollway.testing import FakeClock

# (account_id, first 8 bytes of SHA-256 as hex, shard of 64, shard of 1024): the vectors of
# the module docstring and docs/cluster.md. The keys match `printf '%s' ID | sha256sum`.
VECTORS = [
    ("acct_1", "47809e466c8e1222", 34, 546),
    ("alice", "2bd806c97f0e00af", 47, 175),
    ("org:42@team-a", "9812d78374024134", 52, 308),
    ("ünïcode", "b8be8967e4de3eb2", 50, 690),
]

shard_counts = st.sampled_from([1 << n for n in range(11)])


@pytest.mark.parametrize(("account_id", "key_hex", "of_64", "of_1024"), VECTORS)
def test_documented_vectors(account_id: str, key_hex: str, of_64: int, of_1024: int) -> None:
    """The shard function gives the documented key and shards for the test vectors."""
    assert (key_hex, of_64, of_1024, 0) == (
        f"{shard_key(account_id):016x}",
        shard(account_id, 64),
        shard(account_id, 1024),
        shard(account_id, 1),
    )


@pytest.mark.parametrize("bad", [0, 3, 6, 100, 2048, -4, True])
def test_shard_counts_are_powers_of_two_up_to_the_limit(bad: int) -> None:
    """A shard count that is not a power of two in 1 … 1024 is refused."""
    with pytest.raises(InvalidInput):
        check_shards(bad)


@given(account_ids, shard_counts)
def test_doubling_the_shards_splits_each_shard_in_two(account_id: str, shards: int) -> None:
    """With twice the shards an account stays in s or moves to s + S, nowhere else."""
    before = shard(account_id, shards)
    assert before < shards
    if shards < SHARDS_MAX:
        assert shard(account_id, 2 * shards) in {before, before + shards}


def test_accounts_spread_evenly() -> None:
    """10,000 account ids land within ±25 % of the mean on each of 64 shards."""
    counts = [0] * 64
    for n in range(10_000):
        counts[shard(f"acct_{n}", 64)] += 1
    assert all(156 * 0.75 <= count <= 156 * 1.25 for count in counts), counts


@pytest.mark.parametrize(("number", "digits"), [(0, "00"), (1, "01"), (31, "0Z"), (32, "10"), (1023, "ZZ")])
def test_shard_digits(number: int, digits: str) -> None:
    """A shard number is two Crockford digits, and an id's characters 10-11 read back as it."""
    assert digits == encode_shard(number)
    assert number == entry_id_shard("01ARZ3NDEK" + digits + "V4RRFFQ69G5FAV")


def test_shard_numbers_out_of_range_are_refused() -> None:
    """encode_shard refuses -1 and 1024."""
    for bad in (-1, SHARDS_MAX):
        with pytest.raises(InvalidInput):
            encode_shard(bad)


@given(
    st.integers(0, SHARDS_MAX - 1), st.lists(st.integers(0, 3), min_size=1, max_size=50), st.integers(0, (1 << 80) - 1)
)
def test_shard_ids_carry_their_shard_and_stay_monotonic(number: int, steps: list[int], seed: int) -> None:
    """Every id of a shard's generator is a ULID with that shard, strictly increasing, under any clock."""
    clock = FakeClock(1_700_000_000_000)
    randoms = itertools.count(seed)
    ids = ShardIds(clock, lambda: next(randoms) % (1 << 80), number)
    made = []
    for step in steps:
        clock.advance(step)
        made.append(ids.new())
    assert all(is_ulid(entry_id) for entry_id in made)
    assert made == sorted(set(made))
    assert {number} == {entry_id_shard(entry_id) for entry_id in made}
    assert {number & 63} == {shard_of_entry_id(entry_id, 64) for entry_id in made}


@given(ulids)
def test_single_node_ids_are_all_in_shard_zero_of_one(entry_id: str) -> None:
    """Any existing ULID (a single-node entry id) belongs to shard 0 of a one-shard cluster."""
    assert 0 == shard_of_entry_id(entry_id, 1)


@given(timestamps)
def test_a_carry_into_the_shard_bits_stops_the_generator(ms: int) -> None:
    """If the random part ever carried into the shard field, the generator refuses the id."""
    ids = ShardIds(lambda: ms, lambda: (1 << 80) - 1, 5)
    ids._ids._advance(ms, (5 << 70) | ((1 << 70) - 1))  # the last random part of shard 5 in this ms
    with pytest.raises(InvariantViolation):
        ids.new()


def test_entry_id_shard_checks_the_id() -> None:
    """entry_id_shard refuses something that is not a ULID."""
    with pytest.raises(InvalidInput):
        entry_id_shard("not-an-id")
