"""Pricing (SPEC §10): integer cost formulas with their rounding, and strict price files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollway.core.errors import ConfigError, InvalidInput
from tollway.core.pricing import (
    MAX_PRICE_MICRO_PER_MTOK,
    MAX_TOKENS,
    ModelPrice,
    PriceTable,
    actual_micro,
    estimate_basis,
    estimate_micro,
)
from tollway.pricing import default_prices, load_prices, parse_prices

prices = st.builds(ModelPrice, st.integers(0, MAX_PRICE_MICRO_PER_MTOK), st.integers(0, MAX_PRICE_MICRO_PER_MTOK))
tokens = st.integers(0, MAX_TOKENS)


def exact_cost_times_million(price: ModelPrice, input_tokens: int, output_tokens: int) -> int:
    return input_tokens * price.input_micro_per_mtok + output_tokens * price.output_micro_per_mtok


# -- the formulas ---------------------------------------------------------------------------


@given(prices, tokens, tokens)
def test_estimate_is_the_ceiling(price: ModelPrice, input_tokens: int, max_output: int) -> None:
    """The estimate is the smallest whole MicroUSD not below the exact cost."""
    exact = exact_cost_times_million(price, input_tokens, max_output)
    estimate = estimate_micro(price, input_tokens, max_output)
    assert True is ((estimate - 1) * 1_000_000 < exact <= estimate * 1_000_000)


@given(prices, tokens, tokens)
def test_actual_is_the_floor(price: ModelPrice, input_tokens: int, output_tokens: int) -> None:
    """The actual charge is the largest whole MicroUSD not above the exact cost."""
    exact = exact_cost_times_million(price, input_tokens, output_tokens)
    actual = actual_micro(price, input_tokens, output_tokens)
    assert True is (actual * 1_000_000 <= exact < (actual + 1) * 1_000_000)


@given(prices, tokens, tokens, tokens)
def test_estimate_covers_any_actual_within_max_output(
    price: ModelPrice, input_tokens: int, max_output: int, produced: int
) -> None:
    """A hold for max_output tokens covers the charge for any output up to it, by at most one micro when equal."""
    output_tokens = min(produced, max_output)
    estimate = estimate_micro(price, input_tokens, max_output)
    actual = actual_micro(price, input_tokens, output_tokens)
    assert True is (actual <= estimate)
    if output_tokens == max_output:
        assert True is (estimate - actual in (0, 1))


def test_worked_examples() -> None:
    """$2.50/$10 per Mtok: 1,000 in and 500 out is exactly 7,500 micro; one token of a 1-micro price rounds."""
    gpt = ModelPrice(2_500_000, 10_000_000)
    assert (7_500, 7_500) == (estimate_micro(gpt, 1_000, 500), actual_micro(gpt, 1_000, 500))
    tiny = ModelPrice(1, 1)
    assert (1, 0) == (estimate_micro(tiny, 1, 0), actual_micro(tiny, 1, 0))


@pytest.mark.parametrize(
    ("input_tokens", "output_tokens", "field"),
    [
        (-1, 0, "input_tokens"),
        (0, MAX_TOKENS + 1, "max_output_tokens"),
        (True, 0, "input_tokens"),
        (1.5, 0, "input_tokens"),
    ],
)
def test_token_counts_are_checked(input_tokens: object, output_tokens: object, field: str) -> None:
    """Negative, oversized, boolean and fractional token counts are refused, naming the field."""
    with pytest.raises(InvalidInput) as caught:
        estimate_micro(ModelPrice(1, 1), input_tokens, output_tokens)  # type: ignore[arg-type]
    assert field == caught.value.field


def test_negative_price_is_refused() -> None:
    """A price record cannot be negative or fractional."""
    with pytest.raises(InvalidInput) as caught:
        ModelPrice(-1, 0)
    assert "input_micro_per_mtok" == caught.value.field


def test_unknown_model_is_invalid_input_on_the_model_field() -> None:
    """Asking a table for a model it does not list raises InvalidInput with field 'model'."""
    table = PriceTable({"m": ModelPrice(1, 2)})
    with pytest.raises(InvalidInput) as caught:
        table.estimate("nope", 1, 1)
    assert "model" == caught.value.field


def test_unknown_model_names_the_known_ones() -> None:
    """The error lists the models the table has (the first twenty, then where to see the rest)."""
    small = PriceTable({"b": ModelPrice(1, 2), "a": ModelPrice(1, 2)})
    large = PriceTable({f"m{i:02d}": ModelPrice(1, 2) for i in range(25)})
    messages = []
    for table in (small, large):
        with pytest.raises(InvalidInput) as caught:
            table.price("gpt-5")
        messages.append(str(caught.value))
    named = ", ".join(f"m{i:02d}" for i in range(20))
    assert [
        "unknown model 'gpt-5'; known: a, b",
        f"unknown model 'gpt-5'; known: {named} and 5 more (GET /v1/prices)",
    ] == messages


def test_price_table_is_a_read_only_copy() -> None:
    """A table is a Mapping that neither changes with its source nor accepts assignment."""
    source = {"m": ModelPrice(1, 2)}
    table = PriceTable(source)
    source["n"] = ModelPrice(3, 4)
    assert (["m"], True) == (list(table), isinstance(table, Mapping))
    with pytest.raises(TypeError):
        table["n"] = ModelPrice(3, 4)  # type: ignore[index]


def test_estimate_basis_names_the_model_and_tokens() -> None:
    """The basis recorded with a reserve says which model and token counts made the estimate."""
    assert "model=m;input_tokens=3;max_output_tokens=4" == estimate_basis("m", 3, 4)


# -- files ----------------------------------------------------------------------------------

GOOD_TOML = """
[models."gpt-x"]
input_micro_per_mtok = 2_500_000
output_micro_per_mtok = 10_000_000

