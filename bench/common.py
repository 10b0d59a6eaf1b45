"""Shared helpers for the benchmarks in ``bench/``: timing, peak memory, the result table.

Every benchmark times its rows with :func:`measure_interleaved` (warm-up, interleaved rounds,
median) and prints a Markdown table with :func:`markdown_table` (:func:`timing_table` for the
usual time / CPU / memory columns), whose ratio columns compare each row with a named baseline
row measured in the same process -- absolute numbers depend on the machine and its load, the
ratios much less. The command line: :func:`add_common_args`, then :func:`start` (parse, apply
the thread count, print the :func:`environment` line); :func:`exit_status` turns failed
correctness checks into exit status 1.

Peak memory:

- GPU: growth of ``torch.cuda.max_memory_allocated`` over the call (exact, allocator view).
- CPU: growth of the process's resident set size (RSS) over one extra call made after the
  timed rounds, sampled every millisecond by a thread. PyTorch's CPU allocator and ITK do not
  report to ``tracemalloc``, so RSS is the one measure that sees every allocation. For that call
  :func:`malloc_for_memory` makes glibc serve large blocks with ``mmap`` so freed memory really
  leaves the process and each row starts from a fair base; times are taken in
  :func:`malloc_for_timing` mode, because forced ``mmap`` slows allocation-heavy code a lot.
  Sampling can miss a peak shorter than a millisecond, and heap pages freed during the timed
  rounds are reused (and stay resident) before glibc ``mmap``s, which can inflate the figure:
  CPU peaks are approximate (see bench/README.md).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "VolSegSlicer") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "VolSegSlicer"))

MiB = 2**20


def _mallopt(mmap_threshold: int, trim_threshold: int, trim: bool = False) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD (setting it stops glibc's dynamic adjustment)
        libc.mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD
        if trim:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: CPU memory figures are then upper bounds


def malloc_for_timing() -> None:
    """glibc: large blocks from the heap and reused, as in a warmed-up process (32 MiB mmap threshold).

    Forcing ``mmap`` for every block (as :func:`malloc_for_memory` does) makes each tensor
    allocation page-fault fresh memory: measured here, that made sliding-window inference about
    2.6x slower and changed the ratios between rows. So times are taken in this mode.
    """
    _mallopt(32 * MiB, 64 * MiB)


def malloc_for_memory() -> None:
    """glibc: serve every block >= 64 KiB by ``mmap`` and give it back on free, so RSS = live memory."""
    _mallopt(64 * 1024, 64 * 1024, trim=True)


class PeakRSS:
    """Largest growth of the resident set over a ``with`` block (CPU), sampled every ``interval_s``."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.base = self.peak = 0

    def __enter__(self) -> PeakRSS:  # noqa: PYI034 (Self needs Python 3.11)
        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def grown(self) -> int:
        return max(0, self.peak - self.base)


