"""The conservation guard at run time: runs the checks, keeps the record, pulls the engine's lever.

:class:`GuardRunner` owns one :class:`~tollway.core.guard.Guard` (the pure record and its
transitions live in :mod:`tollway.core.guard`). On :meth:`~GuardRunner.start` it closes the
gate on new holds (``uninitialized``), runs the startup checks and opens the gate only when
they pass. What happens next follows the record:

- **violated** → ``degraded`` with ``recovery_stopped``: nothing retries; an operator audits and
  calls :meth:`~GuardRunner.reset` (audited in the WAL), which runs the checks again;
- **could not run** (the parity check raised a transient error) → ``degraded`` with a retry at
  ``retry_at_ms``; a task sleeps until then (the sleep and the jitter are injected) and re-runs;
- **bypass** (``TOLLWAY_GUARD_BYPASS=true``, read by the composition root) → an ``audit`` event
  ``guard_bypass`` is made durable and a CRITICAL line logged *before* holds are allowed; the
  checks still run and are reported, but the gate stays open.

While the engine runs, every durable batch passes the cheap per-event checks
(:func:`~tollway.core.guard.check_event`): a commit whose rate differs from its hold's, or an
amount outside MicroUSD, stops recovery at once.

Whatever the guard says, commits, releases and settlement outcomes are never gated — refusing
them would lose money; only new holds and direct charges wait (``BILLING_EVALUATOR_UNAVAILABLE``).

The state checks run on a consistent copy (:meth:`~tollway.engine.Engine.export_state`) in a
worker thread, so a large state never stalls the event loop. :func:`redis_parity` builds the
``projection_parity`` check for one projector.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.core import guard as core
from tollway.core.errors import InvalidInput, TollwayError, WalError
from tollway.core.guard import PROJECTION_PARITY, CheckResult, Guard, GuardState
from tollway.core.ledger import Ledger
from tollway.core.validate import MAX_TEXT_LENGTH
from tollway.engine import Engine
from tollway.group_commit import Batch
from tollway.redis.errors import UNAVAILABLE
from tollway.redis.parity import differences
from tollway.redis.projector import Projector
from tollway.wal.segments import iter_events

log = logging.getLogger("tollway.guard")

BYPASS_ENV: Final = "TOLLWAY_GUARD_BYPASS"
"""The environment variable the composition root reads (``true``) to construct a bypassed guard."""
AUDIT_GUARD_RESET: Final = "guard_reset"
AUDIT_GUARD_BYPASS: Final = "guard_bypass"
BYPASS_ACTOR: Final = f"env:{BYPASS_ENV}"
RETRY_AFTER_SECONDS: Final = 30
"""What ``/readyz`` and refused holds tell clients while the guard is not ready."""
PARITY_ATTEMPTS_MAX: Final = 20
"""Tries to catch the projection at the sequence of a state copy before giving up (transient)."""
PARITY_SETTLE_S: Final = 0.1
"""Pause between those tries, for the projector to catch up."""

ParityCheck = Callable[[], Awaitable[list[str]]]
"""Returns the projection's differences (empty: parity); raises a transient error if it cannot tell."""
Sleep = Callable[[float], Awaitable[None]]
Jitter = Callable[[], int]
OnChecked = Callable[[Guard, tuple[CheckResult, ...]], None]


class CheckUnavailable(TollwayError):
    """A check could not run (Redis unreachable, the projection would not hold still): retry later."""


def random_jitter_permille() -> int:
    """A uniform jitter in ±1000 permille of the retry spread (spreads retries; not a secret)."""
    return random.randint(-core.JITTER_PERMILLE_MAX, core.JITTER_PERMILLE_MAX)


