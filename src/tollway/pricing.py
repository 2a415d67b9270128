"""Price tables from files: TOML or JSON (chosen by extension), validated strictly.

The file has one top-level key, ``models``, mapping each model name to a table with exactly
``input_micro_per_mtok`` and ``output_micro_per_mtok`` (integer MicroUSD per 1,000,000 tokens)::

    [models."gpt-4o"]
    input_micro_per_mtok = 2_500_000
    output_micro_per_mtok = 10_000_000

Anything else — an unknown key, a missing field, a float, a string, a negative or oversized
price, an empty table, a file that does not parse — is a
:class:`~tollway.core.errors.ConfigError` naming the file, the model and the field. A bad price
file stops startup; there is never a silent fallback to the defaults.

:func:`default_prices` loads the table shipped with the package (``tollway/data/prices.toml``;
its figures are illustrative). The formulas live in :mod:`tollway.core.pricing`.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Final

from tollway.core.errors import ConfigError, InvalidInput
from tollway.core.pricing import ModelPrice, PriceTable, check_model_name

PRICE_FIELDS: Final = ("input_micro_per_mtok", "output_micro_per_mtok")
MAX_PRICE_FILE_BYTES: Final = 1 << 20
"""Largest price file accepted (1 MiB)."""
MAX_MODELS: Final = 10_000
"""Most models one price table may list."""
DEFAULT_PRICES_RESOURCE: Final = ("data", "prices.toml")
"""Where the default table lives inside the ``tollway`` package."""


def load_prices(path: Path | str) -> PriceTable:
    """Read and validate the price table at ``path`` (``.toml`` or ``.json``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ConfigError(f"{path}: a price file must end in .toml or .json")
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_PRICE_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the price file: {exc}") from exc
    if len(data) > MAX_PRICE_FILE_BYTES:
        raise ConfigError(f"{path}: the price file is larger than {MAX_PRICE_FILE_BYTES} bytes")
    return parse_prices_text(data, fmt=suffix[1:], source=str(path))


def parse_prices_text(data: bytes | str, *, fmt: str, source: str) -> PriceTable:
    """Parse ``data`` as ``fmt`` (``toml`` or ``json``) and validate it; ``source`` names it in errors."""
    if fmt not in ("toml", "json"):
        raise ConfigError(f"{source}: unknown price file format {fmt!r} (toml or json)")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        document: object = tomllib.loads(text) if fmt == "toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid {fmt.upper()}: {exc}") from exc
    return parse_prices(document, source=source)


def parse_prices(document: object, *, source: str = "price table") -> PriceTable:
    """Validate a parsed document ``{"models": {name: {field: int}}}`` into a :class:`PriceTable`."""
    if not isinstance(document, Mapping):
        raise ConfigError(f"{source}: the document must be a table with a 'models' key")
    unknown = sorted(set(document) - {"models"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level keys {unknown} (only 'models' is allowed)")
    models = document.get("models")
    if not isinstance(models, Mapping) or not models:
        raise ConfigError(f"{source}: 'models' must be a non-empty table of model prices")
    if len(models) > MAX_MODELS:
        raise ConfigError(f"{source}: {len(models)} models listed; at most {MAX_MODELS} are allowed")
    return PriceTable({model: _model_price(model, fields, source) for model, fields in models.items()})


def _model_price(model: object, fields: object, source: str) -> ModelPrice:
    """One model's price, or a ConfigError naming the model and the field."""
    try:
        name = check_model_name(model)
    except InvalidInput as exc:
        raise ConfigError(f"{source}: model {model!r}: {exc}") from exc
    if not isinstance(fields, Mapping):
        raise ConfigError(f"{source}: model {name!r}: must be a table with {' and '.join(PRICE_FIELDS)}")
    unknown = sorted(set(fields) - set(PRICE_FIELDS))
    if unknown:
        raise ConfigError(
            f"{source}: model {name!r}: unknown field {unknown[0]!r} (allowed: {', '.join(PRICE_FIELDS)})"
        )
    for field in PRICE_FIELDS:
        if field not in fields:
            raise ConfigError(f"{source}: model {name!r}: missing field {field!r}")
    try:
        return ModelPrice(fields[PRICE_FIELDS[0]], fields[PRICE_FIELDS[1]])
    except InvalidInput as exc:
        raise ConfigError(f"{source}: model {name!r}: field {exc.field!r}: {exc}") from exc


def default_prices() -> PriceTable:
    """The illustrative table shipped with the package (``tollway/data/prices.toml``)."""
    resource = resources.files("tollway").joinpath(*DEFAULT_PRICES_RESOURCE)
    return parse_prices_text(resource.read_bytes(), fmt="toml", source="tollway/" + "/".join(DEFAULT_PRICES_RESOURCE))
