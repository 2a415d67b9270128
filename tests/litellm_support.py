"""Real processes for the LiteLLM tests: the test upstream, LiteLLM proxies with tollway's callback, ``tollway serve``.

The LiteLLM proxy runs from its own venv, ``.venv-litellm`` at the repository root, which
``make test`` (``make litellm-proxy``) builds: ``litellm[proxy]`` requires ``rich<14`` and the dev
tools require ``rich>=14.2``, so the proxy cannot live in the test venv. The test venv has
``litellm`` itself (no proxy extra), for token counts and the direct ``acompletion`` tests.

A :class:`Stack` is started once per test module (a sync, module-scoped fixture drives it with its
own event loop): the upstream (``tests.litellm_upstream``), one ``tollway serve`` whose price
table is :data:`PRICES` (whole micro-USD per token, so every charge is an exact integer), and
the proxies the module asks for, started side by side (each takes ~10 s of CPU to start). Every
process logs into the module's directory; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import httpx2
import litellm  # tests/conftest.py made it use its bundled cost map (offline)
import openai
import pytest

from tests.e2e_support import LOOPBACK, POLL_S, Process, ProcessFailed, Serve, sdk
from tollway.client import AsyncClient, Entry

REPO: Final = Path(__file__).resolve().parent.parent
PROXY_BIN: Final = REPO / ".venv-litellm" / "bin" / "litellm"
PROXY_START_TIMEOUT_S: Final = 120.0
MASTER_KEY: Final = "sk-tollway-tests-5b1f0c9e8d7a6b5c4d3e2f1a0b9c8d7e"
SETTLE_TIMEOUT_S: Final = 20.0
PRICES: Final = {"gpt-4o-mini": (1_000_000, 2_000_000), "gpt-4o": (3_000_000, 6_000_000)}
"""Model → (input, output) micro-USD per 1M tokens: 1 and 2 micro per token, 3 and 6 for the fallback."""
UPSTREAM_MODELS: Final = {"gpt-4o-mini": "up-mini", "gpt-4o": "up-big"}
ACCOUNT_FIELD: Final = "tollway_account"

CALLBACK_MODULE: Final = """\
import os

from litellm.integrations.custom_logger import CustomLogger

from tollway.integrations.litellm import TollwayBilling

ttl = os.environ.get("BILLING_TTL_S")
billing = TollwayBilling(
    os.environ["BILLING_URL"],
    os.environ["BILLING_TOKEN"],
    account_from="metadata:tollway_account",
    ttl_s=int(ttl) if ttl else None,
)


class Noop(CustomLogger):
    \"\"\"The hooks TollwayBilling overrides, doing nothing: what LiteLLM's callback machinery costs.\"\"\"

    async def async_pre_call_hook(self, user_api_key_dict, cache, data, call_type):
        return data

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        return None

    async def async_pre_call_deployment_hook(self, kwargs, call_type):
        return None

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):
        return None

    async def async_post_call_failure_hook(
        self, request_data, original_exception, user_api_key_dict, traceback_str=None
    ):
        return None

    async def async_post_call_streaming_iterator_hook(self, user_api_key_dict, response, request_data):
        async for item in response:
            yield item


