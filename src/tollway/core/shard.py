"""Shards: which shard an account belongs to, and how a billing entry id says its shard.

A cluster has a fixed number of shards ``S`` (a power of two, 1 ≤ S ≤ :data:`SHARDS_MAX`,
default :data:`DEFAULT_SHARDS`), chosen once at ``tollway cluster init``. Everything about an
account (holds, charges, credits, request ids) lives in one shard: ``shard(account_id, S)``.

**The shard function** (stable: clients in other languages compute it to route directly)::

    h     = SHA-256(UTF-8 bytes of account_id)
    key   = the first 8 bytes of h, read as an unsigned big-endian 64-bit integer
    shard = key mod S          (S a power of two, so this is key & (S - 1))

Test vectors (also in ``docs/cluster.md`` and ``tests/test_shard.py``):

======================  ======================  ======  ========
account_id              key (hex)               S = 64  S = 1024
======================  ======================  ======  ========
``acct_1``              ``47809e466c8e1222``    34      546
``alice``               ``2bd806c97f0e00af``    47      175
``org:42@team-a``       ``9812d78374024134``    52      308
``ünïcode`` (UTF-8)     ``b8be8967e4de3eb2``    50      690
======================  ======================  ======  ========

(``ünïcode`` is not a valid account id; it shows that the bytes hashed are UTF-8.)

Because ``S`` is a power of two and the shard is the key's low bits, doubling ``S`` splits
each shard ``s`` into ``s`` and ``s + S`` and moves no account anywhere else (not built: ``S``
never changes in a running cluster).

**Entry ids carry their shard.** A billing entry id is a ULID (``tollway.core.ids``): 48 bits
of milliseconds (characters 0-9), then 80 random bits (characters 10-25). In a cluster the
first 10 of those 80 bits are the shard number, so the id's characters 10 and 11 are exactly
the shard in two Crockford base-32 digits (``00`` … ``ZZ``, 0 … 1023) and 70 bits stay random.
The id is still a plain ULID: every existing check, sort order and wire format holds, and
commit/release/extend/void route by :func:`entry_id_shard` without a lookup. An id made by a
single-node data directory has random bits there; with ``S = 1`` every id is in shard 0
(:func:`shard_of_entry_id` keeps only ``log2 S`` of the 10 bits), so those ids keep working
where they were made.

Pure: no I/O, no clock, no randomness of its own (a random source is injected).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Final

from tollway.core.errors import InvalidInput, ensure
from tollway.core.ids import UlidGenerator, check_entry_id

SHARDS_MAX: Final = 1024
"""At most 2**10 shards: the shard number fills the 10 high bits of a ULID's random part."""
DEFAULT_SHARDS: Final = 64
SHARD_BITS: Final = 10
RANDOM_BITS: Final = 70
"""Random bits left in a cluster entry id (80 - SHARD_BITS)."""

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DIGIT: Final = {c: i for i, c in enumerate(_CROCKFORD)}
_SHARD_OFFSET: Final = 10  # first character of the random part in a 26-character ULID
_RANDOM_LOW_MASK: Final = (1 << (RANDOM_BITS - 1)) - 1
"""Fresh random parts use 69 of the 70 bits, so ≥ 2**69 increments of the monotonic generator
fit before a carry could reach the shard bits (the generator also checks every id)."""


def check_shards(shards: int) -> int:
    """Return ``shards`` if it is a power of two from 1 to :data:`SHARDS_MAX`."""
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= SHARDS_MAX:
        raise InvalidInput(f"shards must be a power of two from 1 to {SHARDS_MAX}", field="shards")
    if shards & (shards - 1):
        raise InvalidInput(f"shards must be a power of two from 1 to {SHARDS_MAX}, not {shards}", field="shards")
    return shards


def shard_key(account_id: str) -> int:
    """The 64-bit key of ``account_id``: the first 8 bytes of SHA-256 of its UTF-8, big-endian."""
    return int.from_bytes(hashlib.sha256(account_id.encode("utf-8")).digest()[:8], "big")


def shard(account_id: str, shards: int) -> int:
    """The shard (0 … shards-1) that owns ``account_id`` in a cluster of ``shards`` shards."""
    return shard_key(account_id) & (check_shards(shards) - 1)


def encode_shard(shard_number: int) -> str:
    """The two Crockford digits of ``shard_number`` as they appear at characters 10-11 of an id."""
    if not 0 <= shard_number < SHARDS_MAX:
        raise InvalidInput(f"a shard number is 0 … {SHARDS_MAX - 1}", field="shard")
    return _CROCKFORD[shard_number >> 5] + _CROCKFORD[shard_number & 31]


def entry_id_shard(entry_id: str) -> int:
    """The 10-bit shard field of a billing entry id (characters 10-11), 0 … 1023."""
    check_entry_id(entry_id)
    return (_DIGIT[entry_id[_SHARD_OFFSET]] << 5) | _DIGIT[entry_id[_SHARD_OFFSET + 1]]


def shard_of_entry_id(entry_id: str, shards: int) -> int:
    """The shard that owns ``entry_id`` in a cluster of ``shards`` shards (always 0 when shards = 1)."""
    return entry_id_shard(entry_id) & (check_shards(shards) - 1)


def sharded_random80(random80: Callable[[], int], shard_number: int) -> Callable[[], int]:
    """A random source for :class:`UlidGenerator` whose parts start with ``shard_number``'s 10 bits."""
    encode_shard(shard_number)  # validates the range
    high = shard_number << RANDOM_BITS

    def draw() -> int:
        return high | (random80() & _RANDOM_LOW_MASK)

    return draw


class ShardIds:
    """Makes the billing entry ids of one shard: monotonic ULIDs whose shard field is ``shard_number``."""

    __slots__ = ("_digits", "_ids", "shard_number")

    def __init__(self, clock_ms: Callable[[], int], random80: Callable[[], int], shard_number: int) -> None:
        self.shard_number = shard_number
        self._digits = encode_shard(shard_number)
        self._ids = UlidGenerator(clock_ms, sharded_random80(random80, shard_number))

    def new(self) -> str:
        """A new id of this shard, greater than every id this generator made before."""
        entry_id = self._ids.new()
        ensure(entry_id[10:12] == self._digits, "entry id %s left shard %d", entry_id, self.shard_number)
        return entry_id
