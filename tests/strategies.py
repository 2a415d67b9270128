"""Hypothesis strategies shared by the property and model tests (one place, as in attrs)."""

from __future__ import annotations

from hypothesis import strategies as st

from tollway.core import commands as cmd
from tollway.core import events as ev
from tollway.core.money import INT64_MAX

ACCOUNT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@-"

account_ids = st.text(ACCOUNT_ALPHABET, min_size=1, max_size=128)
request_ids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=128)
amounts = st.integers(min_value=0, max_value=INT64_MAX)
small_amounts = st.integers(min_value=0, max_value=10_000)
ulids = st.from_regex(r"[0-7][0-9A-HJKMNP-TV-Z]{25}", fullmatch=True)
timestamps = st.integers(min_value=0, max_value=(1 << 48) - 1)
texts = st.text(max_size=64)

rates = st.builds(
    ev.RateSnapshot,
    credit_units_per_usd=st.integers(1, 10_000),
    usd_usdc_rate_ppm=st.integers(1, 10_000_000),
    frozen_at_ms=timestamps,
)

payloads: st.SearchStrategy[ev.Payload] = st.one_of(
    st.builds(ev.BillingReserve, account_ids, request_ids, amounts, timestamps, rates, texts),
    st.builds(ev.BillingCommit, account_ids, amounts, amounts, amounts, amounts, texts, st.booleans(), rates),
    st.builds(ev.BillingRelease, account_ids, amounts, texts),
    st.builds(ev.BillingReserveExpired, account_ids, amounts, timestamps),
    st.builds(ev.BillingReserveExtended, account_ids, timestamps, timestamps),
    st.builds(ev.BillingCharge, account_ids, request_ids, amounts, amounts, st.booleans(), st.booleans(), rates, texts),
    st.builds(ev.BillingVoid, account_ids, amounts, texts, texts, st.sampled_from(["COMMITTED", "FINALIZE_FAILED"])),
    st.builds(
        ev.BillingFinalizeAck,
        account_ids,
        amounts,
        texts,
        st.integers(0, 100),
        st.sampled_from(["FINALIZE_PENDING", "FINALIZE_FAILED"]),
    ),
    st.builds(ev.BillingFinalizeFail, account_ids, amounts, texts, st.integers(0, 100)),
    st.builds(ev.BillingReconciliation, texts, texts),
    st.builds(ev.CreditMint, account_ids, request_ids, amounts, st.none() | amounts, st.none() | st.integers(1, 10**7)),
    st.builds(ev.CreditDeduct, account_ids, request_ids, amounts, texts),
    st.builds(ev.X402CreditNote, account_ids, request_ids, amounts, texts),
    st.builds(ev.RequestStart, account_ids, request_ids),
    st.builds(ev.RequestComplete, account_ids, request_ids, st.just('{"ok": true}')),
    st.builds(ev.Audit, texts, texts, texts),
    st.builds(
        ev.EntriesArchived,
        timestamps,
        st.lists(
            st.builds(
                ev.ArchivedEntry,
                ulids,
                account_ids,
                request_ids,
                st.sampled_from(["COMMITTED", "FINALIZE_ACKED", "RELEASED", "VOIDED"]),
            ),
            max_size=3,
        ).map(tuple),
        st.lists(st.builds(ev.ArchivedCredit, account_ids, request_ids, ulids), max_size=3).map(tuple),
    ),
)

events = st.builds(ev.Event, st.integers(1, INT64_MAX), timestamps, ulids, st.text(max_size=128), payloads)


# -- commands as a careless caller might build them (tests/test_command_input.py) ------------

HELD_ENTRY = "01HELDHELDHELDHELDHELDHELD"
"""Stands for the id of a hold the test took first; the test swaps in the real one."""

surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
junk: st.SearchStrategy[object] = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.text(max_size=8),
    surrogates,
    st.lists(st.integers(), max_size=2),
    st.just("x" * 2_000),
    st.just("y" * (1 << 20)),
)


def either(valid: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """A valid value or junk of any type and size."""
    return st.one_of(valid, junk)


_accounts = either(st.just("acct-1"))
_requests = either(st.text("abcdef", min_size=1, max_size=4))
_entries = either(st.just(HELD_ENTRY))
_money = either(st.integers(0, 5_000))
_counts = either(st.none() | st.integers(1, 100))
_texts = either(st.sampled_from(["pre_stream_failure", "user_cancel", "note", ""]))
_correlations = either(st.sampled_from(["trace-1", "", None]))
_responses = either(st.none() | st.just('{"text": "hi"}') | st.just('"' + "z" * (1 << 20) + '"'))
_note_payloads = st.one_of(
    st.builds(ev.Audit, _texts, _texts, _texts),
    st.builds(ev.BillingReconciliation, _texts, _texts),
    st.builds(ev.RequestStart, _accounts, _requests),
    st.builds(ev.CreditMint, _accounts, _requests, _money),  # money never moves through a note
)
careless_commands = st.one_of(
    st.builds(cmd.Reserve, _accounts, _requests, _money, _counts, _correlations, _texts),
    st.builds(cmd.Commit, _entries, _money, _responses),
    st.builds(cmd.Release, _entries, _texts),
    st.builds(cmd.Extend, _entries, _counts),
    st.builds(cmd.Expire, _entries),
    st.builds(cmd.Charge, _accounts, _requests, _money, either(st.booleans()), _correlations),
    st.builds(cmd.Void, _entries, _texts, _texts),
    st.builds(cmd.FinalizeAck, _entries, _texts, _counts),
    st.builds(cmd.FinalizeFail, _entries, _texts, _counts),
    st.builds(
        cmd.Credit,
        _accounts,
        _requests,
        either(st.sampled_from(list(cmd.CreditKind))),
        _money,
        _texts,
        either(st.none() | st.integers(0, 5_000)),
        _correlations,
    ),
    st.builds(cmd.Note, _note_payloads, _correlations, either(st.none() | st.just(HELD_ENTRY))),
    st.builds(cmd.Archive, either(st.integers(0, 10**13)), _counts),
)
