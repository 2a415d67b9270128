"""A/B runs of ``bench/http.py``: arms take turns, every report is kept, a summary compares them.

On a VM whose speed drifts by tens of per cent within minutes (bench/README.md, "The maximum,
measured again"), one run per setting says little. Alternating the settings, several runs
each, and comparing every run's figures is how the comparisons in bench/README.md were made;
this script does it in one command::

    python bench/ab.py --runs 3 --arm base= --arm nice0="--setting redis_nice=0" -- --curve 0.5

Each ``--arm NAME=ARGS`` names one arm; ``ARGS`` (split as a shell would) go to ``bench/http.py``
for that arm's runs, after the common arguments given after ``--``. ``bench/http.py`` always gets
``--json``. Runs go A, B, A, B, …, so a drift of the machine touches every arm alike. Each report
is saved as ``<out>/<arm>-<n>.json`` (its stderr beside it as ``.err``); the summary (``--json``
for one JSON object) gives, per arm and figure, every run's value and their median. A failed run
is reported and the others go on; the exit status is 1 if any failed.

``--src NAME=DIR`` runs arm ``NAME`` on another version of the code: ``DIR`` is a ``src``
directory (``git archive <commit> src | tar -x -C <dir>``, then ``<dir>/src``), put first on
``PYTHONPATH`` for that arm's runs (the benchmark, its server and its token command alike)::

    python bench/ab.py --runs 3 --arm before= --arm now= --src before=/tmp/before/src
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

HTTP_BENCH: Final = Path(__file__).resolve().parent / "http.py"


def _path(*keys: str | int) -> Callable[[dict[str, Any]], Any]:
    def get(report: dict[str, Any]) -> Any:
        value: Any = report
        for key in keys:
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                return None
        return value

    return get


def _core_busy(phase: dict[str, Any] | None) -> float | None:
    """CPU seconds per second of the server and its children (the embedded Redis, the sync helper)."""
    server = (phase or {}).get("server_cpu_busy")
    children = (phase or {}).get("server_children_cpu_busy")
    return None if server is None or children is None else round(server + children, 3)


def _busy(phase: str) -> Callable[[dict[str, Any]], Any]:
    return lambda report: _core_busy(report.get(phase))


FIGURES: Final[dict[str, Callable[[dict[str, Any]], Any]]] = {
    "pairs_per_s": _path("pairs_per_s"),
    "ratio": _path("ratio"),
    "reserve_p50_ms": _path("reserve_p50_ms"),
    "reserve_p99_ms": _path("reserve_p99_ms"),
    "open_loop.start_lag_p99_ms": _path("open_loop", "start_lag_p99_ms"),
    "open_loop.core_busy": _busy("open_loop"),
    "open_loop.server_cpu_us_per_pair": _path("open_loop", "server_cpu_us_per_pair"),
    "billing.server_cpu_us_per_request": _path("billing", "server_cpu_us_per_request"),
    "open_loop.wal_events_per_batch": _path("open_loop", "wal_events_per_batch"),
    "max_again.drift": _path("max_again", "drift"),
    "ceiling.idle_cost_ratio.3ms": _path("ceiling", "idle_cost_ratio", "3ms"),
    "ceiling.slow_share": _path("ceiling", "slow_share"),
}
"""The figures the summary compares: name → how to read it from a report (None when absent)."""


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """The summary's figures of one ``bench/http.py`` report, with each ``--curve`` phase's p99 and core."""
    out = {name: read(report) for name, read in FIGURES.items()}
    for point in report.get("open_loop_curve") or []:
        share = f"{point.get('share'):g}"
        out[f"curve.{share}.reserve_p99_ms"] = point.get("reserve_p99_ms")
        out[f"curve.{share}.core_busy"] = _core_busy(point)
    return out


def _median(values: list[Any]) -> float | None:
    numbers = [value for value in values if isinstance(value, int | float) and not isinstance(value, bool)]
    return round(statistics.median(numbers), 3) if numbers else None


def summarize(reports: dict[str, list[dict[str, Any] | None]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per arm and figure: every run's value (None for a failed run or a missing figure) and the median."""
    names: list[str] = []
    read = {arm: [None if report is None else figures(report) for report in runs] for arm, runs in reports.items()}
    for runs in read.values():
        for run in runs:
            names.extend(name for name in run or {} if name not in names)
    return {
        arm: {
            name: {
                "values": (values := [None if run is None else run.get(name) for run in runs]),
                "median": _median(values),
            }
            for name in names
        }
        for arm, runs in read.items()
    }


@dataclass(frozen=True)
class Arm:
    """One side of the comparison: a name and the arguments ``bench/http.py`` gets for it."""

    name: str
    args: tuple[str, ...]


