"""Schemathesis against ``/openapi.json`` of a real ``tollway serve``: no 5xx, every answer as the schema says.

Schemathesis's pytest loader for a schema behind a fixture (``schemathesis.pytest.from_fixture``)
reads ``request.node._nodeid``, which pytest 9 no longer has, so this test uses its Hypothesis
API instead: one strategy per operation (``APIOperation.as_strategy``), run with ``@given``
inside the test, against a service started once for the module.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from schemathesis.schemas import APIOperation

from tests.e2e_support import audit, sdk, serving
from tollway.client import ApiError

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to follow the embedded redis-server")

EXAMPLES_PER_OPERATION: Final = 40
FUNDED_ACCOUNT: Final = "acct-fuzz"
CHECKS: Final = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
]


@dataclass(frozen=True)
class Target:
    """The running service, an admin token for it, and real ids to aim path parameters at."""

    url: str
    admin_token: str
    path_parameters: dict[str, str]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One ``tollway serve`` for the module (standalone, embedded Redis), a funded account and a held entry.

    Afterwards it must stop cleanly on SIGTERM and ``tollway audit`` must find the ledger sound.
    """
    log_dir = tmp_path_factory.mktemp("fuzz")
    data = log_dir / "d"
    with asyncio.Runner() as runner:
        running = serving(data, log_dir, "serve")
        serve = runner.run(running.__aenter__())
        try:
            admin_token = serve.printed_token("admin")
            entry_id = runner.run(_prepare(serve.url, admin_token))
            yield Target(serve.url, admin_token, {"account_id": FUNDED_ACCOUNT, "billing_entry_id": entry_id})
            assert 0 == runner.run(serve.sigterm())
        finally:
            runner.run(running.__aexit__(None, None, None))
        result = runner.run(audit(data, log_dir))
    assert 0 == result.returncode, result.stdout + result.stderr


async def _prepare(url: str, admin_token: str) -> str:
    """Fund the account and hold an entry; the entry's id."""
    async with sdk(url, admin_token) as admin:
        await admin.credit(FUNDED_ACCOUNT, "fund", 10_000_000)
        held = await admin.reserve(FUNDED_ACCOUNT, "held-1", estimated_cost_micro=1_000)
        return held.billing_entry_id


Operation = APIOperation[Any, Any, Any, Any]
Plan = tuple[GenerationMode, dict[str, str]]


def _operations(url: str) -> list[Operation]:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert len(list(schema.get_all_operations())) == len(operations), "an operation of the schema did not load"
    return operations


def _fuzz(target: Target, operation: Operation, mode: GenerationMode, path_parameters: dict[str, str]) -> None:
    """``EXAMPLES_PER_OPERATION`` generated calls of ``operation``, each checked; raises on the first failure."""
    headers = {"Authorization": f"Bearer {target.admin_token}"}

    @given(case=operation.as_strategy(mode, path_parameters=path_parameters or None))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,  # the same cases every run: a failure here is a finding, never noise
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Case[Any]) -> None:
        case.call_and_validate(base_url=target.url, headers=headers, checks=CHECKS, timeout=30)

    run()


@pytest.mark.slow
def test_generated_requests_get_no_5xx_and_documented_answers(target: Target) -> None:
    """Positive and negative cases for every operation (random and real ids): no 5xx, every answer per schema."""
    failures = []
    for operation in _operations(target.url):
        names = {parameter.name for parameter in operation.path_parameters}
        real = {name: value for name, value in target.path_parameters.items() if name in names}
        plans: list[Plan] = [(mode, {}) for mode in GenerationMode]
        plans += [(GenerationMode.POSITIVE, real)] if real else []
        for mode, path_parameters in plans:
            try:
                _fuzz(target, operation, mode, path_parameters)
            except Unsatisfiable:
                assert GenerationMode.NEGATIVE == mode, operation.label  # no input at all: nothing to make invalid
            except (AssertionError, FailureGroup) as exc:  # collect every operation's failures
                failures.append(f"{operation.label} ({mode.value}, {path_parameters or 'generated ids'}): {exc}")
    assert [] == failures


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        pytest.param("18446744073709551616-0", 400, id="part-above-uint64"),
        pytest.param("18446744073709551615-18446744073709551615", 200, id="the-largest-id"),
    ],
)
async def test_poison_list_answers_4xx_or_an_empty_page_for_any_after_its_pattern_admits(
    target: Target, after: str, expected: int
) -> None:
    """An ``after`` the documented pattern admits is never a 5xx: 400 if Redis cannot take it, else an empty page."""
    async with sdk(target.url, target.admin_token) as admin:
        try:
            page = await admin.dead_letters(after=after)
        except ApiError as exc:
            status = exc.status
        else:
            status = 200 if [] == list(page.items) else -1
    assert expected == status
