"""Settlement: the client that finalizes committed charges, and a simulator of the other side.

- :mod:`~tollway.settlement.contract` — the wire contract (paths, body, JWT claims), pure;
- :mod:`~tollway.settlement.client` — :class:`SettlementClient`: one call in, one
  :class:`Attempt` (status + retry verdict) out, never an exception for settlement failures;
- :mod:`~tollway.settlement.simulator` — the settlement simulator (``tollway settlement-sim``),
  with its settings in :mod:`~tollway.settlement.sim_config`, its ASGI app in
  :mod:`~tollway.settlement.sim_app` and its exactly-once book in :mod:`~tollway.settlement.store`.

The retry schedule and the circuit breaker are pure decisions in :mod:`tollway.core`; the
finalize worker that uses this client asks them before and after each attempt.
"""

from tollway.settlement.client import (
    Attempt,
    FinalizedItem,
    FinalizedPage,
    SettlementAuth,
    SettlementClient,
    SettlementUnavailable,
)
from tollway.settlement.contract import (
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    FINALIZE_PATH,
    FINALIZED_PATH,
    PURPOSE_FINALIZE,
    SETTLEMENT_TIMEOUT_MS,
    TOKEN_LIFETIME_S,
    FinalizeRequest,
)

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_ISSUER",
    "FINALIZED_PATH",
    "FINALIZE_PATH",
    "PURPOSE_FINALIZE",
    "SETTLEMENT_TIMEOUT_MS",
    "TOKEN_LIFETIME_S",
    "Attempt",
    "FinalizeRequest",
    "FinalizedItem",
    "FinalizedPage",
    "SettlementAuth",
    "SettlementClient",
    "SettlementUnavailable",
]
