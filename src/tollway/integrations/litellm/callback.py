"""The LiteLLM callback: reserve before the upstream call, commit the actual usage, release on failure.

One :class:`TollwayBilling` instance serves a LiteLLM proxy (``litellm_settings.callbacks``) or a
Python app calling ``litellm.acompletion`` (``litellm.callbacks = [billing]``). Per call:

1. **Reserve** before the upstream call, keyed by ``request_id = "litellm-<litellm_call_id>"``, so
   LiteLLM's own retries and fallbacks (which keep the call id) never take a second hold. The
   estimate is tollway's: the request's public model, its input tokens counted by
   ``litellm.token_counter`` and ``max_completion_tokens`` / ``max_tokens`` (else
   ``max_output_tokens_default``). The proxy reserves in ``async_pre_call_hook`` (once per
   request, before routing); a direct ``acompletion`` reserves in
   ``async_pre_call_deployment_hook``. Short funds raise :class:`BillingRefused` (402, tollway's
   error body) and the upstream is never called.
2. **Commit** on LiteLLM's success event with the answer's ``usage`` (a stream's final usage) and
   the model group that answered (a fallback is charged at its own price): the charge is
   ``floor((input × p_in + output × p_out) / 1e6)`` from tollway's price table, nothing else.
3. **Release** (``pre_stream_failure``) when the call failed before any output: in the proxy on
   ``async_post_call_failure_hook`` (after LiteLLM gave up retrying), in direct use on the
   failure event.
4. **A stream broken midway, or a client that disconnects from a stream**, after output began,
   is committed for the input tokens plus the output tokens delivered so far (the delivered text
   counted by ``litellm.token_counter``): the client got them, and the charge stays reproducible
   from tokens. A non-streaming call whose client went away is committed when the upstream
   answers, as the work was done. This needs the proxy's stream hook; in direct use LiteLLM
   reports a stream broken midway as a failed call, and its hold is released (not charged).
5. **tollway unreachable** at reserve time: the call is refused with 503
   ``billing_unavailable`` (fail closed, no unbilled upstream call) unless
   ``on_unreachable="allow"``. A commit or release that cannot reach tollway is retried
   ``settle_attempts_max`` times, then logged; the hold then expires after its TTL and nothing is
   charged (as when the proxy dies mid-call).

The holds of calls in flight are kept in memory by call id (bounded by ``holds_max``); a replica
that dies leaves its holds to expire in tollway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import litellm
from fastapi import HTTPException
from litellm.integrations.custom_logger import CustomLogger

from tollway.client import ApiError, AsyncClient, ClientError, Entry, ServiceUnavailable, TransportFailure
from tollway.integrations.litellm.policy import (
    BILLED_CALL_TYPES,
    AccountSource,
    ConfigurationError,
    answered_model,
    delta_text,
    max_output_tokens,
    request_id,
    usage_of,
)

log = logging.getLogger("tollway.integrations.litellm")

MAX_OUTPUT_TOKENS_DEFAULT: Final = 4096
"""The output tokens reserved for a request without ``max_tokens``."""
SETTLE_DELAYS_S: Final = (0.2, 1.0, 3.0)
HOLDS_MAX_DEFAULT: Final = 100_000
ON_UNREACHABLE: Final = ("refuse", "allow")
HELD: Final = "RESERVE_HELD"


class BillingRefused(HTTPException, ClientError):
    """A call refused by billing: ``status_code`` and tollway's error ``body``.

    An ``HTTPException`` so that the LiteLLM proxy answers with that status and body; a
    :class:`tollway.client.ClientError` so that an app catches it with the SDK's other errors.
    """

    def __init__(self, status_code: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status_code=status_code, detail=dict(body), headers=dict(headers or {}) or None)
        self.body = dict(body)


@dataclass(slots=True)
class Hold:
    """A hold of a call in flight."""

    entry_id: str
    account_id: str
    model: str
    input_tokens: int
    by_proxy: bool  # taken by the proxy's pre-call hook: the proxy's failure hook settles it
    created_s: float
    delivered: list[str] = field(default_factory=list)  # stream text sent to the client so far


@dataclass(frozen=True, slots=True)
class Options:
    """The callback's settings (see :class:`TollwayBilling`)."""

    account: AccountSource
    max_output_tokens_default: int
    ttl_s: int | None
    on_unreachable: str
    holds_max: int


def _api_body(exc: ApiError) -> dict[str, Any]:
    return {"error": exc.code, "message": exc.message, **exc.details}


