"""Run one of ``bench/``'s scripts in quick mode, as a user would, and read its JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def quick_report(script: str, data_dir: Path, timeout_s: float = 120) -> dict[str, Any]:
    """``python bench/<script> --quick --json --data-dir <data_dir>``: its report (the run must succeed)."""
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / script), "--quick", "--json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert 0 == done.returncode, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report