@dataclass(frozen=True, slots=True)
class GuardStatus:
    """What ``/v1/guard`` and ``/readyz`` report."""

    state: GuardState
    holds_allowed: bool
    recovery_stopped: bool
    reason: str | None
    retry_at_ms: int | None
    attempts: int
    checked_at_ms: int | None  # when the last full check run finished
    checked_sequence: int | None  # the WAL sequence of the state it checked
    checks: tuple[CheckResult, ...]

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready mapping."""
        return {
            "state": self.state.value,
            "holds_allowed": self.holds_allowed,
            "recovery_stopped": self.recovery_stopped,
            "reason": self.reason,
            "retry_at_ms": self.retry_at_ms,
            "retry_after_seconds": None if self.holds_allowed else RETRY_AFTER_SECONDS,
            "attempts": self.attempts,
            "checked_at_ms": self.checked_at_ms,
            "checked_sequence": self.checked_sequence,
            "checks": [
                {"name": check.name, "status": check.status.value, "problems": list(check.problems)}
                for check in self.checks
            ],
        }


class GuardRunner:
    """The conservation guard of one engine."""

    def __init__(
        self,
        engine: Engine,
        *,
        parity: ParityCheck | None = None,
        bypass: bool = False,
        verify_wal_ledger: bool = False,
        transient_errors: tuple[type[BaseException], ...] = (CheckUnavailable,),
        sleep: Sleep = asyncio.sleep,
        jitter: Jitter = random_jitter_permille,
        on_checked: OnChecked | None = None,
        watch: bool = True,
    ) -> None:
        """Guard ``engine``; nothing runs until :meth:`start`.

        ``verify_wal_ledger`` also folds the whole WAL into a ledger for ``budget_conservation``
        (as ``tollway audit`` does; slower on a long log). ``on_checked`` is told every new record
        and the results behind it (e.g. :meth:`tollway.metrics.Metrics.guard_checked`).
        """
        self.engine = engine
        self.guard = Guard()
        self.last_checks: tuple[CheckResult, ...] = ()
        self.checked_at_ms: int | None = None
        self.checked_sequence: int | None = None
        self._parity = parity
        self._bypass = bypass
        self._verify_wal_ledger = verify_wal_ledger
        self._transient = transient_errors
        self._sleep = sleep
        self._jitter = jitter
        self._on_checked = on_checked
        self._watch = watch
        self._lock = asyncio.Lock()
        self._retry_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> Guard:
        """Close the gate, enter the bypass if asked, run the startup checks; returns the record."""
        self._publish(())
        if self._bypass:
            await self._enter_bypass()
        if self._watch:
            self.engine.subscribe_batches(self._on_durable)
        return await self.check()

    async def close(self) -> None:
        """Stop a pending retry."""
        task, self._retry_task = self._retry_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def status(self) -> GuardStatus:
        """The record, the last results and when they were taken."""
        g = self.guard
        return GuardStatus(
            g.state,
            core.holds_allowed(g),
            g.recovery_stopped,
            g.reason,
            g.retry_at_ms,
            g.attempts,
            self.checked_at_ms,
            self.checked_sequence,
            self.last_checks,
        )

    # -- checks ----------------------------------------------------------------------------

    async def check(self) -> Guard:
        """Run every check now and apply the outcome (one run at a time)."""
        async with self._lock:
            results, sequence = await self._run()
            now_ms = self.engine.now_ms()
            before = self.guard
            self.guard = core.after_checks(before, results, now_ms, self._jitter())
            self.last_checks, self.checked_at_ms, self.checked_sequence = tuple(results), now_ms, sequence
            self._log_change(before)
            self._publish(self.last_checks)
            self._schedule_retry()
            return self.guard

    async def _run(self) -> tuple[list[CheckResult], int]:
        """The state checks on a consistent copy (in a thread), then parity if configured."""
        state = await self.engine.export_state()
        ledger, fold_failure = await self._fold(state.last_sequence)
        results = await asyncio.to_thread(core.run_checks, state, ledger)
        if fold_failure is not None:
            results = [fold_failure if r.name == fold_failure.name else r for r in results]
        if self._parity is not None:
            results.append(await self._parity_result())
        return results, state.last_sequence

    async def _fold(self, last_sequence: int) -> tuple[Ledger | None, CheckResult | None]:
        """The independent WAL fold, when asked for; or why ``budget_conservation`` cannot pass."""
        if not self._verify_wal_ledger:
            return None, None
        try:
            return await asyncio.to_thread(fold_wal, self.engine.settings.wal_dir, last_sequence), None
        except WalError as exc:
            return None, core.result(core.BUDGET_CONSERVATION, [f"the WAL cannot be folded: {exc}"])
        except OSError as exc:
            return None, core.result(core.BUDGET_CONSERVATION, [f"the WAL is unreadable: {exc}"], unavailable=True)

    async def _parity_result(self) -> CheckResult:
        assert self._parity is not None
        try:
            problems = await self._parity()
        except self._transient as exc:
            return core.result(PROJECTION_PARITY, [f"could not run: {exc}"], unavailable=True)
        return core.result(PROJECTION_PARITY, problems)

    def _on_durable(self, batch: Batch) -> None:
        """Engine listener: the per-event checks on each durable batch. Never raises."""
        state, changed = self.engine.state, {event.wal_sequence: change.entry for event, change in batch.transitions}
        found = [
            problem
            for event in batch.events
            for problem in core.check_event(event, state, changed.get(event.wal_sequence))
        ]
        if found:
            self._record(found)

    def projection_diverged(self, finding: str) -> None:
        """The projector found the projection differing from the WAL: a parity failure (SPEC §9)."""
        self._record([core.result(PROJECTION_PARITY, [finding])])

    async def watch_parity(self, interval_s: float, on_failure: Callable[[str], None]) -> None:
        """Check projection parity every ``interval_s`` while holds are allowed; tell ``on_failure`` what differs.

        The state checks run at start and on reset; this catches a projection changed behind
        tollway's back (which the projection script only notices when a balance would go
        negative) within one interval. Cancel the task to stop it.
        """
        while True:
            await self._sleep(interval_s)
            if self._parity is None or not core.holds_allowed(self.guard) or self.guard.state is GuardState.BYPASSED:
                continue
            found = await self._parity_result()
            if found.status is core.CheckStatus.VIOLATED:
                self._record([found])
                on_failure("; ".join(found.problems[:5]))

    def _record(self, found: list[CheckResult]) -> None:
        """Apply findings made outside a full run: the record, the lever, the log, the metrics."""
        before = self.guard
        self.guard = core.after_checks(before, found, self.engine.now_ms(), 0)
        names = {result.name for result in found}
        self.last_checks = (*(c for c in self.last_checks if c.name not in names), *found)
        self._log_change(before)
        self._publish(tuple(found))
        self._schedule_retry()  # recovery stopped: a pending retry would be pointless

    # -- admin -----------------------------------------------------------------------------

    async def reset(self, admin_id: str) -> Guard:
        """Admin reset: audit it in the WAL, forget the findings, and run the checks again."""
        if not isinstance(admin_id, str) or not admin_id.strip() or len(admin_id) > MAX_TEXT_LENGTH:
            raise InvalidInput(f"admin_id must be 1 to {MAX_TEXT_LENGTH} characters", field="admin_id")
        before = self.guard
        await self._audit(AUDIT_GUARD_RESET, admin_id, f"from {before.state.value}: {before.reason or 'no reason'}")
        log.warning("conservation guard reset by %s (was %s: %s)", admin_id, before.state.value, before.reason)
        self.guard = core.reset(before)
        self._publish(())
        return await self.check()

    async def _enter_bypass(self) -> None:
        """Break-glass: durable audit first, then a CRITICAL line, then the gate opens."""
        await self._audit(AUDIT_GUARD_BYPASS, BYPASS_ACTOR, f"{BYPASS_ENV}=true: holds allowed without the guard")
        log.critical(
            "CONSERVATION GUARD BYPASSED (%s=true): new holds are allowed whatever the checks find", BYPASS_ENV
        )
        self.guard = core.bypass(self.guard, f"break-glass bypass ({BYPASS_ENV}=true)")
        self._publish(())

    async def _audit(self, action: str, actor: str, detail: str) -> None:
        await self.engine.execute(cmd.Note(ev.Audit(action, actor, detail[:MAX_TEXT_LENGTH])))

    # -- plumbing --------------------------------------------------------------------------

    def _publish(self, results: tuple[CheckResult, ...]) -> None:
        """Pull the engine's lever to match the record, and tell ``on_checked``."""
        self.engine.set_holds_allowed(core.holds_allowed(self.guard))
        if self._on_checked is not None:
            self._on_checked(self.guard, results)

    def _log_change(self, before: Guard) -> None:
        g = self.guard
        if g.recovery_stopped and not before.recovery_stopped:
            log.critical("conservation guard: invariant violated, new holds stopped until an admin reset: %s", g.reason)
        elif g.state is GuardState.DEGRADED and g.retry_at_ms is not None:
            log.warning(
                "conservation guard degraded (attempt %s), retry at %s ms: %s", g.attempts, g.retry_at_ms, g.reason
            )
        elif g.state is not before.state:
            log.info("conservation guard %s -> %s", before.state.value, g.state.value)

    def _schedule_retry(self) -> None:
        """Replace any pending retry with one at ``retry_at_ms`` (if the record asks for one)."""
        old = self._retry_task
        if old is not None and old is not asyncio.current_task() and not old.done():
            old.cancel()
        self._retry_task = None
        if self.guard.retry_at_ms is not None:
            delay_s = max(0, self.guard.retry_at_ms - self.engine.now_ms()) / 1000
            self._retry_task = asyncio.get_running_loop().create_task(self._retry_after(delay_s))

    async def _retry_after(self, delay_s: float) -> None:
        await self._sleep(delay_s)
        try:
            await self.check()
        except TollwayError as exc:  # the engine stopped meanwhile: nothing left to guard
            log.warning("conservation guard retry not run: %s", exc)


