"""ULIDs from an injected clock and randomness, and the id rules (SPEC §1)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import account_ids, request_ids
from tollway.core.errors import InvalidInput
from tollway.core.ids import (
    UNTRACED,
    UlidGenerator,
    check_account_id,
    check_correlation_id,
    check_request_id,
    encode_ulid,
    is_ulid,
)
from tollway.testing import FakeClock


def test_ulid_layout() -> None:
    """Time and randomness land in the documented 48/80-bit layout, Crockford-encoded."""
    assert "00000000000000000000000000" == encode_ulid(0)
    assert "7ZZZZZZZZZZZZZZZZZZZZZZZZZ" == encode_ulid((1 << 128) - 1)
    assert "01ARZ3NDEKTSV4RRFFQ69G5FAV" == encode_ulid(0x01563E3AB5D3D6764C61EFB99302BD5B)


@given(st.lists(st.integers(0, 3), min_size=1, max_size=200), st.integers(0, (1 << 80) - 1))
def test_monotonic_even_when_clock_stalls_or_steps_back(steps: list[int], seed: int) -> None:
    """Ids strictly increase whatever the clock does."""
    clock = FakeClock()
    times = iter([clock.now + sum(steps[: i + 1]) - (i % 3) * 2 for i in range(len(steps))])
    gen = UlidGenerator(lambda: next(times), lambda: seed)
    ids = [gen.new() for _ in steps]
    assert sorted(ids) == ids
    assert len(set(ids)) == len(ids)
    assert all(is_ulid(i) for i in ids)


def test_random_part_overflow_borrows_next_millisecond() -> None:
    """2**80 ids in one millisecond still sort after each other."""
    gen = UlidGenerator(lambda: 1000, lambda: (1 << 80) - 1)
    first, second = gen.new(), gen.new()
    assert first < second


def test_same_clock_and_randomness_same_ids() -> None:
    """The generator is deterministic given its inputs."""
    a, b = UlidGenerator(FakeClock(), lambda: 42), UlidGenerator(FakeClock(), lambda: 42)
    assert [a.new() for _ in range(5)] == [b.new() for _ in range(5)]


@given(account_ids)
def test_valid_account_ids(value: str) -> None:
    """1-128 characters of [A-Za-z0-9._:@-] pass."""
    assert value == check_account_id(value)


@pytest.mark.parametrize("bad", ["", "a b", "a/b", "é", "x" * 129, "a\n"])
def test_invalid_account_ids(bad: str) -> None:
    """Anything else is refused, naming the field."""
    with pytest.raises(InvalidInput) as caught:
        check_account_id(bad)
    assert "account_id" == caught.value.field


@given(request_ids)
def test_valid_request_ids(value: str) -> None:
    """Printable ASCII without whitespace, 1-128 characters, passes."""
    assert value == check_request_id(value)


@pytest.mark.parametrize("bad", ["", "a b", "tab\there", "x" * 129, "ünï"])
def test_invalid_request_ids(bad: str) -> None:
    """Whitespace, non-ASCII and overlong keys are refused."""
    with pytest.raises(InvalidInput):
        check_request_id(bad)


def test_correlation_defaults_to_untraced() -> None:
    """A missing correlation id is the constant "untraced", never empty or random."""
    assert UNTRACED == check_correlation_id(None) == check_correlation_id("")
    assert "trace-1" == check_correlation_id("trace-1")
    with pytest.raises(InvalidInput):
        check_correlation_id("x" * 129)


@given(st.integers(0, (1 << 48) - 1), st.integers(0, (1 << 80) - 1))
def test_fast_encoding_matches_the_reference(ms: int, random80: int) -> None:
    """The generator's table-driven encoding equals the plain 128-bit base-32 encoding."""
    assert encode_ulid((ms << 80) | random80) == UlidGenerator(lambda: ms, lambda: random80).new()
