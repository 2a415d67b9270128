"""The README's library example runs as written and prints what the README says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def example(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- readme-example: {name} -->\n```python\n(.*?)```", text, re.DOTALL)
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