def parse_arm(text: str) -> Arm:
    """``NAME=ARGS``: a name of letters, digits, ``-``, ``_`` or ``.``, and shell-split arguments."""
    name, sep, args = text.partition("=")
    if not sep or not name or not all(c.isalnum() or c in "-_." for c in name):
        raise argparse.ArgumentTypeError(f"an arm is NAME=ARGS (NAME of letters, digits, -_.), not {text!r}")
    try:
        return Arm(name, tuple(shlex.split(args)))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"arm {name}: {exc}") from exc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    common: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, common = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="bench/ab.py",
        usage="%(prog)s [-h] --arm NAME=ARGS [--arm NAME=ARGS ...] [--runs N] [--out DIR] [--json] [-- HTTP_ARGS ...]",
        description="Alternate runs of bench/http.py with different arguments and compare their figures.",
        epilog="Arguments after -- go to every run of bench/http.py (for example --curve 0.5 or --quick).",
    )
    parser.add_argument(
        "--arm",
        type=parse_arm,
        action="append",
        required=True,
        metavar="NAME=ARGS",
        help='an arm: its name and its own bench/http.py arguments, e.g. nice0="--setting redis_nice=0" (repeat)',
    )
    parser.add_argument(
        "--src",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="run arm NAME on the code in DIR, a src directory (git archive <commit> src | tar -x -C <dir>) (repeat)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per arm, alternating (default 3)")
    parser.add_argument(
        "--out", type=Path, default=None, help="where the reports go (default: ./tollway-ab-<UTC time>)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    names = {arm.name for arm in args.arm}
    if len(names) != len(args.arm):
        parser.error("arm names must differ")
    args.srcs = {}
    for text in args.src:
        name, sep, directory = text.partition("=")
        if not sep or name not in names:
            parser.error(f"--src is NAME=DIR for one of the arms ({', '.join(sorted(names))}), not {text!r}")
        if not (Path(directory) / "tollway" / "__init__.py").is_file():
            parser.error(f"--src {name}: {directory} holds no tollway package (give the src directory)")
        args.srcs[name] = str(Path(directory).resolve())
    if "--json" in common:
        common.remove("--json")
    args.common = common
    if args.out is None:
        args.out = Path.cwd() / time.strftime("tollway-ab-%Y%m%dT%H%M%SZ", time.gmtime())
    return args


def run_once(arm: Arm, common: list[str], out: Path, number: int, src: str | None = None) -> dict[str, Any] | None:
    """One ``bench/http.py --json`` run of ``arm`` (on the code in ``src``, if given); its report, None if it failed."""
    command = [sys.executable, str(HTTP_BENCH), "--json", *common, *arm.args]
    env = os.environ | ({"PYTHONPATH": src} if src is not None else {})
    stem = out / f"{arm.name}-{number}"
    with stem.with_suffix(".err").open("w") as stderr:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, check=False, env=env)
    if done.returncode != 0:
        return None
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        return None
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.out.mkdir(parents=True, exist_ok=True)
    reports: dict[str, list[dict[str, Any] | None]] = {arm.name: [] for arm in args.arm}
    failed: list[str] = []
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("runs", total=args.runs * len(args.arm))
        for number in range(1, args.runs + 1):
            for arm in args.arm:
                progress.update(task, description=f"run {number} of {arm.name}")
                report = run_once(arm, args.common, args.out, number, args.srcs.get(arm.name))
                reports[arm.name].append(report)
                if report is None:
                    failed.append(f"{arm.name}-{number}")
                    console.print(f"[red]{arm.name} run {number} failed[/red]: see {args.out / arm.name}-{number}.err")
                progress.advance(task)
    return {
        "arms": {arm.name: {"args": list(arm.args), "src": args.srcs.get(arm.name)} for arm in args.arm},
        "common_args": args.common,
        "runs_per_arm": args.runs,
        "order": "alternating: " + ", ".join(arm.name for arm in args.arm) + ", then again",
        "out": str(args.out),
        "failed": failed,
        "summary": summarize(reports),
    }


def print_table(out: dict[str, Any]) -> None:
    console = Console()
    arms = list(out["arms"])
    runs = out["runs_per_arm"]
    table = Table(title=f"bench/http.py, {runs} run{'s' if runs != 1 else ''} per arm, alternating (median: each run)")
    table.add_column("figure", no_wrap=True)
    for arm in arms:
        table.add_column(f"{arm} {' '.join(out['arms'][arm]['args'])}".strip())
    names: dict[str, Any] = next(iter(out["summary"].values()), {})
    for name in names:
        cells = []
        for arm in arms:
            figure = out["summary"][arm].get(name, {"values": [], "median": None})
            values = ", ".join("-" if value is None else f"{value:g}" for value in figure["values"])
            cells.append(f"{'-' if figure['median'] is None else format(figure['median'], 'g')}: {values}")
        table.add_row(name, *cells)
    console.print(table)
    console.print(f"reports in {out['out']}" + (f"; failed: {', '.join(out['failed'])}" if out["failed"] else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
