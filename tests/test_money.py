"""MicroUSD parsing, formatting and credit-unit rounding (SPEC §1)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import amounts
from tollway.core.errors import InvalidAmount
from tollway.core.money import (
    INT64_MAX,
    MAX_MICRO_USD_LENGTH,
    Rounding,
    div_round,
    format_micro,
    format_usd,
    micro_to_cu,
    parse_micro,
    parse_usd,
    usd_to_usdc_micro,
    usdc_to_usd_micro,
)


@given(amounts)
def test_string_round_trip(value: int) -> None:
    """Every valid amount survives format → parse unchanged."""
    assert value == parse_micro(format_micro(value))


@given(amounts)
def test_json_integer_accepted(value: int) -> None:
    """A JSON integer in range parses to itself."""
    assert value == parse_micro(value)


@given(amounts)
def test_canonical_form(value: int) -> None:
    """The formatted string is "0" or has no leading zero."""
    text = format_micro(value)
    assert text == "0" or not text.startswith("0")


@given(st.integers(0, 10**9), st.integers(0, 20))
def test_leading_zeros_are_stripped(value: int, zeros: int) -> None:
    """Leading zeros are accepted and stripped, within the length limit."""
    text = "0" * zeros + str(value)
    assert value == parse_micro(text)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "+1",
        "-1",
        " 1",
        "1 ",
        "1.0",
        "1e3",
        "1E3",
        "0x10",
        "0o7",
        "0b1",
        "1_000",
        "١٢٣",  # Arabic-Indic digits pass str.isdigit() but are not money
        "²",
        "12\n",
        "9" * (MAX_MICRO_USD_LENGTH + 1),
        "0" * (MAX_MICRO_USD_LENGTH + 1) + "1",
        str(INT64_MAX + 1),
        True,
        False,
        1.0,
        None,
        -1,
        INT64_MAX + 1,
        [1],
    ],
)
def test_malformed_amounts_are_rejected(bad: object) -> None:
    """Anything outside the strict rules raises InvalidAmount naming the field."""
    with pytest.raises(InvalidAmount) as caught:
        parse_micro(bad, field="estimated_cost_micro")
    assert "estimated_cost_micro" == caught.value.field


@given(st.text(min_size=1, max_size=MAX_MICRO_USD_LENGTH).filter(lambda s: not set(s) <= set("0123456789")))
def test_any_non_digit_is_rejected(text: str) -> None:
    """A string with any character outside 0-9 never parses."""
    with pytest.raises(InvalidAmount):
        parse_micro(text)


def test_length_limit_counts_before_normalisation() -> None:
    """Thirty characters of leading zeros and digits is the limit, even if the value is small."""
    assert 1 == parse_micro("0" * (MAX_MICRO_USD_LENGTH - 1) + "1")


@given(st.integers(0, 10**15), st.integers(1, 10**6))
def test_cu_rounding_brackets_the_exact_value(micro: int, rate: int) -> None:
    """Estimates round up and charges round down, and they differ by at most one unit."""
    up = micro_to_cu(micro, rate, Rounding.UP)
    down = micro_to_cu(micro, rate, Rounding.DOWN)
    assert down * 1_000_000 <= micro * rate <= up * 1_000_000
    assert up - down in (0, 1)
    assert (up == down) == (micro * rate % 1_000_000 == 0)


def test_cu_examples() -> None:
    """100 CU per USD: 1 CU is 10,000 micro-USD."""
    assert 1 == micro_to_cu(10_000, 100, Rounding.DOWN)
    assert 0 == micro_to_cu(9_999, 100, Rounding.DOWN)
    assert 1 == micro_to_cu(9_999, 100, Rounding.UP)
    assert 1 == micro_to_cu(1, 100, Rounding.UP)


@given(st.integers(0, 10**15), st.integers(1, 10**7))
def test_usdc_conversion_never_under_collects(micro_usd: int, rate_ppm: int) -> None:
    """USD→USDC rounds up; converting back never yields more USD than was converted."""
    usdc = usd_to_usdc_micro(micro_usd, rate_ppm)
    assert usdc * 1_000_000 >= micro_usd * rate_ppm
    assert (usdc - 1) * 1_000_000 < micro_usd * rate_ppm or usdc == 0
    assert usdc_to_usd_micro(usdc, rate_ppm) >= micro_usd or rate_ppm > 1_000_000


def test_div_round_refuses_bad_operands() -> None:
    """Division by zero or of a negative amount is a bug, refused loudly."""
    with pytest.raises(InvalidAmount):
        div_round(1, 0, Rounding.UP)
    with pytest.raises(InvalidAmount):
        div_round(-1, 3, Rounding.DOWN)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5", 5_000_000), ("5.00", 5_000_000), ("0.000001", 1), ("12.5", 12_500_000), ("007.10", 7_100_000)],
)
def test_usd_parses_exactly(text: str, expected: int) -> None:
    """A dollar amount becomes the exact MicroUSD count, whatever its number of decimals up to six."""
    assert expected == parse_usd(text)


@pytest.mark.parametrize("bad", ["", ".5", "5.", "5.0000001", "-5", "+5", "$5", "5,00", "1e3", "5.0.0", " 5", "٣"])
def test_usd_refuses_anything_but_plain_dollars(bad: str) -> None:
    """Signs, symbols, separators, exponents and sub-micro decimals are refused, never rounded."""
    with pytest.raises(InvalidAmount):
        parse_usd(bad)


@given(amounts)
def test_usd_round_trip(value: int) -> None:
    """Every amount printed in dollars parses back to itself."""
    assert value == parse_usd(format_usd(value).removeprefix("$").replace(",", ""))
