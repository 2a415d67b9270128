"""The Redis key layout of one shard. Every key carries the shard's hash tag.

All keys of a shard share ``{<shard>}`` so that every script touches one Redis Cluster slot::

    <prefix>:{<shard>}:meta                 hash   applied_seq, owner (the data directory's identity), rebuilt_at_ms
    <prefix>:{<shard>}:ledger               hash   revenue, funding, credit_notes (system accounts)
    <prefix>:{<shard>}:counters             hash   entries per state, events applied
    <prefix>:{<shard>}:acct:<account>       hash   available, held, charged, unsettled
    <prefix>:{<shard>}:entry:<entry id>     hash   a live entry's fields (strings), poison_id when dead-lettered;
                                                   deleted when the entry settles (history is not kept here)
    <prefix>:{<shard>}:resp:<entry id>      string not written any more (stored responses live in the engine);
                                                   an archive deletes one an older version left
    <prefix>:{<shard>}:expiry               zset   held entry id → expires_at_ms
    <prefix>:{<shard>}:finalize             stream charges waiting for the settlement service
    <prefix>:{<shard>}:finalize:delayed     zset   retries waiting for their backoff, by due time
    <prefix>:{<shard>}:finalize:poison      stream dead letters (FINALIZE_FAILED entries)
    <prefix>:{<shard>}:finalize:escalated   hash   entry id → time its escalation alert fired

Everything here is derived from the WAL and can be rebuilt; nothing here is the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

FINALIZE_GROUP: Final = "billing_finalize_group"
DEFAULT_PREFIX: Final = "tw"
DEFAULT_SHARD: Final = "0"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one shard."""

    prefix: str = DEFAULT_PREFIX
    shard: str = DEFAULT_SHARD
    base: str = field(init=False, repr=False, compare=False)  # e.g. ``tw:{0}:``, built once

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", f"{self.prefix}:{{{self.shard}}}:")

    @property
    def meta(self) -> str:
        """Projection bookkeeping: the last applied WAL sequence."""
        return self.base + "meta"

    @property
    def ledger(self) -> str:
        """System ledger accounts."""
        return self.base + "ledger"

    @property
    def counters(self) -> str:
        """Entries per state."""
        return self.base + "counters"

    @property
    def expiry(self) -> str:
        """The expiry index of held entries."""
        return self.base + "expiry"

    @property
    def finalize(self) -> str:
        """The finalize stream."""
        return self.base + "finalize"

    @property
    def delayed(self) -> str:
        """Retries waiting for their backoff."""
        return self.base + "finalize:delayed"

    @property
    def poison(self) -> str:
        """The dead-letter stream."""
        return self.base + "finalize:poison"

    @property
    def escalated(self) -> str:
        """Which dead letters already raised their escalation alert."""
        return self.base + "finalize:escalated"

    def account(self, account_id: str) -> str:
        """An account's balances."""
        return self.base + "acct:" + account_id

    def entry(self, entry_id: str) -> str:
        """An entry's fields."""
        return self.base + "entry:" + entry_id

    def response(self, entry_id: str) -> str:
        """An entry's stored response."""
        return self.base + "resp:" + entry_id

    @property
    def pattern(self) -> str:
        """A SCAN pattern matching every key of this shard (hash tag braces escaped)."""
        return f"{self.prefix}:\\{{{self.shard}\\}}:*"
