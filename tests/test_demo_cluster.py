"""``tollway demo --cluster`` end to end: a real run, short, ending with a clean conservation verdict."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e_support import clean_environment, tollway_argv


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_cluster_demo_kills_a_node_and_ends_clean(tmp_path: Path) -> None:
    """Three nodes, one killed: its shards move, every pair is finalized once, the verdict is clean, exit 0."""
    done = subprocess.run(
        tollway_argv("demo", "--cluster", "--seconds", "6", "--data-dir", str(tmp_path / "demo")),
        capture_output=True,
        text=True,
        env={**clean_environment(), "COLUMNS": "200"},
        timeout=230,
        check=False,
    )
    assert 0 == done.returncode, done.stdout + done.stderr
    assert "kill -9 node-2" in done.stdout
    assert "conservation verdict: CLEAN" in done.stdout
    shard_maps = [line for line in done.stdout.splitlines() if " │ " in line]
    assert "node-2:" in shard_maps[0]
    assert "node-2:" not in shard_maps[-1]  # its shards moved to the survivors