def _refusal(exc: ClientError) -> BillingRefused:
    """What the caller gets when tollway refused the hold, or could not be reached."""
    if isinstance(exc, ApiError) and not isinstance(exc, ServiceUnavailable):
        return BillingRefused(exc.status, _api_body(exc))
    body = {"error": "billing_unavailable", "message": f"billing is unavailable, the call was not made: {exc}"}
    retry = exc.retry_after_s if isinstance(exc, ServiceUnavailable) else None
    return BillingRefused(503, body, {"retry-after": str(retry)} if retry else None)


class TollwayBilling(CustomLogger):  # type: ignore[misc]  # LiteLLM is not type-checked (follow_imports = skip)
    """Prepaid billing for LiteLLM through a tollway service at ``url`` (a ``billing:gateway`` ``token``)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        account_from: str = "metadata:tollway_account",
        max_output_tokens_default: int = MAX_OUTPUT_TOKENS_DEFAULT,
        ttl_s: int | None = None,
        on_unreachable: str = "refuse",
        timeout_s: float = 5.0,
        connections_max: int = 200,
        holds_max: int = HOLDS_MAX_DEFAULT,
    ) -> None:
        super().__init__()
        if on_unreachable not in ON_UNREACHABLE:
            raise ConfigurationError(f"on_unreachable must be 'refuse' or 'allow', not {on_unreachable!r}")
        if max_output_tokens_default < 0 or holds_max < 1:
            raise ConfigurationError("max_output_tokens_default must be ≥ 0 and holds_max ≥ 1")
        account = AccountSource.parse(account_from)
        self.options = Options(account, max_output_tokens_default, ttl_s, on_unreachable, holds_max)
        self._url, self._token, self._timeout_s, self._connections = url, token, timeout_s, connections_max
        self._clients: dict[asyncio.AbstractEventLoop, AsyncClient] = {}
        self._holds: dict[str, Hold] = {}
        self._attempts: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the SDK client, one per event loop -----------------------------------------------------

    def _client(self) -> AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for stale in [known for known in self._clients if known.is_closed()]:
                del self._clients[stale]
            client = AsyncClient(self._url, self._token, timeout_s=self._timeout_s, connections_max=self._connections)
            self._clients[loop] = client
        return client

    async def aclose(self) -> None:
        """Close the SDK client of the running event loop."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    # -- reserve ------------------------------------------------------------------------------

    async def _reserve(self, key: object, data: Mapping[str, Any], by_proxy: bool) -> None:
        """Hold the estimate of call ``data`` (raises :class:`BillingRefused`); a call already held is left alone."""
        call_id = str(data.get("litellm_call_id") or "")
        if not call_id:  # LiteLLM always sets one; without it there is no idempotency key: fail closed
            raise BillingRefused(
                400, {"error": "billing_call_id_missing", "message": "the call has no litellm_call_id"}
            )
        if call_id in self._holds:
            return
        account_id = self.options.account.account(key, data)
        if account_id is None:
            body = {"error": "billing_account_missing", "message": "the request names no billing account"}
            raise BillingRefused(403, body)
        model = str(data.get("model") or "")
        input_tokens = litellm.token_counter(model=model, messages=data.get("messages") or [])
        output_tokens = max_output_tokens(data, self.options.max_output_tokens_default)
        attempt = self._attempts.get(call_id, 0)
        try:
            entry = await self._client().reserve(
                account_id,
                request_id(call_id, attempt),
                model=model,
                input_tokens=input_tokens,
                max_output_tokens=output_tokens,
                ttl_s=self.options.ttl_s,
                correlation_id=call_id[:128],
            )
        except TransportFailure as exc:
            if self.options.on_unreachable == "allow":
                log.warning("tollway unreachable, call %s allowed unbilled (on_unreachable=allow): %s", call_id, exc)
                return
            raise _refusal(exc) from exc
        except ClientError as exc:
            raise _refusal(exc) from exc
        self._keep(call_id, entry, model, input_tokens, by_proxy)

    def _keep(self, call_id: str, entry: Entry, model: str, input_tokens: int, by_proxy: bool) -> None:
        if entry.state != HELD:  # the same call id was settled before: never serve it unbilled
            body = {"error": "request_already_billed", "message": f"call {call_id} is already {entry.state}"}
            raise BillingRefused(409, {**body, "billing_entry_id": entry.billing_entry_id, "state": entry.state})
        if len(self._holds) >= self.options.holds_max:
            self._forget_oldest()
        self._holds[call_id] = Hold(
            entry.billing_entry_id, entry.account_id, model, input_tokens, by_proxy, time.time()
        )

    def _forget_oldest(self) -> None:
        """Drop the oldest hold from memory (tollway expires it after its TTL): the bound on ``holds_max``."""
        oldest = min(self._holds, key=lambda call_id: self._holds[call_id].created_s)
        log.warning("more than %d calls in flight: hold of call %s left to expire", self.options.holds_max, oldest)
        del self._holds[oldest]

    # -- settle ---------------------------------------------------------------------------------

    async def _settle(self, call_id: str, usage_in: int | None, usage_out: int | None, model: str | None) -> None:
        """Commit the tokens (None: release the hold) of call ``call_id``, once; retried while tollway is away."""
        hold = self._holds.pop(call_id, None)
        if hold is None:
            return
        client = self._client()
        for delay_s in (0.0, *SETTLE_DELAYS_S):
            await asyncio.sleep(delay_s)
            try:
                if usage_in is None or usage_out is None:
                    await client.release(hold.entry_id, "pre_stream_failure")
                else:
                    model_name = model or hold.model
                    await client.commit(hold.entry_id, input_tokens=usage_in, output_tokens=usage_out, model=model_name)
            except (TransportFailure, ServiceUnavailable) as exc:
                log.warning("settling call %s (entry %s) failed, will retry: %s", call_id, hold.entry_id, exc)
            except ApiError:
                log.exception("tollway refused to settle call %s (entry %s)", call_id, hold.entry_id)
                return
            else:
                return
        log.error("call %s (entry %s) left unsettled: its hold expires after its TTL", call_id, hold.entry_id)

    async def _settle_delivered(self, call_id: str) -> None:
        """A call that failed: release if nothing was delivered, else commit the tokens delivered so far."""
        hold = self._holds.get(call_id)
        if hold is None:
            return
        if not hold.delivered:
            await self._settle(call_id, None, None, None)
            return
        delivered = litellm.token_counter(model=hold.model, text="".join(hold.delivered))
        log.warning("call %s broke after output began: charged for %d delivered tokens", call_id, delivered)
        await self._settle(call_id, hold.input_tokens, delivered, hold.model)

    def _settle_later(self, call_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._settle_delivered(call_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- LiteLLM hooks: proxy ---------------------------------------------------------------

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: Any
    ) -> dict[str, Any]:
        """Proxy, before routing: reserve (or refuse the request)."""
        if str(call_type) in BILLED_CALL_TYPES:
            await self._reserve(user_api_key_dict, data, by_proxy=True)
        return data

    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: Any,
        traceback_str: str | None = None,
    ) -> None:
        """Proxy, after LiteLLM gave up (retries and fallbacks included): release, or charge what was delivered."""
        await self._settle_delivered(str(request_data.get("litellm_call_id") or ""))

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: AsyncIterator[Any], request_data: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        """Proxy, streaming: note the text delivered; a stream closed early (client gone) is settled for it."""
        call_id = str(request_data.get("litellm_call_id") or "")
        finished = False
        try:
            async for chunk in response:
                hold = self._holds.get(call_id)
                if hold is not None:
                    hold.delivered.append(delta_text(chunk))
                yield chunk
            finished = True
        finally:
            if not finished and call_id in self._holds:
                self._settle_later(call_id)

    # -- LiteLLM hooks: direct use and both ------------------------------------------------------

    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> None:
        """Direct ``acompletion``, just before the upstream call: reserve unless the proxy already did."""
        kind = getattr(call_type, "value", call_type)
        if str(kind) in BILLED_CALL_TYPES:
            await self._reserve(None, kwargs, by_proxy=False)

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """A call answered: commit its usage at the price of the model group that answered."""
        call_id = str(kwargs.get("litellm_call_id") or "")
        hold = self._holds.get(call_id)
        if hold is None:
            return
        usage = usage_of(response_obj)
        if usage is None:  # LiteLLM counts a stream's usage itself when the upstream sent none
            log.warning("call %s answered without usage: charged for its delivered output", call_id)
            await self._settle_delivered(call_id)
            return
        await self._settle(call_id, usage.input_tokens, usage.output_tokens, answered_model(kwargs, hold.model))

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """One attempt failed: in direct use, release (a retry reserves anew); the proxy waits for its failure hook."""
        call_id = str(kwargs.get("litellm_call_id") or "")
        hold = self._holds.get(call_id)
        if hold is None or hold.by_proxy:
            return
        self._attempts[call_id] = self._attempts.get(call_id, 0) + 1
        if len(self._attempts) > self.options.holds_max:
            self._attempts.pop(next(iter(self._attempts)))
        await self._settle_delivered(call_id)