def fold_wal(wal_dir: Path, last_sequence: int) -> Ledger:
    """The ledger of the WAL's events 1..``last_sequence`` (reads no further)."""
    ledger = Ledger()
    if last_sequence < 1:
        return ledger
    for event in iter_events(wal_dir):
        ledger.post(event)
        if event.wal_sequence >= last_sequence:
            break
    return ledger


# -- projection parity ---------------------------------------------------------------------


async def _parity_at_one_sequence(engine: Engine, projector: Projector) -> list[str] | None:
    """Differences between a state copy and a projection that held still at its sequence, else None."""
    state = await engine.export_state()
    applied = await projector.applied_sequence()
    if applied is None:
        return []  # missing or rebuilding: the projector rebuilds it from the engine (SPEC §9)
    if applied != state.last_sequence:
        return None
    problems = await differences(projector.redis, projector.keys, state)
    return problems if await projector.applied_sequence() == state.last_sequence else None


def redis_parity(
    engine: Engine,
    projector: Projector,
    *,
    attempts_max: int = PARITY_ATTEMPTS_MAX,
    settle_s: float = PARITY_SETTLE_S,
    sleep: Sleep = asyncio.sleep,
) -> ParityCheck:
    """The ``projection_parity`` check: the projection equals a consistent copy of the engine state.

    The copy is taken at one sequence and compared only while Redis stays at exactly that
    sequence (read before and after), so traffic during the check can never produce a false
    violation. Unreachable Redis, or a projection that will not hold still, raises
    :class:`CheckUnavailable` (transient). A projection that is missing or being rebuilt passes.
    """

    async def check() -> list[str]:
        if projector.violation is not None:
            return [f"the projector stopped: {projector.violation}"]
        for _ in range(attempts_max):
            try:
                found = await _parity_at_one_sequence(engine, projector)
            except UNAVAILABLE as exc:
                raise CheckUnavailable(f"redis unreachable: {exc}") from exc
            if found is not None:
                return found
            await sleep(settle_s)
        raise CheckUnavailable(f"the projection did not settle at one sequence within {attempts_max} tries")

    return check


def lenient_parity(check: ParityCheck) -> ParityCheck:
    """Projection parity that cannot be checked (Redis away, catching up) does not block billing.

    SPEC §7: Redis down never stops billing; §9: the guard is ready when the projection is
    consistent *or rebuilding* — an unreachable or moving projection is caught up by the
    projector, so it passes here with a warning. A real difference still fails.
    """

    async def wrapped() -> list[str]:
        try:
            return await check()
        except CheckUnavailable as exc:
            log.warning("projection parity not checked (the projector catches up): %s", exc)
            return []

    return wrapped
