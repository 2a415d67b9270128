"""Money: MicroUSD parsing and formatting, credit units, and the one rounding function.

A MicroUSD amount is a Python ``int`` counting 10⁻⁶ USD. On the wire and in the WAL it is a
canonical decimal string: ``"0"`` or ``[1-9][0-9]*``. Parsing is strict (SPEC §1): non-empty,
at most :data:`MAX_MICRO_USD_LENGTH` characters before normalisation, ASCII digits only
(leading zeros are stripped), and the value fits a signed 64-bit integer because Redis does
the projection's arithmetic. No public amount is negative.

Credit units (CU) are what users see: ``cu = micro × rate / 1_000_000``, rounded by an
explicit :class:`Rounding`. Estimates round up, actual charges round down. There are no
floats anywhere in this module, on purpose.
"""

from __future__ import annotations

import enum
from typing import Final

from tollway.core.errors import InvalidAmount

MAX_MICRO_USD_LENGTH: Final = 30
"""Longest accepted MicroUSD string, before leading zeros are stripped."""

INT64_MAX: Final = 2**63 - 1
"""Largest amount Redis integer arithmetic can hold."""

MAX_REQUEST_COST_MICRO: Final = 1_000_000_000
"""Default ceiling of a single reservation or charge: $1,000."""

DEFAULT_CREDIT_UNITS_PER_USD: Final = 100
MICRO_PER_USD: Final = 1_000_000
PPM: Final = 1_000_000

USD_DECIMALS_MAX: Final = 6
"""Most digits after a dollar amount's decimal point: one micro-USD."""

_DIGITS: Final = frozenset("0123456789")


class Rounding(enum.Enum):
    """Which way a division that does not come out even is rounded."""

    UP = "up"  # towards +infinity: estimates, holds, anything we must not under-reserve
    DOWN = "down"  # towards zero: actual charges, anything we must not over-charge


def div_round(numerator: int, denominator: int, rounding: Rounding) -> int:
    """Divide two non-negative integers, rounding as told. The one rounding function."""
    if denominator <= 0 or numerator < 0:
        raise InvalidAmount(f"div_round needs numerator >= 0 and denominator > 0, got {numerator}/{denominator}")
    if rounding is Rounding.UP:
        return -(-numerator // denominator)
    return numerator // denominator


def parse_micro(value: object, *, field: str = "amount_micro") -> int:
    """Parse a MicroUSD amount from a canonical-ish decimal string or a JSON integer.

    Raises :class:`InvalidAmount` naming ``field`` for anything outside the strict rules.
    """
    if isinstance(value, bool):
        raise InvalidAmount(f"{field} must be a decimal string or integer, not a boolean", field=field)
    if isinstance(value, int):
        return check_micro(value, field=field)
    if not isinstance(value, str):
        raise InvalidAmount(f"{field} must be a decimal string or integer", field=field)
    if not value:
        raise InvalidAmount(f"{field} must not be empty", field=field)
    if len(value) > MAX_MICRO_USD_LENGTH:
        raise InvalidAmount(f"{field} is longer than {MAX_MICRO_USD_LENGTH} characters", field=field)
    # str.isdigit() accepts non-ASCII digits such as '²' or '٣'; only 0-9 are money.
    if not _DIGITS.issuperset(value):
        raise InvalidAmount(f"{field} must contain only the digits 0-9", field=field)
    return check_micro(int(value), field=field)


def check_micro(value: int, *, field: str = "amount_micro") -> int:
    """Return ``value`` if it is a valid public amount: an ``int`` (never a bool or float), 0 ≤ value ≤ INT64_MAX."""
    if type(value) is not int:  # a bool is an int subclass, a float compares like one: neither is money
        raise InvalidAmount(f"{field} must be an integer of MicroUSD, not {type(value).__name__}", field=field)
    if value < 0:
        raise InvalidAmount(f"{field} must not be negative", field=field)
    if value > INT64_MAX:
        raise InvalidAmount(f"{field} does not fit in a signed 64-bit integer", field=field)
    return value


def format_micro(value: int) -> str:
    """The canonical decimal string of a non-negative amount."""
    return str(check_micro(value))


def parse_usd(text: str, *, field: str = "usd") -> int:
    """MicroUSD from a dollar amount written ``5``, ``5.00`` or ``0.000001``: exact, never rounded.

    Digits, at most one decimal point and at most :data:`USD_DECIMALS_MAX` digits after it; no
    sign, ``$``, separators or exponent. Raises :class:`InvalidAmount` naming ``field``.
    """
    whole, point, fraction = text.partition(".")
    if not whole or not _DIGITS.issuperset(whole) or not _DIGITS.issuperset(fraction) or (point and not fraction):
        raise InvalidAmount(
            f"{field} must be dollars like 5 or 5.00 (digits and one decimal point), got {text!r}", field=field
        )
    if len(fraction) > USD_DECIMALS_MAX:
        raise InvalidAmount(f"{field} has more than {USD_DECIMALS_MAX} decimals (1 micro-USD = $0.000001)", field=field)
    if len(whole) > MAX_MICRO_USD_LENGTH:
        raise InvalidAmount(f"{field} is longer than {MAX_MICRO_USD_LENGTH} digits", field=field)
    return check_micro(int(whole) * MICRO_PER_USD + int(fraction.ljust(USD_DECIMALS_MAX, "0")), field=field)


def format_usd(amount_micro: int) -> str:
    """``-$1,234.000500`` from MicroUSD (any sign), with integer arithmetic only."""
    sign = "-" if amount_micro < 0 else ""
    whole, fraction = divmod(abs(amount_micro), MICRO_PER_USD)
    return f"{sign}${whole:,}.{fraction:06d}"


def micro_to_cu(micro: int, credit_units_per_usd: int, rounding: Rounding) -> int:
    """Convert MicroUSD to credit units with an explicit rounding."""
    return div_round(micro * credit_units_per_usd, MICRO_PER_USD, rounding)


def cu_to_micro(cu: int, credit_units_per_usd: int, rounding: Rounding) -> int:
    """Convert credit units to MicroUSD with an explicit rounding."""
    return div_round(cu * MICRO_PER_USD, credit_units_per_usd, rounding)


def usd_to_usdc_micro(micro_usd: int, usd_usdc_rate_ppm: int) -> int:
    """``ceil(micro_usd × rate_ppm / 1e6)``: never under-collect when converting to USDC."""
    return div_round(micro_usd * usd_usdc_rate_ppm, PPM, Rounding.UP)


def usdc_to_usd_micro(micro_usdc: int, usd_usdc_rate_ppm: int) -> int:
    """Convert a USDC payment to MicroUSD credit, rounding down (never mint more than paid)."""
    return div_round(micro_usdc * PPM, usd_usdc_rate_ppm, Rounding.DOWN)