@dataclass
class Timing:
    """Timings of one callable: median wall and CPU seconds, all wall times, peak extra memory, last output.

    ``cpu_seconds`` is the process's CPU time (all threads) per call: on a loaded machine it
    tracks the work done better than wall time, which includes waiting for a core.
    """

    seconds: float
    cpu_seconds: float
    times: list[float]
    peak_bytes: int
    result: Any = field(repr=False, default=None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, int, Any]:
    """(wall s, CPU s, peak extra GPU bytes (0 on CPU), output) of one call."""
    gc.collect()
    peak = 0
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    _sync(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    return wall, cpu, peak, result


def _peak_rss(fn: Callable[[], Any]) -> int:
    gc.collect()
    malloc_for_memory()  # also trims what the previous call freed, so every row starts alike
    with PeakRSS() as mem:
        fn()
    return mem.grown


def measure_interleaved(fns: Sequence[tuple[Callable[[], Any], torch.device | str]], repeats: int = 3,
                        warmup: int = 1) -> list[Timing]:
    """Time several callables in rounds (A B C, A B C, ...) so a change in machine load hits all alike.

    Each callable is first called ``warmup`` times untimed, then ``repeats`` rounds are timed
    (glibc in :func:`malloc_for_timing` mode). GPU peak memory comes from the timed calls; CPU
    peak memory from one more call of each CPU callable afterwards, in
    :func:`malloc_for_memory` mode. Returns one :class:`Timing` per callable: median wall and
    CPU time, the largest peak memory, and the output of its last timed call.
    """
    devices = [torch.device(d) for _, d in fns]
    gc.collect()
    gc.freeze()  # what is alive now (torch's and MONAI's objects) is not rescanned by each call's gc.collect()
    try:
        return _measure_interleaved(fns, devices, repeats, warmup)
    finally:
        gc.unfreeze()


def _measure_interleaved(fns: Sequence[tuple[Callable[[], Any], torch.device | str]], devices: list[torch.device],
                         repeats: int, warmup: int) -> list[Timing]:
    malloc_for_timing()
    for fn, _ in fns:
        for _ in range(warmup):
            fn()
    walls: list[list[float]] = [[] for _ in fns]
    cpus: list[list[float]] = [[] for _ in fns]
    peaks = [0] * len(fns)
    results: list[Any] = [None] * len(fns)
    for _ in range(max(1, repeats)):
        for i, ((fn, _), device) in enumerate(zip(fns, devices)):
            results[i] = None
            wall, cpu, peak, results[i] = _timed_call(fn, device)
            walls[i].append(wall)
            cpus[i].append(cpu)
            peaks[i] = max(peaks[i], peak)
    if any(d.type == "cpu" for d in devices):
        malloc_for_memory()
        for i, ((fn, _), device) in enumerate(zip(fns, devices)):
            if device.type == "cpu":
                peaks[i] = _peak_rss(fn)
        malloc_for_timing()
    return [Timing(statistics.median(w), statistics.median(c), w, p, r)
            for w, c, p, r in zip(walls, cpus, peaks, results)]


def measure(fn: Callable[[], Any], device: torch.device | str = "cpu", repeats: int = 3,
            warmup: int = 1) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times; medians and largest peak memory."""
    return measure_interleaved([(fn, device)], repeats=repeats, warmup=warmup)[0]


# --- the table --------------------------------------------------------------------------------


@dataclass
class Column:
    """A table column: ``key`` in each row dict, header text and a format for the value."""

    key: str
    header: str
    fmt: str = "{}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base <= 0:
        return "-"
    return f"{value / base:.2f}"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], baseline: str,
                   name_key: str = "name", ratio_of: Sequence[tuple[str, str]] = ()) -> str:
    """Render ``rows`` as a Markdown table, with a ratio column after each key in ``ratio_of``.

    Args:
        rows: one dict per row; ``row[name_key]`` names it. A value of ``None`` prints as "-".
        columns: the columns in order.
        baseline: name of the row the ratios divide by (must be one of the rows).
        ratio_of: (key, header) pairs: after the column of ``key`` a column ``header`` holds
            ``row[key] / baseline_row[key]`` ("n/a" where ``key`` is in the row's ``no_ratio``,
            e.g. GPU memory against a CPU baseline).

    Raises:
        ValueError: the baseline row is missing.
    """
    base = next((r for r in rows if r.get(name_key) == baseline), None)
    if base is None:
        raise ValueError(f"baseline row {baseline!r} is not among the rows")
    ratio_after = dict(ratio_of)
    headers: list[str] = []
    for col in columns:
        headers.append(col.header)
        if col.key in ratio_after:
            headers.append(ratio_after[col.key])
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    for row in rows:
        cells: list[str] = []
        for col in columns:
            value = row.get(col.key)
            cells.append("-" if value is None else col.fmt.format(value))
            if col.key in ratio_after:
                comparable = col.key not in row.get("no_ratio", ())
                cells.append(_ratio(value, base.get(col.key)) if comparable else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, repeats: int = 3, device: bool = True, *,
                    quick_help: str = "one round, no warm-up", threads: int | None = None,
                    default_device: str = "cpu") -> None:
    """``--quick``, ``--repeats``, ``--threads`` and (when ``device``) ``--device``.

    ``threads``: default thread count (``None``: torch's choice); ``default_device``: default of
    ``--device`` (without ``device`` the benchmark picks its devices itself and ``args.device``
    is ``"cpu"``).
    """
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed rounds per row (default {repeats}, 1 with --quick)")
    threads_default = str(threads) if threads else "torch's choice"
    parser.add_argument("--threads", type=int, default=threads, help=f"torch CPU threads (default: {threads_default})")
    if device:
        parser.add_argument("--device", default=default_device, help=f"cpu | cuda | cuda:N (default {default_device})")
    else:
        parser.set_defaults(device="cpu")
    parser.set_defaults(default_repeats=repeats)


def setup(args: argparse.Namespace) -> torch.device:
    """Apply the thread count; return the device; fill in ``args.repeats``."""
    if args.repeats is None:
        args.repeats = 1 if args.quick else args.default_repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but CUDA is not available in this torch build/machine")
    return device


def start(parser: argparse.ArgumentParser, argv: list[str] | None = None,
          environment_device: torch.device | str | None = None) -> tuple[argparse.Namespace, torch.device]:
    """Parse the command line, apply it (:func:`setup`) and print the :func:`environment` line.

    ``environment_device``: the device to describe, when not ``--device`` (e.g. a benchmark
    whose last row runs on CUDA when there is one). Returns ``(args, device)``.
    """
    args = parser.parse_args(argv)
    device = setup(args)
    print(environment(device if environment_device is None else environment_device))
    return args, device


def exit_status(rows: Sequence[dict[str, Any]], name_key: str = "name") -> int:
    """0 when every row's check passed (``row["ok"]``); else print the failed rows' names and return 1."""
    failed = [str(r[name_key]) for r in rows if not r["ok"]]
    if failed:
        print(f"\nCORRECTNESS CHECK FAILED for: {', '.join(failed)}")
        return 1
    return 0


def environment(device: torch.device | str) -> str:
    """One line: torch version, device, threads, CPU count and load -- printed above every table."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    try:
        load = f", load average {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    return (f"torch {torch.__version__}, device {device} ({name}), threads {torch.get_num_threads()}, "
            f"{os.cpu_count()} CPUs{load}, python {platform.python_version()}")


def mib(n: int | None) -> float | None:
    return None if n is None else n / MiB


# --- the columns every timing table has ----------------------------------------------------------

#: Median wall time, median CPU time and peak memory of a :class:`Timing` (keys of :func:`timing_fields`).
TIMING_COLUMNS = [Column("seconds", "median s", "{:.3f}"), Column("cpu_seconds", "CPU s", "{:.2f}"),
                  Column("peak_mib", "peak MiB", "{:.1f}")]
#: Their ratio columns against the baseline row.
TIMING_RATIOS = [("seconds", "time x base"), ("cpu_seconds", "CPU x base"), ("peak_mib", "memory x base")]


def timing_fields(timing: Timing) -> dict[str, float | None]:
    """The :data:`TIMING_COLUMNS` values of one row."""
    return {"seconds": timing.seconds, "cpu_seconds": timing.cpu_seconds, "peak_mib": mib(timing.peak_bytes)}


def timing_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], baseline: str | None = None) -> str:
    """:func:`markdown_table` with the :data:`TIMING_RATIOS`; baseline: the first row unless named."""
    return markdown_table(rows, columns, baseline=rows[0]["name"] if baseline is None else baseline,
                          ratio_of=TIMING_RATIOS)
