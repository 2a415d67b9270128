"""The finalize worker: committed charges → the settlement service, with retries, dead letters and a breaker.

For each message of the finalize queue the worker asks the pure breaker for a permit, calls
settlement once, and acts on the pure verdict (:mod:`tollway.core.retry`):

- **ack** (200/409) → ``billing_finalize_ack`` is written to the WAL, *then* the message is
  finished (acknowledged and deleted);
- **retry** (5xx, 429, timeout, network) → the message is replaced by its next attempt, due
  after ``BACKOFF_SCHEDULE_MS``; after ``MAX_DLQ_RETRIES`` attempts it becomes poison;
- **poison** (400/401/403/404/422, bad data) → ``billing_finalize_fail`` is written (the entry
  becomes ``FINALIZE_FAILED``, the projector adds the dead letter), an alert is raised, then the
  message is finished.

While the breaker is OPEN nothing is called and no attempt is spent: a message read meanwhile
is put back unchanged until the breaker may let a probe through. A message whose entry is no
longer ``FINALIZE_PENDING`` (acked by an earlier delivery, voided) is simply finished.

The worker also promotes due retries, reclaims messages held by dead consumers, raises one
escalation alert per dead letter ``ESCALATION_WINDOW_MS`` after it failed (recorded in the WAL,
so it survives restarts), and performs the admin's bulk replay of every dead letter.
Because every step's outcome is durable before the queue moves on, a crash at any point only
causes a repeat, which settlement answers with 409.

**A void while settlement may be finalizing.** An admin may void a ``FINALIZE_FAILED`` entry
(refund it) at any time: tollway's ledger follows the admin. The HTTP API refuses a void while
this worker has a settlement call for the entry in flight (409 ``settlement_call_in_flight``),
which closes the common race; a call that settled before a timeout, or a void through the
library, can still meet a refund. So whenever settlement confirms a charge whose entry can no
longer take the acknowledgement (voided meanwhile), the worker records the discrepancy in the
WAL (a ``billing_reconciliation`` event of kind ``settled_after_void``), raises the alert
``finalize_discrepancy`` and counts it apart (``ReplayReport.refused``); the operator resolves
it by charging the account again or having settlement reverse the charge, as the alert says.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tollway.core import breaker as brk
from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.core.lifecycle import EntryState
from tollway.core.retry import Verdict, after_attempt
from tollway.core.state import ESCALATED, Entry
from tollway.core.validate import MAX_TEXT_LENGTH
from tollway.engine import Engine
from tollway.redis.errors import RedisDown, RedisRefused
from tollway.redis.projector import raise_if_cancelled
from tollway.redis.queue import FinalizeQueue, parse_message
from tollway.settlement.client import Attempt, SettlementClient
from tollway.settlement.contract import FinalizeRequest

log = logging.getLogger("tollway.finalizer")

ESCALATION_WINDOW_MS: Final = 24 * 3_600_000
CLAIM_IDLE_MS: Final = 30_000
CONCURRENCY: Final = 8
REPLAY_CONCURRENCY: Final = 5
BLOCK_MS: Final = 1_000
IDLE_PAUSE_MS: Final = 200
RETRY_PAUSE_MS: Final = 500
FOREIGN_PAUSE_MS: Final = 5_000

Alert = Callable[[str, dict[str, object]], None]


def log_alert(kind: str, details: dict[str, object]) -> None:
    """The default alert sink: one error-level log line per alert."""
    log.error("ALERT %s %s", kind, details)


SETTLED_AFTER_VOID: Final = "settled_after_void"
"""The reconciliation kind recorded when settlement finalized a charge tollway had refunded."""


def log_breaker_transition(change: brk.Transition, now_ms: int) -> None:
    """One line per change of the settlement breaker: a warning when it opens, info otherwise."""
    level = logging.WARNING if change.to_state is brk.BreakerState.OPEN else logging.INFO
    probe = "" if change.next_probe_at_ms is None else f"; next probe in {max(0, change.next_probe_at_ms - now_ms)} ms"
    counts = f" (threshold {change.failure_threshold})" if change.failures else ""
    log.log(
        level,
        "settlement breaker %s -> %s: %s%s%s",
        change.from_state.name,
        change.to_state.name,
        change.reason,
        counts,
        probe,
    )


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What a bulk replay of the dead letters did."""

    examined: int
    acked: int
    still_failing: int
    skipped: int  # not FINALIZE_FAILED any more, or the breaker was open
    refused: int = 0  # settlement finalized it, but the entry was voided meanwhile: a discrepancy recorded


