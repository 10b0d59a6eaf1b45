"""Benchmark how fast the command line answers: listings, refusals and start-up, per command.

    python bench/bench_startup.py [--quick] [--repeats N] [--only NAME ...] [--compare OTHER/VolSegSlicer]

Every row starts a fresh Python process (``python -m volseg ...`` on this checkout's engine,
or ``python -c ...``) and waits for it to end, as a user or the Slicer panel does. Baseline:
``python -c "import torch"`` -- what every command used to pay before it could answer. The
rows: the interpreter alone, ``volseg --version``, ``models --json`` (what the Slicer panel runs
to fill its list), refusals of a mistyped option, an unknown model, a missing input, a bad
output extension and a text file given as checkpoint, ``inspect`` of that text file, and, for
comparison, what a real run imports before its first stage (``import volseg.pipeline``) and
``import torch, monai``.

Columns: median wall time of the process, its CPU time (user + system, from ``wait4``) and
its peak resident memory (``ru_maxrss``), each with its ratio to the baseline. Rounds are
interleaved (every row once, then again) after one untimed warm-up round that also fills the
page cache. Checks: each row's exit code and a piece of its expected output, and, once per row
in an untimed run under ``python -X importtime``, whether torch was imported: the rows that
must answer without torch fail their check if it was. A failed check: exit status 1.

``--compare FOLDER`` adds, after each ``volseg`` row, the same command run on another copy of
the engine (the ``VolSegSlicer`` folder of an older checkout, e.g. from ``git archive``), in
the same interleaved rounds: before/after in one table. Those rows check the exit code only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Column

ENGINE = common.REPO_ROOT / "VolSegSlicer"
BASELINE = "import torch (baseline)"


@dataclass(frozen=True)
class Case:
    """One command: its row name, arguments after the interpreter, expected exit code and output."""

    name: str
    argv: tuple[str, ...]
    exit_code: int
    expect: str
    torch_free: bool  # must answer without importing torch
    engine: Path = ENGINE  # the VolSegSlicer folder put on PYTHONPATH


def cases(folder: Path) -> list[Case]:
    """The rows, with the files the refusals need created in ``folder``."""
    ct = folder / "ct.nrrd"
    ct.write_bytes(b"NRRD0004\n")  # exists; never read (every case using it is refused first)
    notes = folder / "notes.txt"
    notes.write_text("these are not weights\n")
    out = str(folder / "out.seg.nrrd")
    volseg = ("-m", "volseg")
    return [
        Case(BASELINE, ("-c", "import torch"), 0, "", False),
        Case("python (nothing imported)", ("-c", "pass"), 0, "", True),
        Case("import torch, monai", ("-c", "import torch, monai"), 0, "", False),
        Case("import volseg.pipeline (a run's start-up)", ("-c", "import volseg.pipeline"), 0, "", False),
        Case("volseg --version", (*volseg, "--version"), 0, "volseg ", True),
        Case("volseg models --json", (*volseg, "models", "--json"), 0, '"models"', True),
        Case("refuse: mistyped option", (*volseg, "segment", str(ct), "--modle", "demo", "-o", out), 2,
             "unrecognized arguments", True),
        Case("refuse: unknown model", (*volseg, "segment", str(ct), "--model", "dem", "-o", out), 2,
             "unknown model", True),
        Case("refuse: missing input", (*volseg, "segment", str(folder / "missing.nrrd"), "--model", "demo", "-o", out),
             2, "does not exist", True),
        Case("refuse: bad output extension", (*volseg, "segment", str(ct), "--model", "demo", "-o",
                                              str(folder / "out.png")), 2, "unknown extension", True),
        Case("refuse: text file as checkpoint", (*volseg, "segment", str(ct), "--model", "demo", "--checkpoint",
                                                 str(notes), "-o", out), 2, "not a PyTorch checkpoint", True),
        Case("volseg inspect notes.txt", (*volseg, "inspect", str(notes)), 2, "not a PyTorch checkpoint", True),
    ]


def compared(selected: list[Case], engine: Path) -> list[Case]:
    """``selected`` with, after each ``volseg`` row, the same command on ``engine`` (exit code checked)."""
    out = []
    for case in selected:
        out.append(case)
        if "volseg" in " ".join(case.argv[:2]):  # -m volseg, or -c "import volseg..."
            out.append(Case(f"{case.name} [{engine.parent.name}]", case.argv, case.exit_code, "", False, engine))
    return out


def _env(engine: Path = ENGINE) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(engine), *([path] if path else [])]),
            "PYTHONWARNINGS": "ignore"}


#: Starts one command and reports its wall time and resource use as JSON. A separate small process
#: does this because Linux counts the spawning process's resident memory into the child's peak
#: (``ru_maxrss`` keeps the high-water mark of the memory replaced at ``exec``): spawned from
#: this benchmark, which has imported torch, every child would show torch's memory. The floor is
#: now this launcher's own few MiB (see the "python (nothing imported)" row).
LAUNCHER = """
import json, os, subprocess, sys, tempfile, time
argv = json.loads(sys.argv[1])
with tempfile.TemporaryFile() as output:  # a file, not a pipe: wait4 reaps the child itself
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    output.seek(0)
    text = output.read().decode(errors="replace")
