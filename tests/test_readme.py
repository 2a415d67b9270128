"""The README's examples run as written: the library example and the HTTP walk-through."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


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


@pytest.mark.slow
def test_http_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """The five-minute walk-through works with a real ``tollway serve``: replay, balance, clean audit."""
    script = example("walkthrough", "sh").replace("PORT=8080", f"PORT={free_port()}")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == result.returncode, result.stdout + result.stderr
    assert '"replayed":true' in result.stdout.replace(" ", "")
    assert '"available_micro":"' in result.stdout
    assert "Verdict: CLEAN" in result.stdout
