"""Run every ``bench/bench_*.py`` in turn, each in its own process, and report which failed.

    python bench/run_all.py [--quick] [-- extra args passed to every benchmark]

Each benchmark prints its own environment line and Markdown table; ``--quick`` is passed on
to those that accept it. The exit status is 1 when any benchmark failed (an error, or one of
its correctness checks), 0 otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def benchmarks(folder: Path = BENCH_DIR) -> list[Path]:
    """The benchmark scripts, in name order."""
    return sorted(folder.glob("bench_*.py"))


#: Options every script built on ``common.add_common_args`` has.
COMMON_OPTIONS = ("--quick", "--repeats", "--threads")


def accepts(script: Path, option: str) -> bool:
    """Does ``script`` declare ``option`` (read from its source, without starting it)?"""
    source = script.read_text(encoding="utf-8")
    return f'"{option}"' in source or (option in COMMON_OPTIONS and "common.add_common_args(" in source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that have it")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="arguments after -- go to every benchmark")
    args = parser.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    failed: list[str] = []
    for script in benchmarks():
        command = [sys.executable, str(script), *extra]
        if args.quick and accepts(script, "--quick"):
            command.append("--quick")
        print(f"\n## {script.name}\n", flush=True)
        t0 = time.perf_counter()
        status = subprocess.call(command)
        print(f"\n({script.name}: exit status {status}, {time.perf_counter() - t0:.0f} s)", flush=True)
        if status != 0:
            failed.append(script.name)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
        return 1
    print("\nall benchmarks finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