[models.small]
input_micro_per_mtok = 0
output_micro_per_mtok = 1
"""
GOOD_JSON = {
    "models": {
        "gpt-x": {"input_micro_per_mtok": 2_500_000, "output_micro_per_mtok": 10_000_000},
        "small": {"input_micro_per_mtok": 0, "output_micro_per_mtok": 1},
    }
}


def test_toml_and_json_files_load_the_same_table(tmp_path: Path) -> None:
    """The same prices in TOML and JSON load into equal tables."""
    (tmp_path / "p.toml").write_text(GOOD_TOML)
    (tmp_path / "p.json").write_text(json.dumps(GOOD_JSON))
    from_toml, from_json = load_prices(tmp_path / "p.toml"), load_prices(tmp_path / "p.json")
    assert dict(from_toml) == dict(from_json)
    assert ModelPrice(2_500_000, 10_000_000) == from_toml.price("gpt-x")


def model_entry(**fields: object) -> dict[str, object]:
    return {"models": {"gpt-x": {"input_micro_per_mtok": 1, "output_micro_per_mtok": 2, **fields}}}


@pytest.mark.parametrize(
    ("document", "expected_words"),
    [
        ({"models": {}, "currency": "usd"}, ["unknown top-level", "currency"]),
        ({"models": {}}, ["non-empty"]),
        (model_entry(cached_micro_per_mtok=3), ["gpt-x", "cached_micro_per_mtok"]),
        ({"models": {"gpt-x": {"input_micro_per_mtok": 1}}}, ["gpt-x", "missing", "output_micro_per_mtok"]),
        (model_entry(input_micro_per_mtok=1.5), ["gpt-x", "input_micro_per_mtok", "integer"]),
        (model_entry(output_micro_per_mtok="2"), ["gpt-x", "output_micro_per_mtok", "integer"]),
        (model_entry(output_micro_per_mtok=True), ["gpt-x", "output_micro_per_mtok", "integer"]),
        (model_entry(input_micro_per_mtok=-1), ["gpt-x", "input_micro_per_mtok", "between"]),
        (model_entry(input_micro_per_mtok=MAX_PRICE_MICRO_PER_MTOK + 1), ["gpt-x", "input_micro_per_mtok"]),
        ({"models": {"has space": {"input_micro_per_mtok": 1, "output_micro_per_mtok": 1}}}, ["has space"]),
        ({"models": {"gpt-x": 5}}, ["gpt-x", "table"]),
    ],
)
def test_bad_documents_are_config_errors_naming_the_problem(
    tmp_path: Path, document: dict[str, object], expected_words: list[str]
) -> None:
    """Unknown keys, missing or non-integer or out-of-range fields: a ConfigError naming model and field."""
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError) as caught:
        load_prices(path)
    message = str(caught.value)
    assert [] == [word for word in [str(path), *expected_words] if word not in message]


@pytest.mark.parametrize(
    ("name", "content", "expected_word"),
    [
        ("p.toml", "[models\n", "not valid TOML"),
        ("p.json", "{", "not valid JSON"),
        ("p.yaml", "models: {}", ".toml or .json"),
        ("p.json", b"\xff\xfe", "not valid JSON"),
    ],
)
def test_unparsable_files_are_config_errors(
    tmp_path: Path, name: str, content: str | bytes, expected_word: str
) -> None:
    """A file that does not parse, or has an unknown extension, is a ConfigError naming it."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=expected_word):
        load_prices(path)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A price file that does not exist stops startup rather than falling back to defaults."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_prices(tmp_path / "absent.toml")


def test_parse_prices_rejects_a_non_table() -> None:
    """A document that is not a table at all is refused."""
    with pytest.raises(ConfigError, match="models"):
        parse_prices([1, 2])


def test_default_table_loads_with_positive_integer_prices() -> None:
    """The shipped table is package data, loads through the strict parser and prices every model."""
    table = default_prices()
    assert True is resources.files("tollway").joinpath("data", "prices.toml").is_file()
    assert True is (len(table) >= 5)
    assert [] == [
        model for model, price in table.items() if price.input_micro_per_mtok <= 0 or price.output_micro_per_mtok <= 0
    ]