noop = Noop()
"""
CALLBACKS: Final = {"billing": "tollway_billing.billing", "noop": "tollway_billing.noop"}
"""The callback of a proxy's config: tollway's, or one with empty hooks (the benchmark's comparison)."""


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def prices_toml() -> str:
    """:data:`PRICES` as a tollway price file."""
    return "".join(
        f'[models."{model}"]\ninput_micro_per_mtok = {p_in}\noutput_micro_per_mtok = {p_out}\n\n'
        for model, (p_in, p_out) in PRICES.items()
    )


def charge(model: str, input_tokens: int, output_tokens: int) -> int:
    """tollway's actual charge for the tokens: ``floor((in × p_in + out × p_out) / 1e6)``."""
    p_in, p_out = PRICES[model]
    return (input_tokens * p_in + output_tokens * p_out) // 1_000_000


def proxy_config(upstream_url: str, *, callback: str | None = "billing") -> str:
    """A proxy config: the two models on the upstream, one retry, a fallback from the small one to the big one.

    ``callback``: ``billing`` (tollway's), ``noop`` (empty hooks) or None (the bare proxy): the
    last two are the benchmark's comparisons.
    """
    models = "".join(
        f"  - model_name: {name}\n"
        f"    litellm_params: {{model: openai/{upstream}, api_base: '{upstream_url}/v1', api_key: none}}\n"
        for name, upstream in UPSTREAM_MODELS.items()
    )
    return (
        f"model_list:\n{models}"
        "litellm_settings:\n"
        + (f"  callbacks: {CALLBACKS[callback]}\n" if callback is not None else "")
        + "  num_retries: 1\n  request_timeout: 60\n"
        "router_settings:\n  num_retries: 1\n  fallbacks: [{'gpt-4o-mini': ['gpt-4o']}]\n"
        f"general_settings:\n  master_key: {MASTER_KEY}\n"
    )


class Upstream:
    """``python -m tests.litellm_upstream --port 0``."""

    def __init__(self, log_dir: Path) -> None:
        argv = [sys.executable, "-m", "tests.litellm_upstream", "--port", "0"]
        self.process = Process("upstream", argv, log_dir, {"PYTHONPATH": str(REPO)})
        self.url = ""

    async def ready(self) -> None:
        """Wait for its URL."""
        line = await self.process.wait_for_output("upstream on ")
        self.url = line.split("upstream on ", 1)[1].strip()

    async def hits(self) -> dict[str, int]:
        """Chat requests received: ``total`` and by upstream model."""
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"{self.url}/admin/hits")
        counts: dict[str, int] = response.json()
        return counts


class Proxy:
    """``litellm --config config.yaml`` from ``.venv-litellm`` with the callback module beside its config."""

    def __init__(
        self, name: str, log_dir: Path, upstream_url: str, billing: tuple[str, str], options: Mapping[str, Any]
    ) -> None:
        ttl_s = options.get("ttl_s")
        if not PROXY_BIN.exists():
            pytest.fail(f"no LiteLLM proxy at {PROXY_BIN}: run `make litellm-proxy` (make test builds it)")
        work = log_dir / name
        work.mkdir()
        (work / "config.yaml").write_text(proxy_config(upstream_url, callback=options.get("callback", "billing")))
        (work / "tollway_billing.py").write_text(CALLBACK_MODULE)
        self.port = free_port()
        env = {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "BILLING_URL": billing[0],
            "BILLING_TOKEN": billing[1],
            "NO_PROXY": "*",
            **({"BILLING_TTL_S": str(ttl_s)} if ttl_s is not None else {}),
        }
        argv = [str(PROXY_BIN), "--config", "config.yaml", "--host", LOOPBACK, "--port", str(self.port)]
        self.process = Process(name, argv, work, env)
        self.url = f"http://{LOOPBACK}:{self.port}"

    async def ready(self) -> None:
        """Wait until ``/health/liveliness`` answers 200."""
        deadline = time.monotonic() + PROXY_START_TIMEOUT_S
        async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{self.url}/health/liveliness")).status_code == 200:
                        return
                if self.process.popen.poll() is not None or time.monotonic() > deadline:
                    raise ProcessFailed(f"LiteLLM proxy not ready at {self.url}: {self.process.describe()}")
                await asyncio.sleep(POLL_S * 4)

    def openai(self, *, timeout_s: float = 60.0, connections: int = 400) -> openai.AsyncOpenAI:
        """An ``openai`` client of this proxy: no retries of its own, a pool for bursts."""
        limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
        http = httpx2.AsyncClient(limits=limits, timeout=timeout_s, trust_env=False)  # openai's own httpx
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=MASTER_KEY, max_retries=0, http_client=http)


