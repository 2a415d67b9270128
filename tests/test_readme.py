"""The README's examples run as written: the library example and the HTTP walk-through."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import get_args

import pytest

from tests.e2e_support import clean_environment
from tests.litellm_support import PROXY_BIN, Upstream
from tests.litellm_upstream import OUT_TOKENS_DEFAULT, PROMPT_TOKENS
from tollway.api.schemas import ReleaseRequest

README = Path(__file__).resolve().parent.parent / "README.md"
NEEDS_CURL = pytest.mark.skipif(
    shutil.which("curl") is None, reason="the README's shell examples call curl, which is not installed here"
)


def example(name: str, language: str = "python") -> str:
    text = README.read_text()
    match = re.search(rf"<!-- readme-example: {name} -->\n```{language}\n(.*?)```", text, re.DOTALL)
    assert match is not None, f"README has no example named {name}"
    return match.group(1)


def test_library_example_runs(tmp_path: Path) -> None:
    """The library example mints, reserves, commits and replays, printing the documented balance."""
    result = subprocess.run(
        [sys.executable, "-c", example("library")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    expected = "COMMITTED Account(available_micro=4987655, held_micro=0, charged_micro=12345, unsettled_micro=0)"
    assert expected == result.stdout.strip()
    assert (tmp_path / "tollway-data" / "wal").is_dir()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def path_without_tollway() -> str:
    """``PATH`` less every directory that holds a ``tollway`` command."""
    directories = os.environ["PATH"].split(os.pathsep)
    return os.pathsep.join(d for d in directories if d and not (Path(d) / "tollway").exists())


def fresh_shell_in_a_clone(clone: Path) -> dict[str, str]:
    """An environment as in a new shell after ``make demo``: ``clone/.venv`` is this one, nothing activated."""
    (clone / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    env = {**os.environ, "PATH": path_without_tollway()}
    env.pop("VIRTUAL_ENV", None)
    return env


def test_the_first_command_is_on_the_first_screen() -> None:
    """A newcomer reaches ``make demo`` within the README's first 40 lines."""
    lines = README.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("make demo"))
    assert (True, "<!-- readme-example: setup -->") == (first < 40, lines[first - 2])


def test_setup_activates_the_environment_the_walkthrough_needs() -> None:
    """The set-up block says how ``tollway`` gets on ``PATH`` after ``make demo``."""
    assert ". .venv/bin/activate" in example("setup", "sh")


@NEEDS_CURL
@pytest.mark.slow
def test_http_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """The five-minute walk-through works as written in a clone after ``make``: replay, balance, clean audit.

    It runs where the clone's ``.venv`` is (this environment) and with no ``tollway`` on ``PATH``,
    as in a new shell after ``make demo``: the walk-through itself must put it there.
    """
    script = example("walkthrough", "sh").replace("PORT=8080", f"PORT={free_port()}")
    env = fresh_shell_in_a_clone(tmp_path)
    code, stdout, stderr = run_script_in_own_group(script, tmp_path, env, 110.0)  # leaves no server behind
    assert 0 == code, stdout + stderr
    assert '"replayed":true' in stdout.replace(" ", "")
    assert '"available_micro":"' in stdout
    assert "Verdict: CLEAN" in stdout


class _Unready(BaseHTTPRequestHandler):
    """Another program on the walk-through's port: every request gets 503."""

    def do_GET(self) -> None:
        self.send_error(503)

    def log_message(self, *args: object) -> None:
        """Quiet."""


@NEEDS_CURL
def test_the_walkthrough_wait_ends_when_serve_cannot_start(tmp_path: Path) -> None:
    """Another program on the port: serve fails naming it, and the walk-through's readiness wait still ends.

    The program answers 503, so an unbounded ``until curl …/readyz`` would wait forever.
    """
    lines = example("walkthrough", "sh").splitlines(keepends=True)
    wait = next(i for i, line in enumerate(lines) if "/readyz" in line)
    script = "".join(lines[: wait + 1]) + "echo waited\n"
    env = fresh_shell_in_a_clone(tmp_path)
    with ThreadingHTTPServer(("127.0.0.1", 0), _Unready) as other:
        threading.Thread(target=other.serve_forever, daemon=True).start()
        port = other.server_address[1]
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script.replace("PORT=8080", f"PORT={port}")],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,  # the wait's own bound is 30 s
            check=False,
        )
        other.shutdown()
    assert (0, "waited\n") == (result.returncode, result.stdout), result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_the_walkthrough_names_release_and_its_reasons() -> None:
    """A reader learns that a release needs a ``reason`` and which values the API takes."""
    reasons = get_args(ReleaseRequest.model_fields["reason"].annotation)
    walkthrough = example("walkthrough", "sh")
    missing = [reason for reason in reasons if f'{{"reason": "{reason}"}}' not in walkthrough]
    assert (True, True, []) == (len(reasons) >= 2, "/release" in walkthrough, missing)


def test_the_terms_a_reader_meets_are_defined() -> None:
    """MicroUSD, credit units (and their rounding), USDC and the settlement service are explained."""
    text = " ".join(README.read_text().split())
    terms = text[text.index("**Terms.**") :][:1200]
    expected = ["**MicroUSD**", "**Credit units (CU)**", "rounded up", "**USDC**", "**settlement service**"]
    assert [] == [term for term in expected if term not in terms]


def run_script_in_own_group(script: str, cwd: Path, env: dict[str, str], timeout_s: float) -> tuple[int, str, str]:
    """Run ``script`` with bash in a new session; whatever it left running (or all of it, on timeout) is killed."""
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += f"\n(killed after {timeout_s} s)"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # a background process the script did not stop
    return process.returncode, stdout, stderr


@NEEDS_CURL
@pytest.mark.slow
async def test_litellm_example_runs_as_written(tmp_path: Path) -> None:
    """The "Use with LiteLLM" script: a real proxy with the callback, an answer, a 402, the charge, a clean audit."""
    upstream = Upstream(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "litellm").symlink_to(PROXY_BIN)  # the proxy's venv has litellm[proxy]
    try:
        await upstream.ready()
        script = example("litellm", "sh")
        script = script.replace("PORT=8080 PROXY_PORT=4000", f"PORT={free_port()} PROXY_PORT={free_port()}")
        script = script.replace("UPSTREAM=https://api.openai.com/v1", f"UPSTREAM={upstream.url}/v1")
        paths = [tmp_path / "bin", Path(sys.executable).parent, os.environ["PATH"]]
        env = clean_environment({"PATH": os.pathsep.join(map(str, paths)), "OPENAI_API_KEY": "sk-test"})
        code, stdout, stderr = await asyncio.to_thread(run_script_in_own_group, script, tmp_path, env, 150.0)
        hits = await upstream.hits()
    finally:
        upstream.process.kill()
    proxy_log = (tmp_path / "proxy.log").read_text()[-3000:] if (tmp_path / "proxy.log").exists() else ""
    assert 0 == code, stdout + stderr + proxy_log
    answer, refusal = stdout.split("\n200\n", 1)
    assert " ".join(["tok"] * OUT_TOKENS_DEFAULT) in answer
    assert '"insufficient_funds"' in refusal.split("\n402\n", 1)[0]
    charged = (PROMPT_TOKENS * 150_000 + OUT_TOKENS_DEFAULT * 600_000) // 1_000_000  # the shipped gpt-4o-mini price
    assert f'"held_micro":"0","unsettled_micro":"0","charged_micro":"{charged}"' in stdout.replace(" ", "")
    assert "Verdict: CLEAN" in stdout
    assert 1 == hits["total"]
