"""A small OpenAI-compatible upstream for the LiteLLM tests: known usage, streaming, failures on demand, hit counts.

``python -m tests.litellm_upstream --port 0`` prints ``upstream on http://127.0.0.1:<port>`` and
serves ``POST /v1/chat/completions`` until SIGTERM or SIGINT. What a request gets is decided by
directives in its last message's text, so concurrent requests never share a script:

- ``out=N``: the answer has ``N`` completion tokens (default :data:`OUT_TOKENS_DEFAULT`); the
  usage reports :data:`PROMPT_TOKENS` prompt tokens, whatever was sent, so every charge is known;
- ``in=K``: report ``K`` prompt tokens instead.
- ``fail=S``: answer HTTP status ``S`` with an OpenAI error body, before any output.
- ``fail_first=K key=X``: the first ``K`` hits carrying key ``X`` fail with 500, the next ones answer.
- ``fail_model=M``: requests whose body names model ``M`` fail with 500 (the others answer).
- ``cut=N``: a stream sends ``N`` content chunks, then the connection is dropped (no usage, no ``[DONE]``).
- ``delay_ms=N``: wait ``N`` ms before answering (a call that is in flight for a while).
- ``chunk_ms=N``: a stream waits ``N`` ms before each content chunk (a slow stream a client can leave).

A stream sends one chunk per completion token and, when the request asked for
``stream_options.include_usage``, a final chunk with the usage. ``GET /admin/hits`` returns the
number of chat requests received, in total and by the ``model`` of the request body (hits that
failed on purpose included): the tests count them to prove a refused call never reached the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import time
from collections import Counter
from typing import Any, Final

from aiohttp import web

PROMPT_TOKENS: Final = 12
OUT_TOKENS_DEFAULT: Final = 20
DIRECTIVE: Final = re.compile(r"\b([a-z_]+)=([A-Za-z0-9_.:-]+)")


class Counts:
    """Hits by model (and ``total``), and hits by ``key`` directive."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.keyed: Counter[str] = Counter()


COUNTS: Final = web.AppKey("counts", Counts)


def directives(body: dict[str, Any]) -> dict[str, str]:
    """The ``name=value`` directives of the last message's text."""
    messages = body.get("messages") or [{}]
    content = messages[-1].get("content") or ""
    text = content if isinstance(content, str) else json.dumps(content)
    return dict(DIRECTIVE.findall(text))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The usage block of an answer."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _envelope(model: str, kind: str) -> dict[str, Any]:
    return {"id": "chatcmpl-upstream", "object": kind, "created": int(time.time()), "model": model}


def completion(model: str, in_tokens: int, out_tokens: int) -> dict[str, Any]:
    """A whole (non-streaming) chat completion of ``out_tokens`` words."""
    message = {"role": "assistant", "content": " ".join(["tok"] * out_tokens)}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    return {**_envelope(model, "chat.completion"), "choices": [choice], "usage": usage(in_tokens, out_tokens)}


def chunk(model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    """One stream chunk."""
    return {
        **_envelope(model, "chat.completion.chunk"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _error(status: int) -> web.Response:
    body = {"error": {"message": f"upstream failure {status} on demand", "type": "server_error", "code": str(status)}}
    return web.json_response(body, status=status)


async def _send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(payload)}\n\n".encode())


async def _stream(
    request: web.Request, body: dict[str, Any], tokens: tuple[int, int], script: dict[str, str]
) -> web.StreamResponse:
    in_tokens, out_tokens = tokens
    cut = int(script["cut"]) if "cut" in script else None
    pause_s = int(script.get("chunk_ms", 0)) / 1000
    model = str(body.get("model"))
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await _send(response, chunk(model, {"role": "assistant", "content": ""}, None))
    for index in range(out_tokens):
        if cut is not None and index == cut:
            assert request.transport is not None
            request.transport.abort()  # a broken stream: no final chunk, no usage, no [DONE]
            return response
        if pause_s:
            await asyncio.sleep(pause_s)
        await _send(response, chunk(model, {"content": "tok" if index == 0 else " tok"}, None))
    await _send(response, chunk(model, {}, "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        await _send(
            response,
            {**_envelope(model, "chat.completion.chunk"), "choices": [], "usage": usage(in_tokens, out_tokens)},
        )
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def chat(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    body = await request.json()
    counts = request.app[COUNTS]
    counts.hits["total"] += 1
    counts.hits[str(body.get("model"))] += 1
    script = directives(body)
    if "delay_ms" in script:
        await asyncio.sleep(int(script["delay_ms"]) / 1000)
    if "fail" in script:
        return _error(int(script["fail"]))
    if script.get("fail_model") == body.get("model"):
        return _error(500)
    if "fail_first" in script:
        key = script.get("key", "")
        counts.keyed[key] += 1
        if counts.keyed[key] <= int(script["fail_first"]):
            return _error(500)
    tokens = int(script.get("in", PROMPT_TOKENS)), int(script.get("out", OUT_TOKENS_DEFAULT))
    if body.get("stream"):
        return await _stream(request, body, tokens, script)
    return web.json_response(completion(str(body.get("model")), *tokens))


async def hits(request: web.Request) -> web.Response:
    """GET /admin/hits."""
    return web.json_response(dict(request.app[COUNTS].hits))


def make_app() -> web.Application:
    """The upstream application."""
    app = web.Application()
    app[COUNTS] = Counts()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/admin/hits", hits)
    return app


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    runner = web.AppRunner(make_app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server  # the bound port when 0 was asked
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    print(f"upstream on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    with contextlib.suppress(Exception):
        await runner.cleanup()


def main() -> None:
    """Parse the options and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args()
    asyncio.run(serve(options.host, options.port))


if __name__ == "__main__":
    main()