@dataclass
class Stack:
    """The processes of one test module and the tokens of its tollway."""

    upstream: Upstream
    serve: Serve
    proxies: list[Proxy] = field(default_factory=list)
    admin_token: str = ""
    gateway_token: str = ""

    def gateway(self) -> AsyncClient:
        """An SDK client with the gateway token."""
        return sdk(self.serve.url, self.gateway_token)

    def admin(self) -> AsyncClient:
        """An SDK client with the admin token."""
        return sdk(self.serve.url, self.admin_token)


def _stack(log_dir: Path, durability: str) -> Stack:
    """The upstream and ``tollway serve`` spawned (not ready yet)."""
    (log_dir / "prices.toml").write_text(prices_toml())
    env = {"TOLLWAY_PRICING_FILE": str(log_dir / "prices.toml"), "TOLLWAY_DURABILITY": durability}
    return Stack(Upstream(log_dir), Serve(log_dir / "tollway-data", log_dir, "serve", env=env))


async def _start(stack: Stack, log_dir: Path, proxies: Mapping[str, Mapping[str, Any]]) -> None:
    await asyncio.gather(stack.upstream.ready(), stack.serve.ready())
    stack.admin_token, stack.gateway_token = stack.serve.printed_token("admin"), stack.serve.printed_token("gateway")
    for name, options in proxies.items():
        billing_url = str(options.get("billing_url", stack.serve.url))
        upstream_url = stack.upstream.url
        stack.proxies.append(Proxy(name, log_dir, upstream_url, (billing_url, stack.gateway_token), options))
    await asyncio.gather(*(proxy.ready() for proxy in stack.proxies))


async def _stop(stack: Stack) -> list[int]:
    for proxy in stack.proxies:
        proxy.process.kill()
    with contextlib.suppress(ProcessFailed):
        await stack.upstream.process.stop(signal.SIGTERM, timeout_s=5.0)
    stack.upstream.process.kill()
    return await stack.serve.close()


@contextlib.contextmanager
def running_stack(
    log_dir: Path, proxies: Mapping[str, Mapping[str, Any]], *, durability: str = "none"
) -> Iterator[Stack]:
    """A started :class:`Stack` (for a module-scoped fixture); every process is stopped afterwards.

    ``proxies``: name → options (``billing_url``, ``ttl_s``, ``callback``). ``durability``: tollway's
    WAL setting (``none`` for the tests; the benchmark uses ``fsync``).
    """
    with asyncio.Runner() as runner:
        stack = _stack(log_dir, durability)
        try:
            runner.run(_start(stack, log_dir, proxies))
            yield stack
        finally:
            left = runner.run(_stop(stack))
    assert [] == left, "embedded redis-server still running after tollway serve stopped"


async def settled(client: AsyncClient, account_id: str, timeout_s: float = SETTLE_TIMEOUT_S) -> list[Entry]:
    """The account's entries once none is held any more (LiteLLM logs success after answering)."""
    deadline = time.monotonic() + timeout_s
    while True:
        entries = [entry async for entry in client.iter_entries(account_id)]
        if all(entry.state != "RESERVE_HELD" for entry in entries):
            return entries
        assert time.monotonic() < deadline, f"holds still open after {timeout_s} s: {entries}"
        await asyncio.sleep(POLL_S)


def ask(text: str, account_id: str | None, **extra: Any) -> dict[str, Any]:
    """Keyword arguments of a chat completion whose last message is ``text``, billed to ``account_id``."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": text}], **extra}
    body.setdefault("model", "gpt-4o-mini")
    if account_id is not None:
        body["extra_body"] = {"metadata": {ACCOUNT_FIELD: account_id}}
    return body


def input_tokens(text: str, model: str = "gpt-4o-mini") -> int:
    """The input tokens LiteLLM counts for a one-message request (what the callback reserves for)."""
    count: int = litellm.token_counter(model=model, messages=[{"role": "user", "content": text}])
    return count


def self_counting(prefix: str) -> tuple[str, int]:
    """A message ``"<prefix> in=K"`` whose counted input tokens are K (so the upstream reports what was reserved)."""
    for tokens in range(1, 200):
        text = f"{prefix} in={tokens}"
        if input_tokens(text) == tokens:
            return text, tokens
    raise AssertionError(f"no self-counting message for {prefix!r}")
