"""The finalize queue on Redis Streams: read, reclaim, finish, retry later, promote, dead letters.

At-least-once delivery with consumer group ``billing_finalize_group``:

- the projector adds a message when a charge lands in ``FINALIZE_PENDING`` (and on rebuild);
- a worker reads new messages (``XREADGROUP``); a message stays in the group's pending list
  until the worker finishes it, so a worker that dies holding one loses nothing: another
  reclaims it with ``XAUTOCLAIM`` once it has been idle ``claim_idle_ms``;
- finished = the outcome is durable in the WAL, then ``finalize_done.lua`` acknowledges and
  deletes the message (nothing unacknowledged is ever trimmed);
- a transient failure moves the message to the delayed set with its next attempt number
  (``finalize_retry.lua``), and ``finalize_promote.lua`` puts it back in the stream when due;
- dead letters are written by the projector when ``billing_finalize_fail`` is applied.

This module only moves messages; deciding what to do with one is the worker's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis

from tollway.core.errors import InvalidInput
from tollway.redis.errors import at_boundary
from tollway.redis.keys import FINALIZE_GROUP, Keys
from tollway.redis.projector import ensure_group, load_script

READ_COUNT_MAX: Final = 64
PROMOTE_BATCH_MAX: Final = 500
POISON_PAGE_MAX: Final = 100
STREAM_ID_PART_MAX: Final = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Message:
    """One finalize message, as read from the stream."""

    message_id: str
    billing_entry_id: str
    account_id: str
    actual_cost_micro: int
    correlation_id: str
    attempt: int
    reason: str
    created_at: str

    def retry(self, reason: str) -> dict[str, str]:
        """The fields of the next attempt of this message."""
        return {
            "billing_entry_id": self.billing_entry_id,
            "account_id": self.account_id,
            "actual_cost_micro": str(self.actual_cost_micro),
            "correlation_id": self.correlation_id,
            "attempt": str(self.attempt + 1),
            "reason": reason,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message of the poison stream."""

    message_id: str
    fields: dict[str, str]

    @property
    def billing_entry_id(self) -> str:
        """The entry this dead letter is about."""
        return self.fields.get("billing_entry_id", "")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(raw: object) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def parse_message(message_id: object, raw: object) -> Message | None:
    """A stream message as a :class:`Message`, or None when its fields are unusable."""
    fields = _fields(raw)
    try:
        return Message(
            _text(message_id),
            fields["billing_entry_id"],
            fields["account_id"],
            int(fields["actual_cost_micro"]),
            fields.get("correlation_id", ""),
            int(fields.get("attempt", "1")),
            fields.get("reason", ""),
            fields.get("created_at", ""),
        )
    except (KeyError, ValueError):
        return None


