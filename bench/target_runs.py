"""Issue 20's target cases, in three full bench runs back to back: one report per run.

    python bench/target_runs.py                      # 3 runs of the JPEG (default threads) and Keras targets
    python bench/target_runs.py --cases jpeg,keras,container --runs 3

Each run is one pytest session over the chosen cases (``bench/test_e2e.py``, ``bench/test_container.py``) with
``BENCH_RESULTS_NAME=<name>-run<N>`` (``--name``, default ``e2e-20``), so it writes
``bench/results/<name>-run<N>.md`` (the tables, with every round's paired ratio) and ``.json`` (every round's
result, per-batch times included). The rounds are ``BENCH_ROUNDS`` (default 5). In the JPEG case DataLoader runs
at num_workers=2 only, the target's reference (``BENCH_DATALOADER_WORKERS=2``): its default and best counts are in
the full suite's ``test_jpeg_training``. The container case needs root (a cgroup), or falls back to ``taskset``.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
# The pytest selection of each target case: the compute-bound JPEG loop and Keras fit at torch's default threads
# (the three-run targets), and the 1-CPU container.
CASES = {
    "jpeg": "test_e2e.py::test_jpeg_training[default]",
    "keras": "test_e2e.py::test_keras_fit[default]",
    "container": "test_container.py::test_jpeg_training_in_a_one_cpu_container",
}


def run_once(number: int, cases: list[str], extra: list[str], name: str = "e2e-20") -> int:
    """One full run of ``cases`` in a pytest session (results ``<name>-run<number>``); its exit code."""
    env = dict(os.environ, BENCH_RESULTS_NAME=f"{name}-run{number}")
    env.setdefault("BENCH_DATALOADER_WORKERS", "2")
    command = [sys.executable, "-m", "pytest", *(str(BENCH_DIR / CASES[c]) for c in cases)]
    command += ["--benchmark-enable", "-p", "no:cacheprovider", "-q", *extra]
    started = time.monotonic()
    done = subprocess.run(command, env=env, cwd=BENCH_DIR.parent, check=False)
    print(f"run {number}: exit {done.returncode} after {time.monotonic() - started:.0f} s", flush=True)
    return done.returncode


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", default="jpeg,keras", help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--name", default="e2e-20", help="results as bench/results/<name>-run<N>.md")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}: choose from {list(CASES)}")
    codes = [run_once(number, cases, args.pytest_args, args.name) for number in range(1, args.runs + 1)]
    return max(codes)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