print(json.dumps([wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, code, text]))
"""


def run_once(case: Case) -> tuple[float, float, int, int, str]:
    """(wall s, CPU s, peak RSS bytes, exit code, stdout + stderr) of one process."""
    r = subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, json.dumps([sys.executable, *case.argv])],
                       capture_output=True, text=True, env=_env(case.engine))
    if r.returncode != 0:
        raise RuntimeError(f"the launcher failed: {r.stderr.strip()[-500:]}")
    wall, cpu, peak, code, text = json.loads(r.stdout)
    return wall, cpu, peak, code, text


def imports_torch(case: Case) -> bool:
    """Whether the command imports torch (an untimed run under ``-X importtime``)."""
    argv = ("-X", "importtime", *case.argv)
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=_env(case.engine))
    return any(line.rstrip().endswith("| torch") for line in r.stderr.splitlines())


def check(case: Case, code: int, text: str, torch_imported: bool) -> tuple[bool, str]:
    if code != case.exit_code:
        return False, f"FAIL: exit code {code}, expected {case.exit_code}"
    if case.expect not in text:
        return False, f"FAIL: output lacks {case.expect!r}"
    if case.torch_free and torch_imported:
        return False, "FAIL: imported torch"
    return True, "ok (no torch)" if case.torch_free else "ok"


def run(selected: list[Case], repeats: int = 3, warmup: int = 1) -> list[dict]:
    """Time every case in interleaved rounds; one row dict per case."""
    for _ in range(warmup):
        for case in selected:
            run_once(case)
    walls: dict[str, list[float]] = {c.name: [] for c in selected}
    cpus: dict[str, list[float]] = {c.name: [] for c in selected}
    peaks: dict[str, int] = {c.name: 0 for c in selected}
    last: dict[str, tuple[int, str]] = {}
    for _ in range(max(1, repeats)):
        for case in selected:
            wall, cpu, peak, code, text = run_once(case)
            walls[case.name].append(wall)
            cpus[case.name].append(cpu)
            peaks[case.name] = max(peaks[case.name], peak)
            last[case.name] = (code, text)
    rows = []
    for case in selected:
        ok, verdict = check(case, *last[case.name], imports_torch(case))
        rows.append({"name": case.name, "seconds": statistics.median(walls[case.name]),
                     "cpu_seconds": statistics.median(cpus[case.name]), "peak_mib": peaks[case.name] / common.MiB,
                     "ok": ok, "check": verdict})
    return rows


def table(rows: list[dict]) -> str:
    columns = [Column("name", "command"), *common.TIMING_COLUMNS, Column("check", "check")]
    baseline = BASELINE if any(r["name"] == BASELINE for r in rows) else rows[0]["name"]
    return common.timing_table(rows, columns, baseline=baseline)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, repeats=5, device=False, quick_help="one round, no warm-up")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="rows whose name starts with one of these "
                        f"(the baseline {BASELINE!r} is always kept)")
    parser.add_argument("--compare", type=Path, metavar="FOLDER",
                        help="another engine's VolSegSlicer folder: each volseg row is also run on it")
    args, _ = common.start(parser, argv)
    with tempfile.TemporaryDirectory() as folder:
        selected = cases(Path(folder))
        if args.only:
            selected = [c for c in selected if c.name == BASELINE or c.name.startswith(tuple(args.only))]
        if args.compare:
            selected = compared(selected, args.compare.resolve())
        rows = run(selected, repeats=args.repeats, warmup=0 if args.quick else 1)
    print(f"\n{len(selected)} commands, each a fresh `{Path(sys.executable).name}` process, median of "
          f"{max(1, args.repeats)} interleaved rounds; CPU s = the child's user + system time\n")
    print(table(rows))
    return common.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
