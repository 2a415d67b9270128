"""What the LiteLLM callback reads from a request, without LiteLLM or a server: account, request id, tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tollway.client import ClientError
from tollway.integrations.litellm import AccountSource, BillingRefused, ConfigurationError, TollwayBilling
from tollway.integrations.litellm.policy import (
    Usage,
    answered_model,
    delta_text,
    max_output_tokens,
    request_id,
    usage_of,
)

KEY = SimpleNamespace(user_id="user-1", team_id="team-1", key_alias="alias-1")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("key_user", "user-1"),
        ("key_team", "team-1"),
        ("key_alias", "alias-1"),
        ("end_user", "end-1"),
        ("metadata:tollway_account", "meta-1"),
        ("metadata:other", None),
    ],
)
def test_account_comes_from_the_configured_source(source: str, expected: str | None) -> None:
    """Each account source reads its own field of the key or the request."""
    data = {"user": "end-1", "metadata": {"tollway_account": "meta-1"}}
    assert expected == AccountSource.parse(source).account(KEY, data)


@pytest.mark.parametrize("value", [None, "", "has space", "x" * 129, 42])
def test_a_missing_or_invalid_account_is_no_account(value: object) -> None:
    """A missing, empty, non-string or malformed account id gives None (the call is refused)."""
    assert None is AccountSource.parse("metadata:acct").account(None, {"metadata": {"acct": value}})


def test_key_sources_without_a_key_give_no_account() -> None:
    """Direct use has no virtual key: a key source finds no account."""
    assert None is AccountSource.parse("key_user").account(None, {"user": "end-1"})


@pytest.mark.parametrize("text", ["", "team", "metadata:", "user_id"])
def test_an_unknown_source_is_a_configuration_error(text: str) -> None:
    """account_from is checked when the callback is built."""
    with pytest.raises(ConfigurationError):
        AccountSource.parse(text)


def test_callback_settings_are_checked() -> None:
    """on_unreachable and the limits are checked when the callback is built."""
    with pytest.raises(ConfigurationError):
        TollwayBilling("http://127.0.0.1:1", None, on_unreachable="maybe")
    with pytest.raises(ConfigurationError):
        TollwayBilling("http://127.0.0.1:1", None, holds_max=0)


def test_request_id_is_derived_from_the_call_id() -> None:
    """The same call id gives the same request_id; a hold after a release gets a numbered one; ≤ 128 chars."""
    assert ("litellm-abc", "litellm-abc", "litellm-abc-2") == (
        request_id("abc"),
        request_id("abc"),
        request_id("abc", 2),
    )
    assert 128 == len(request_id("c" * 300))


def test_max_output_tokens_prefers_max_completion_tokens_then_max_tokens_then_the_default() -> None:
    """The output tokens reserved for a request."""
    values = [
        max_output_tokens({"max_completion_tokens": 10, "max_tokens": 20}, 99),
        max_output_tokens({"max_tokens": 20}, 99),
        max_output_tokens({}, 99),
        max_output_tokens({"max_tokens": True}, 99),
    ]
    assert [10, 20, 99, 99] == values


def test_usage_is_read_from_objects_and_mappings() -> None:
    """prompt and completion tokens from a response object or dict; None when absent or malformed."""
    as_object = SimpleNamespace(usage=SimpleNamespace(prompt_tokens=3, completion_tokens=4))
    as_mapping = {"usage": {"prompt_tokens": 5, "completion_tokens": 6}}
    malformed = {"usage": {"prompt_tokens": -1, "completion_tokens": 6}}
    expected = [Usage(3, 4), Usage(5, 6), None, None]
    assert expected == [usage_of(as_object), usage_of(as_mapping), usage_of(malformed), usage_of(object())]


def test_the_answered_model_is_the_model_group_of_the_call() -> None:
    """A fallback is charged at its own model group; without one, the reserved model."""
    by_params = {"litellm_params": {"metadata": {"model_group": "gpt-4o"}}}
    by_log = {"standard_logging_object": {"model_group": "gpt-4o"}}
    assert ["gpt-4o", "gpt-4o", "gpt-4o-mini"] == [
        answered_model(by_params, "gpt-4o-mini"),
        answered_model(by_log, "gpt-4o-mini"),
        answered_model({}, "gpt-4o-mini"),
    ]


def test_delta_text_is_the_content_a_chunk_delivers() -> None:
    """Content deltas count; role, finish and usage chunks deliver nothing."""
    content = SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=" tok"))])
    finish = SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=None))])
    usage_only = SimpleNamespace(choices=[])
    assert [" tok", "", ""] == [delta_text(content), delta_text(finish), delta_text(usage_only)]


def test_a_refusal_is_an_http_exception_and_an_sdk_error() -> None:
    """BillingRefused carries the status and tollway's body, and is caught as an SDK ClientError."""
    refused = BillingRefused(402, {"error": "insufficient_funds", "message": "short"})
    assert (402, {"error": "insufficient_funds", "message": "short"}) == (refused.status_code, refused.body)
    assert isinstance(refused, ClientError)


async def test_a_call_without_a_call_id_is_refused_before_any_request() -> None:
    """No litellm_call_id means no idempotency key: the hook refuses (400) without calling tollway."""
    billing = TollwayBilling("http://127.0.0.1:1", None)
    data = {"model": "gpt-4o-mini", "messages": [], "metadata": {"tollway_account": "acct"}}
    with pytest.raises(BillingRefused) as refused:
        await billing.async_pre_call_hook(None, None, data, "acompletion")
    assert (400, "billing_call_id_missing") == (refused.value.status_code, refused.value.body["error"])