class FinalizeWorker:
    """Finalizes one engine's committed charges through one settlement client."""

    def __init__(
        self,
        engine: Engine,
        queue: FinalizeQueue,
        settlement: SettlementClient,
        *,
        breaker_config: brk.BreakerConfig | None = None,
        concurrency: int = CONCURRENCY,
        claim_idle_ms: int = CLAIM_IDLE_MS,
        alert: Alert = log_alert,
        still_owner: Callable[[], bool] | None = None,
    ) -> None:
        self.engine = engine
        # Cluster mode: whether this node still serves the shard under the worker's lease epoch. A
        # worker on a lost shard (its process paused past the lease) must not judge messages by its
        # stale engine: it would drop the new owner's messages as "already settled".
        self.still_owner = still_owner
        self.queue = queue
        self.settlement = settlement
        self.breaker = brk.Breaker(config=breaker_config or brk.BreakerConfig())
        self.concurrency = concurrency
        self.claim_idle_ms = claim_idle_ms
        self.alert = alert
        self.calls = 0  # settlement calls made (for tests and metrics)
        self.in_flight: set[str] = set()  # entries with a settlement call under way

    # -- breaker ---------------------------------------------------------------------------

    def breaker_state(self) -> brk.BreakerState:
        """The breaker as of now."""
        now = self.engine.now_ms()
        self._keep_breaker(brk.observe(self.breaker, now), now)
        return self.breaker.state

    def breaker_view(self) -> dict[str, object]:
        """The breaker as the API shows it: state, failures counted, next probe time."""
        now = self.engine.now_ms()
        self._keep_breaker(brk.observe(self.breaker, now), now)
        return brk.view(self.breaker, now)

    def reset_breaker(self) -> None:
        """Admin reset: CLOSED, failures forgotten."""
        self._keep_breaker(brk.reset(self.breaker), self.engine.now_ms(), admin_reset=True)

    def _keep_breaker(self, breaker: brk.Breaker, now_ms: int, *, admin_reset: bool = False) -> None:
        """Keep ``breaker``; a change of state is logged once, with its reason and the failure counts."""
        change = brk.transition(self.breaker, breaker, now_ms, admin_reset=admin_reset)
        self.breaker = breaker
        if change is not None:
            log_breaker_transition(change, now_ms)

    async def _call(self, request: FinalizeRequest) -> Attempt | int:
        """One settlement call if the breaker allows it, else how long to wait (ms)."""
        now = self.engine.now_ms()
        permit = brk.acquire(self.breaker, now)
        self._keep_breaker(permit.breaker, now)
        if not permit.allowed:
            return permit.retry_in_ms
        self.calls += 1
        self.in_flight.add(request.billing_entry_id)
        try:
            attempt = await self.settlement.finalize(request)
        finally:
            self.in_flight.discard(request.billing_entry_id)
        now = self.engine.now_ms()
        healthy = attempt.verdict is not Verdict.RETRY  # a 4xx is an answer: the service is up
        self._keep_breaker(
            brk.record_success(self.breaker, now) if healthy else brk.record_failure(self.breaker, now), now
        )
        if not healthy:
            summary = brk.summary(self.breaker, now)
            log.warning(
                "settlement call for %s failed: %s; breaker %s", request.billing_entry_id, attempt.reason, summary
            )
        return attempt

    # -- one message -----------------------------------------------------------------------

    async def handle(self, message_id: str, raw: object) -> None:
        """Decide and act on one delivered message; the queue moves only after the WAL does."""
        if self.still_owner is not None and not self.still_owner():
            return  # left pending: the shard's owner reclaims it
        message = parse_message(message_id, raw)
        if message is None:
            log.error("unreadable finalize message %s dropped: %r", message_id, raw)
            await self.queue.done(message_id)
            return
        entry = self.engine.state.entries.get(message.billing_entry_id)
        if entry is None or entry.state is not EntryState.FINALIZE_PENDING:
            await self.queue.done(message_id)  # settled by an earlier delivery, or voided
            return
        request = FinalizeRequest(entry.billing_entry_id, entry.account_id, entry.charged_micro, entry.correlation_id)
        outcome = await self._call(request)
        if isinstance(outcome, int):  # breaker open: no call, no attempt spent
            await self.queue.postpone(message, self.engine.now_ms() + outcome)
            return
        step = after_attempt(outcome.verdict, message.attempt, outcome.reason)
        if step.verdict is Verdict.ACK:
            await self._acknowledge(entry, "worker", message.attempt)
            await self.queue.done(message_id)
        elif step.verdict is Verdict.RETRY:
            await self.queue.retry_later(message, self.engine.now_ms() + step.delay_ms, step.reason)
        else:
            await self.engine.execute(cmd.FinalizeFail(entry.billing_entry_id, step.reason, message.attempt))
            self.alert(
                "finalize_poison",
                {"billing_entry_id": entry.billing_entry_id, "account_id": entry.account_id, "reason": step.reason},
            )
            await self.queue.done(message_id)

    # -- loops -----------------------------------------------------------------------------

    async def run_once(self, *, block_ms: int | None = None) -> int:
        """One round: promote due retries, reclaim abandoned messages, handle new ones.

        Returns how many messages were handled. With ``block_ms=None`` it never waits (burst
        mode, for tests and drains).
        """
        if self.still_owner is not None and not self.still_owner():
            return 0
        now = self.engine.now_ms()
        await self.queue.promote_due(now)
        await self.escalate(now)
        if self.breaker_state() is brk.BreakerState.OPEN:
            return 0
        batch = await self.queue.reclaim(self.claim_idle_ms, self.concurrency)
        if not batch:
            batch = await self.queue.read(self.concurrency, block_ms)
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(message_id: str, raw: object) -> None:
            async with semaphore:
                await self.handle(message_id, raw)

        await asyncio.gather(*(one(mid, raw) for mid, raw in batch))
        return len(batch)

    async def run(self) -> None:
        """Work forever; survives Redis outages (billing never waits for this loop).

        Never touches a queue that belongs to another data directory (the projection's owner):
        it says so once and waits, taking no message and creating nothing.
        """
        grouped, foreign_seen = False, None
        while True:
            try:
                foreign = await self.queue.foreign_owner()
                if foreign is not None:
                    foreign_seen = self._refuse_foreign(foreign, foreign_seen)
                    await asyncio.sleep(FOREIGN_PAUSE_MS / 1000)
                    continue
                if not grouped:
                    await self.queue.ensure_group()
                    grouped = True
                handled = await self.run_once(block_ms=BLOCK_MS)
            except RedisDown as exc:
                raise_if_cancelled()
                log.warning("finalize worker: redis unavailable, retrying: %s", exc)
            except RedisRefused as exc:  # NOGROUP after a rebuild or FLUSHALL, maxmemory, …
                raise_if_cancelled()
                log.warning("finalize worker: %s; (re)creating the consumer group", exc)
                grouped = False
            else:
                raise_if_cancelled()  # a library may have swallowed it and returned normally
                if handled == 0:
                    await asyncio.sleep(IDLE_PAUSE_MS / 1000)
                continue
            await asyncio.sleep(RETRY_PAUSE_MS / 1000)

    def _refuse_foreign(self, foreign: str, seen: str | None) -> str:
        """Say (once per owner) that the queue is another data directory's; returns the owner seen."""
        if foreign != seen:
            log.critical(
                "finalize worker: the queue under %s belongs to another tollway data directory (identity %s); "
                "not touching it",
                self.queue.keys.base,
                foreign,
            )
        return foreign

    # -- escalation and replay ---------------------------------------------------------------

    async def escalate(self, now_ms: int) -> int:
        """Raise one alert per dead letter older than the escalation window; record it in the WAL."""
        if not self.engine.state.finalize_failed_count:
            return 0  # the common case: no dead letter, nothing to scan
        due = [
            entry
            for entry in list(self.engine.state.entries.values())
            if entry.state is EntryState.FINALIZE_FAILED
            and entry.failed_at_ms is not None
            and now_ms - entry.failed_at_ms >= ESCALATION_WINDOW_MS
            and entry.billing_entry_id not in self.engine.state.escalations
        ]
        for entry in due:
            note = ev.Audit(
                ESCALATED, "finalize-worker", f"{entry.billing_entry_id} unsettled since {entry.failed_at_ms}"
            )
            await self.engine.execute(cmd.Note(note, entry.correlation_id, entry.billing_entry_id))
            self.alert(
                "finalize_escalation", {"billing_entry_id": entry.billing_entry_id, "failed_at_ms": entry.failed_at_ms}
            )
        return len(due)

    async def replay_dead_letters(self, concurrency: int = REPLAY_CONCURRENCY) -> ReplayReport:
        """Admin bulk replay: every dead letter (all pages), ``concurrency`` calls at a time."""
        semaphore = asyncio.Semaphore(concurrency)
        counts = {"acked": 0, "failing": 0, "skipped": 0, "refused": 0}

        async def one(entry_id: str) -> None:
            async with semaphore:
                counts[await self._replay_one(entry_id)] += 1

        examined, after = 0, "-"
        while page := await self.queue.dead_letters(after):
            examined += len(page)
            after = page[-1].message_id
            await asyncio.gather(*(one(letter.billing_entry_id) for letter in page))
        return ReplayReport(examined, counts["acked"], counts["failing"], counts["skipped"], counts["refused"])

    async def _replay_one(self, entry_id: str) -> str:
        entry = self.engine.state.entries.get(entry_id)
        if entry is None or entry.state is not EntryState.FINALIZE_FAILED:
            return "skipped"
        request = FinalizeRequest(entry.billing_entry_id, entry.account_id, entry.charged_micro, entry.correlation_id)
        outcome = await self._call(request)
        if isinstance(outcome, int):
            return "skipped"
        if outcome.verdict is not Verdict.ACK:
            return "failing"
        return "acked" if await self._acknowledge(entry, "replay", 0) else "refused"

    async def _acknowledge(self, entry: Entry, source: str, attempt: int) -> bool:
        """Record settlement's confirmation; if the entry can no longer take it, record the discrepancy."""
        result = await self.engine.execute(cmd.FinalizeAck(entry.billing_entry_id, source, attempt))
        if not isinstance(result, cmd.Refusal):
            return True
        now = self.engine.state.entry_state(entry.billing_entry_id)
        state = "archived" if now is None else now.value
        detail = (
            f"settlement finalized {entry.billing_entry_id} ({entry.charged_micro} micro-USD of {entry.account_id}) "
            f"but the entry is {state} here ({result.message}); resolve by charging the account again "
            "or having settlement reverse the charge"
        )
        note = ev.BillingReconciliation(SETTLED_AFTER_VOID, detail[:MAX_TEXT_LENGTH])
        await self.engine.execute(cmd.Note(note, entry.correlation_id, entry.billing_entry_id))
        log.error("finalize discrepancy: %s", detail)
        self.alert(
            "finalize_discrepancy",
            {
                "billing_entry_id": entry.billing_entry_id,
                "account_id": entry.account_id,
                "charged_micro": entry.charged_micro,
                "state": state,
            },
        )
        return False
