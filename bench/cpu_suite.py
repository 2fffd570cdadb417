"""Wall time of the smoke run (`trainer/run.py --preset smoke`) and of the test suite, on this machine.

Each is a fresh interpreter (a subprocess of this Python), as a user or CI runs them; the smoke run
writes into a new temporary folder every repeat, so it includes building its tiny models (a cold run).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Timing, base_parser, report  # noqa: E402

_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def run_timed(command: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done


def pytest_counts(output: str) -> dict[str, int]:
    """Counts from pytest's last summary line ('12 passed, 3 skipped in 80.1s')."""
    lines = [line for line in output.splitlines() if " in " in line and _SUMMARY.search(line)]
    return {kind: int(n) for n, kind in _SUMMARY.findall(lines[-1])} if lines else {}


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser("Time the smoke run and the test suite (CPU machine).")
    parser.add_argument("--what", choices=["smoke", "suite", "both"], default="both")
    parser.add_argument("--tests", default="tests", help="pytest target (default: the whole suite)")
    parser.set_defaults(repeats=3, warmup=0)
    args = parser.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    results: dict = {}
    rows: list[tuple[str, str]] = []
    jobs = []
    if args.what in ("smoke", "both"):
        jobs.append(("smoke", lambda out: [sys.executable, "trainer/run.py", "--preset", "smoke", "--no-progress",
                                           "--output", str(out)]))
    if args.what in ("suite", "both"):
        jobs.append(("suite", lambda out: [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", args.tests]))
    for name, command in jobs:
        timing, counts, failures = Timing(), {}, 0
        for _ in range(args.warmup + args.repeats):
            with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as tmp:
                seconds, done = run_timed(command(Path(tmp) / "out"), env)
            failures += done.returncode != 0
            if done.returncode != 0:
                print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            if name == "suite":
                counts = pytest_counts(done.stdout)
            timing.samples_ms.append(seconds * 1000.0)
        timing.samples_ms = timing.samples_ms[args.warmup:]
        results[name] = timing.summary() | {"command": " ".join(command(Path("<tmp>"))[1:]), "failed_runs": failures,
                                            "pytest_counts": counts or None}
        rows.append((name, timing.text("s", 1) + (f"  {counts}" if counts else "") + (f"  FAILED RUNS: {failures}" if failures else "")))
    return report("cpu_suite", args, torch.device("cpu"), rows, results)


if __name__ == "__main__":
    main()
