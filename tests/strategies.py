"""Hypothesis strategies shared by the property and model tests (one place, as in attrs)."""

from __future__ import annotations

from hypothesis import strategies as st

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
