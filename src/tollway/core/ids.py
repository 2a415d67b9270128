"""Identifiers: monotonic ULIDs and the rules for account, request and correlation ids.

A ULID is 48 bits of milliseconds and 80 bits of randomness, written as 26 Crockford base-32
characters. The generator is monotonic: within one millisecond (or when the clock steps back)
it increments the random part instead of drawing a new one, so ids made by one engine sort in
the order they were made. The clock and the randomness are injected; this module reads
neither, which keeps the core deterministic under test.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Final

from tollway.core.errors import InvalidInput

UNTRACED: Final = "untraced"
"""The correlation id of a request that carried none: constant, never empty, never random."""

MAX_ID_LENGTH: Final = 128

_RANDOM_BITS: Final = 80
_RANDOM_MAX: Final = (1 << _RANDOM_BITS) - 1
_TIME_MAX: Final = (1 << 48) - 1

# base64's RFC 4648 alphabet mapped onto Crockford's, so the C encoder does the work.
_TO_CROCKFORD: Final = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", b"0123456789ABCDEFGHJKMNPQRSTVWXYZ")

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ULID_RE: Final = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
_ACCOUNT_RE: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_REQUEST_RE: Final = re.compile(r"[\x21-\x7e]{1,128}")


def encode_ulid(value: int) -> str:
    """Encode a 128-bit integer as 26 Crockford base-32 characters."""
    # 20 bytes = 160 bits = 32 base-32 characters; the last 26 hold the low 130 bits.
    return base64.b32encode(value.to_bytes(20, "big"))[6:].translate(_TO_CROCKFORD).decode("ascii")


def _encode_time(ms: int) -> str:
    """The 10 characters of a ULID's 48-bit time part."""
    return encode_ulid(ms << _RANDOM_BITS)[:10]


_PAIRS: Final = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)
"""Every 10-bit value as its two Crockford digits (base64's encoder is pure Python in 3.11)."""


def _encode_random(value: int) -> str:
    """The 16 characters of a ULID's 80-bit random part (80 bits = exactly 16 base-32 digits)."""
    pairs = _PAIRS
    return (
        pairs[(value >> 70) & 1023]
        + pairs[(value >> 60) & 1023]
        + pairs[(value >> 50) & 1023]
        + pairs[(value >> 40) & 1023]
        + pairs[(value >> 30) & 1023]
        + pairs[(value >> 20) & 1023]
        + pairs[(value >> 10) & 1023]
        + pairs[value & 1023]
    )


class UlidGenerator:
    """Makes monotonic ULIDs from an injected millisecond clock and 80-bit randomness.

    The time part is encoded once per millisecond and reused: an id costs one encoding of its
    random part, which matters at tens of thousands of ids a second.
    """

    __slots__ = ("_clock_ms", "_last_ms", "_last_random", "_prefix", "_random80")

    def __init__(self, clock_ms: Callable[[], int], random80: Callable[[], int]) -> None:
        self._clock_ms = clock_ms
        self._random80 = random80
        self._last_ms = -1
        self._last_random = 0
        self._prefix = ""

    def new(self) -> str:
        """Return a ULID greater than every ULID this generator returned before."""
        now_ms = self._clock_ms()
        if now_ms > self._last_ms:
            self._advance(now_ms, self._random80() & _RANDOM_MAX)
        elif self._last_random < _RANDOM_MAX:
            self._last_random += 1
        else:  # 2**80 ids in one millisecond: borrow the next millisecond.
            self._advance(self._last_ms + 1, 0)
        return self._prefix + _encode_random(self._last_random)

    def _advance(self, ms: int, random: int) -> None:
        if ms > _TIME_MAX:
            raise InvalidInput("clock is beyond the ULID epoch range")
        self._last_ms, self._last_random, self._prefix = ms, random, _encode_time(ms)


def ulid_floor(ms: int) -> str:
    """The smallest ULID of millisecond ``ms``: every id made earlier sorts below it."""
    return _encode_time(ms) + "0" * 16


def is_ulid(value: str) -> bool:
    """Whether ``value`` is a well-formed ULID string."""
    return _ULID_RE.fullmatch(value) is not None


def check_entry_id(value: str, *, field: str = "billing_entry_id") -> str:
    """Return ``value`` if it is a well-formed billing entry id (a ULID)."""
    if not isinstance(value, str) or not is_ulid(value):
        raise InvalidInput(f"{field} must be a 26-character ULID", field=field)
    return value


def check_account_id(value: str, *, field: str = "account_id") -> str:
    """Return ``value`` if it is 1-128 characters of ``[A-Za-z0-9._:@-]``."""
    if not isinstance(value, str) or _ACCOUNT_RE.fullmatch(value) is None:
        raise InvalidInput(f"{field} must be 1-128 characters of [A-Za-z0-9._:@-]", field=field)
    return value


def check_request_id(value: str, *, field: str = "request_id") -> str:
    """Return ``value`` if it is 1-128 printable ASCII characters without whitespace."""
    if not isinstance(value, str) or _REQUEST_RE.fullmatch(value) is None:
        raise InvalidInput(f"{field} must be 1-128 printable ASCII characters without whitespace", field=field)
    return value


def check_correlation_id(value: str | None) -> str:
    """Return the correlation id to record: ``value``, or :data:`UNTRACED` when absent."""
    if value is None or value == "":
        return UNTRACED
    if not isinstance(value, str) or len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise InvalidInput("correlation_id must be at most 128 printable characters", field="correlation_id")
    return value