class FinalizeQueue:
    """The finalize stream, its delayed retries and its dead letters, for one shard."""

    def __init__(self, client: aioredis.Redis, keys: Keys, consumer: str, *, owner: str | None = None) -> None:
        self.redis = client
        self.keys = keys
        self.consumer = consumer
        self.owner = owner  # the data directory whose charges these are (None: not checked)
        self._done = client.register_script(load_script("finalize_done.lua"))
        self._retry = client.register_script(load_script("finalize_retry.lua"))
        self._promote = client.register_script(load_script("finalize_promote.lua"))

    @at_boundary
    async def foreign_owner(self) -> str | None:
        """The identity of another data directory that owns this shard's keys, else None (ours, or unclaimed)."""
        if self.owner is None:
            return None
        found = await self.redis.hget(self.keys.meta, "owner")
        text = None if found is None else _text(found)
        return None if text in (None, self.owner) else text

    @at_boundary
    async def ensure_group(self) -> None:
        """Create the stream and the consumer group if they do not exist."""
        await ensure_group(self.redis, self.keys)

    @at_boundary
    async def read(self, count: int = READ_COUNT_MAX, block_ms: int | None = None) -> list[tuple[str, object]]:
        """New messages for this consumer: ``(message id, raw fields)``."""
        reply: Any = await self.redis.xreadgroup(
            FINALIZE_GROUP, self.consumer, {self.keys.finalize: ">"}, count=count, block=block_ms
        )
        return [(_text(mid), raw) for _, messages in reply or [] for mid, raw in messages]

    @at_boundary
    async def reclaim(self, idle_ms: int, count: int = READ_COUNT_MAX) -> list[tuple[str, object]]:
        """Messages another consumer held for more than ``idle_ms`` without finishing, now ours."""
        reply: Any = await self.redis.xautoclaim(
            self.keys.finalize, FINALIZE_GROUP, self.consumer, min_idle_time=idle_ms, start_id="0-0", count=count
        )
        claimed: list[tuple[bytes, object]] = reply[1] if reply else []
        return [(_text(mid), raw) for mid, raw in claimed if raw is not None]

    @at_boundary
    async def done(self, message_id: str) -> None:
        """Acknowledge and delete a finished message."""
        await self._done(keys=[self.keys.finalize], args=[FINALIZE_GROUP, message_id])

    @at_boundary
    async def retry_later(self, message: Message, due_ms: int, reason: str) -> None:
        """Replace the message by its next attempt, deliverable at ``due_ms``."""
        member = msgspec.json.encode(message.retry(reason)).decode()
        await self._retry(
            keys=[self.keys.finalize, self.keys.delayed], args=[FINALIZE_GROUP, message.message_id, due_ms, member]
        )

    @at_boundary
    async def postpone(self, message: Message, due_ms: int) -> None:
        """Put the message back unchanged (no attempt spent), deliverable at ``due_ms``."""
        fields = message.retry(message.reason)
        fields["attempt"] = str(message.attempt)
        member = msgspec.json.encode(fields).decode()
        await self._retry(
            keys=[self.keys.finalize, self.keys.delayed], args=[FINALIZE_GROUP, message.message_id, due_ms, member]
        )

    @at_boundary
    async def promote_due(self, now_ms: int, limit: int = PROMOTE_BATCH_MAX) -> int:
        """Move retries that are due back into the stream; returns how many."""
        moved = await self._promote(keys=[self.keys.delayed, self.keys.finalize], args=[now_ms, limit])
        return int(moved)

    @at_boundary
    async def dead_letters(self, after: str = "-", count: int = POISON_PAGE_MAX) -> list[DeadLetter]:
        """One page of the poison stream, after message id ``after`` (exclusive).

        ``after`` is ``-`` or a stream id ``<ms>-<seq>`` whose parts fit in 64 bits (else
        :class:`InvalidInput`); nothing comes after the largest id.
        """
        if after != "-":
            ms, _, seq = after.partition("-")
            if not (ms.isdecimal() and seq.isdecimal()) or max(int(ms), int(seq)) > STREAM_ID_PART_MAX:
                raise InvalidInput("after must be a stream id <ms>-<seq> with 64-bit parts", field="after")
            if int(ms) == int(seq) == STREAM_ID_PART_MAX:
                return []
        start = after if after == "-" else f"({after}"
        reply = await self.redis.xrange(self.keys.poison, min=start, count=count)
        return [DeadLetter(_text(mid), _fields(raw)) for mid, raw in reply or []]

    @at_boundary
    async def depths(self) -> dict[str, int]:
        """Messages in the stream, pending delivery acknowledgement, delayed, and dead letters."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.keys.finalize)
        pipe.zcard(self.keys.delayed)
        pipe.xlen(self.keys.poison)
        stream, delayed, poison = await pipe.execute()
        pending = 0
        try:
            summary = await self.redis.xpending(self.keys.finalize, FINALIZE_GROUP)
            pending = int(summary.get("pending", 0)) if isinstance(summary, dict) else 0
        except aioredis.ResponseError:
            pending = 0  # no group yet
        return {"stream": int(stream), "pending": pending, "delayed": int(delayed), "poison": int(poison)}
