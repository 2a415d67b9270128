"""Model prices and the two cost formulas, in integers only (SPEC §10).

A price is MicroUSD per 1,000,000 tokens, separately for input and output. The cost of a call
is ``(input × p_in + output × p_out) / 1e6`` MicroUSD, rounded by purpose:

- the **estimate** (what a reserve holds) counts the *maximum* output and rounds **up** — a
  hold must never be smaller than what the call can cost;
- the **actual** cost (what a commit charges) counts the output really produced and rounds
  **down** — a user is never charged a fraction of a micro-dollar they did not use.

Token counts are bounded by :data:`MAX_TOKENS` and prices by :data:`MAX_PRICE_MICRO_PER_MTOK`, so
every cost fits comfortably in a signed 64-bit integer. An unknown model or a bad count raises
:class:`~tollway.core.errors.InvalidInput` naming the field (the API answers 400). This module
does not know where prices come from: :mod:`tollway.pricing` loads them from files.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from tollway.core.errors import InvalidInput
from tollway.core.money import Rounding, div_round

TOKENS_PER_PRICE_UNIT: Final = 1_000_000
"""Prices are quoted per this many tokens."""
MAX_TOKENS: Final = 100_000_000
"""Most tokens (input or output) one request may count; far beyond any context window today."""
MAX_PRICE_MICRO_PER_MTOK: Final = 10_000_000_000
"""Highest accepted price: $10,000 per million tokens."""
MAX_MODEL_NAME_LENGTH: Final = 128
MODELS_NAMED_MAX: Final = 20
"""Most model names an "unknown model" error lists (the rest are in ``GET /v1/prices``)."""
"""Longest model name in a price table."""


def _check_int(value: object, field: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be an integer, got {type(value).__name__}", field=field)
    if not 0 <= value <= high:
        raise InvalidInput(f"{field} must be between 0 and {high}, got {value}", field=field)
    return value


def check_tokens(value: object, field: str) -> int:
    """Return ``value`` if it is a token count in 0..MAX_TOKENS, else raise naming ``field``."""
    return _check_int(value, field, MAX_TOKENS)


def check_model_name(model: object) -> str:
    """Return ``model`` if it can name a model: 1–128 printable ASCII characters, no whitespace."""
    if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_NAME_LENGTH:
        raise InvalidInput(f"model must be a string of 1 to {MAX_MODEL_NAME_LENGTH} characters", field="model")
    if not all("!" <= char <= "~" for char in model):
        raise InvalidInput("model must be printable ASCII without whitespace", field="model")
    return model


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """MicroUSD per 1,000,000 tokens, for input (prompt) and output (completion) tokens."""

    input_micro_per_mtok: int
    output_micro_per_mtok: int

    def __post_init__(self) -> None:
        _check_int(self.input_micro_per_mtok, "input_micro_per_mtok", MAX_PRICE_MICRO_PER_MTOK)
        _check_int(self.output_micro_per_mtok, "output_micro_per_mtok", MAX_PRICE_MICRO_PER_MTOK)


def _cost_numerator(price: ModelPrice, input_tokens: int, output_tokens: int, output_field: str) -> int:
    check_tokens(input_tokens, "input_tokens")
    check_tokens(output_tokens, output_field)
    return input_tokens * price.input_micro_per_mtok + output_tokens * price.output_micro_per_mtok


def estimate_micro(price: ModelPrice, input_tokens: int, max_output_tokens: int) -> int:
    """What to hold: ``ceil((input × p_in + max_output × p_out) / 1e6)`` MicroUSD."""
    numerator = _cost_numerator(price, input_tokens, max_output_tokens, "max_output_tokens")
    return div_round(numerator, TOKENS_PER_PRICE_UNIT, Rounding.UP)


def actual_micro(price: ModelPrice, input_tokens: int, output_tokens: int) -> int:
    """What to charge: ``floor((input × p_in + output × p_out) / 1e6)`` MicroUSD."""
    numerator = _cost_numerator(price, input_tokens, output_tokens, "output_tokens")
    return div_round(numerator, TOKENS_PER_PRICE_UNIT, Rounding.DOWN)


def estimate_basis(model: str, input_tokens: int, max_output_tokens: int) -> str:
    """How an estimate was made, for a reserve's ``basis`` (part of its idempotency identity)."""
    return f"model={model};input_tokens={input_tokens};max_output_tokens={max_output_tokens}"


class PriceTable(Mapping[str, ModelPrice]):
    """A read-only mapping of model name → :class:`ModelPrice`."""

    __slots__ = ("_prices",)

    def __init__(self, prices: Mapping[str, ModelPrice]) -> None:
        for model, price in prices.items():
            check_model_name(model)
            if not isinstance(price, ModelPrice):
                raise InvalidInput(f"price of {model} must be a ModelPrice", field="model")
        self._prices: Mapping[str, ModelPrice] = MappingProxyType(dict(sorted(prices.items())))

    def __getitem__(self, model: str) -> ModelPrice:
        return self._prices[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._prices)

    def __len__(self) -> int:
        return len(self._prices)

    def __repr__(self) -> str:
        return f"PriceTable({dict(self._prices)!r})"

    def price(self, model: str) -> ModelPrice:
        """The price of ``model``; an unknown model raises :class:`InvalidInput` (field ``model``)."""
        found = self._prices.get(model)
        if found is None:
            raise InvalidInput(f"unknown model {model!r}; {self._known_models()}", field="model")
        return found

    def _known_models(self) -> str:
        """The models an unknown one could have meant: all of them, or the first few and where the rest are."""
        names = sorted(self._prices)
        shown = ", ".join(names[:MODELS_NAMED_MAX])
        more = len(names) - MODELS_NAMED_MAX
        return f"known: {shown}" + (f" and {more} more (GET /v1/prices)" if more > 0 else "")

    def estimate(self, model: str, input_tokens: int, max_output_tokens: int) -> int:
        """The hold for a call to ``model`` (rounded up)."""
        return estimate_micro(self.price(model), input_tokens, max_output_tokens)

    def actual(self, model: str, input_tokens: int, output_tokens: int) -> int:
        """The charge for a finished call to ``model`` (rounded down)."""
        return actual_micro(self.price(model), input_tokens, output_tokens)
