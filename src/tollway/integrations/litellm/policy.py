"""What the LiteLLM callback decides from a request, without doing I/O: account, request id, token counts.

Everything here reads plain mappings and attributes (LiteLLM's request ``data`` / ``kwargs``, its
``UserAPIKeyAuth``, a response's ``usage``) and returns values, so it is tested without LiteLLM.

Account sources (the ``account_from`` setting), one per deployment:

=====================  ==============================================================
``key_user``           the virtual key's ``user_id``
``key_team``           the virtual key's ``team_id``
``key_alias``          the virtual key's ``key_alias``
``end_user``           the OpenAI ``user`` field of the request
``metadata:<field>``   the request's ``metadata[<field>]`` (e.g. ``metadata:tollway_account``)
=====================  ==============================================================

A request whose source is missing or empty has no account and is refused, never billed to nobody.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

KEY_SOURCES: Final = {"key_user": "user_id", "key_team": "team_id", "key_alias": "key_alias"}
END_USER: Final = "end_user"
METADATA_PREFIX: Final = "metadata:"
ACCOUNT_ID: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
REQUEST_ID_PREFIX: Final = "litellm-"
REQUEST_ID_LENGTH_MAX: Final = 128
BILLED_CALL_TYPES: Final = frozenset({"completion", "acompletion"})
"""LiteLLM call types that are billed: chat completions. Other routes pass through unbilled."""


class ConfigurationError(ValueError):
    """A setting of the LiteLLM integration is invalid (raised when the callback is built)."""


@dataclass(frozen=True, slots=True)
class AccountSource:
    """Where a request's tollway account comes from: ``kind`` is a key field, ``end_user`` or ``metadata``."""

    kind: str
    field: str

    @classmethod
    def parse(cls, text: str) -> AccountSource:
        """``key_user``, ``key_team``, ``key_alias``, ``end_user`` or ``metadata:<field>``."""
        if text in KEY_SOURCES:
            return cls("key", KEY_SOURCES[text])
        if text == END_USER:
            return cls(END_USER, "user")
        if text.startswith(METADATA_PREFIX) and len(text) > len(METADATA_PREFIX):
            return cls("metadata", text[len(METADATA_PREFIX) :])
        choices = ", ".join([*KEY_SOURCES, END_USER, f"{METADATA_PREFIX}<field>"])
        raise ConfigurationError(f"account_from must be one of {choices}, not {text!r}")

    def account(self, key: object, data: Mapping[str, object]) -> str | None:
        """The account of a request (``key``: LiteLLM's ``UserAPIKeyAuth`` or None), or None when it has none."""
        if self.kind == "key":
            value = getattr(key, self.field, None)
        elif self.kind == END_USER:
            value = data.get("user")
        else:
            metadata = data.get("metadata")
            value = metadata.get(self.field) if isinstance(metadata, Mapping) else None
        return value if isinstance(value, str) and ACCOUNT_ID.fullmatch(value) else None


def request_id(call_id: str, attempt: int = 0) -> str:
    """The tollway ``request_id`` of LiteLLM call ``call_id`` (a later hold after a release: ``attempt`` ≥ 1)."""
    base = f"{REQUEST_ID_PREFIX}{call_id}"
    text = base if attempt == 0 else f"{base}-{attempt}"
    return text[:REQUEST_ID_LENGTH_MAX]


def max_output_tokens(data: Mapping[str, object], default: int) -> int:
    """The request's ``max_completion_tokens`` or ``max_tokens``, else ``default``."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = data.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return default


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of an answer."""

    input_tokens: int
    output_tokens: int


def usage_of(response: object) -> Usage | None:
    """The ``usage`` of a LiteLLM response (prompt and completion tokens), or None when it has none."""
    usage = getattr(response, "usage", None)
    if usage is None and isinstance(response, Mapping):
        usage = response.get("usage")
    if isinstance(usage, Mapping):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    else:
        prompt, completion = getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None)
    if isinstance(prompt, int) and isinstance(completion, int) and prompt >= 0 and completion >= 0:
        return Usage(prompt, completion)
    return None


def answered_model(kwargs: Mapping[str, object], fallback: str) -> str:
    """The public model (LiteLLM's model group) that answered a call: a fallback names its own group."""
    params = kwargs.get("litellm_params")
    metadata = params.get("metadata") if isinstance(params, Mapping) else None
    group = metadata.get("model_group") if isinstance(metadata, Mapping) else None
    if isinstance(group, str) and group:
        return group
    logged = kwargs.get("standard_logging_object")
    group = logged.get("model_group") if isinstance(logged, Mapping) else None
    return group if isinstance(group, str) and group else fallback


def delta_text(chunk: object) -> str:
    """The content text a stream chunk delivers to the client ("" for role, finish or usage chunks)."""
    choices = getattr(chunk, "choices", None) or []
    parts = []
    for choice in choices:
        content = getattr(getattr(choice, "delta", None), "content", None)
        if isinstance(content, str):
            parts.append(content)
    return "".join(parts)
