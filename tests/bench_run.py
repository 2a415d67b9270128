"""Run one of ``bench/``'s scripts as a user would (without ``TOLLWAY_*`` settings) and read its JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def run_bench(
    script: str, *args: str, timeout_s: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python bench/<script> <args>``, its output captured; the environment's ``TOLLWAY_*`` settings left out."""
    return subprocess.run(
        [sys.executable, str(BENCH_DIR / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={key: value for key, value in os.environ.items() if not key.startswith("TOLLWAY_")},
        cwd=cwd,
        check=False,
    )


def bench_report(script: str, *args: str, timeout_s: float = 120, cwd: Path | None = None) -> dict[str, Any]:
    """The JSON report ``python bench/<script> <args>`` prints (the run must succeed)."""
    done = run_bench(script, *args, timeout_s=timeout_s, cwd=cwd)
    assert 0 == done.returncode, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def quick_report(script: str, data_dir: Path, timeout_s: float = 120) -> dict[str, Any]:
    """``python bench/<script> --quick --json --data-dir <data_dir>``: its report (the run must succeed)."""
    return bench_report(script, "--quick", "--json", "--data-dir", str(data_dir), timeout_s=timeout_s)
