"""tollway: the billing loop for AI-inference gateways.

Reserve the worst-case cost before a model call, commit the actual cost (or release the hold)
after it, and let every money movement be written first to a checksummed, fsynced
write-ahead log. The library entry point is :class:`tollway.Engine`::

    async with Engine.open("tollway-data") as engine:
        await engine.execute(Credit("acct-1", "topup-1", CreditKind.MINT, 5_000_000))
        held = await engine.execute(Reserve("acct-1", "req-1", estimated_cost_micro=20_000))
"""

from tollway.config import Durability, Settings, load_settings
from tollway.core.commands import (
    Charge,
    Commit,
    Credit,
    CreditKind,
    CreditResult,
    EntryResult,
    Extend,
    FinalizeAck,
    FinalizeFail,
    OverrunPolicy,
    Refusal,
    RefusalCode,
    Release,
    Reserve,
    Void,
)
from tollway.core.errors import (
    EngineStopped,
    InvalidAmount,
    InvalidInput,
    TollwayError,
    WalCorrupt,
    WalIOFailure,
    WalLocked,
)
from tollway.core.lifecycle import EntryState
from tollway.core.state import Account, Entry
from tollway.engine import Engine

__all__ = [
    "Account",
    "Charge",
    "Commit",
    "Credit",
    "CreditKind",
    "CreditResult",
    "Durability",
    "Engine",
    "EngineStopped",
    "Entry",
    "EntryResult",
    "EntryState",
    "Extend",
    "FinalizeAck",
    "FinalizeFail",
    "InvalidAmount",
    "InvalidInput",
    "OverrunPolicy",
    "Refusal",
    "RefusalCode",
    "Release",
    "Reserve",
    "Settings",
    "TollwayError",
    "Void",
    "WalCorrupt",
    "WalIOFailure",
    "WalLocked",
    "load_settings",
]
