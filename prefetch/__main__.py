"""Command line: ``python -m prefetch demo``, ``python -m prefetch doctor``, ``python -m prefetch profile``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefetch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="the seed's example, then a CPU-heavy pipeline timed against the plain generator")
    check = commands.add_parser("doctor", help="check /dev/shm, open files, threads, cores: what can go wrong")
    check.add_argument("--ray", action="store_true", help="also check a Ray setup for executor='ray'")
    check.add_argument("--address", default=None, help="the Ray cluster to check (default: RAY_ADDRESS, or local)")
    sweep = commands.add_parser("profile", help="sweep worker counts on your pipeline: module:factory(workers=N)")
    sweep.add_argument("factory", help="module:function returning a prefetch.Loader for a `workers` keyword")
    sweep.add_argument("--workers", default="0,1,2,4", help="comma-separated worker counts (default 0,1,2,4)")
    sweep.add_argument("--batches", type=int, default=50, help="batches timed per run (default 50)")
    sweep.add_argument("--rounds", type=int, default=3, help="runs per worker count, interleaved (default 3)")
    args = parser.parse_args(argv)
    if args.command == "profile":
        import os

        from .profile import load_factory, profile

        sys.path.insert(0, os.getcwd())
        counts = [int(w) for w in args.workers.split(",") if w.strip()]
        print(profile(load_factory(args.factory), workers=counts, batches=args.batches, rounds=args.rounds))
    if args.command == "doctor":
        from .doctor import doctor

        report = doctor()
        if args.ray:
            from .ray_executor.doctor import ray_findings

            report.findings.extend(ray_findings(args.address))
        print(report)
        return 0 if report.ok else 1
    if args.command == "demo":
        from .demo import main as demo

        demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
