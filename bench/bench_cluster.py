"""Benchmark a cohort through ``volseg batch``: the plain batch against Ray workers (``--cluster``).

    python bench/bench_cluster.py [--quick] [--cases N] [--size I J K] [--cpus N] [--threads N]

The same synthetic cohort (``--cases`` CT-like volumes of ``--size``, a small TorchScript
network of three 3D convolutions, 64^3 windows) runs through :func:`volseg.cohort.batch.run_batch`
three ways, in interleaved rounds (plain, 1 worker, 2 workers; plain, ...), each call a whole
cohort into a fresh output folder:

- **plain batch** (baseline): one process, the model loaded once, ``--threads`` torch threads;
- **Ray, 1 worker** and **Ray, 2 workers**: ``run_batch(..., cluster=local)`` on one local Ray
  instance of ``--cpus`` CPUs started once (loopback only, no dashboard); each call creates
  its actor pool (the CPUs shared among the workers: threads = CPUs / workers) and ends it.

Columns: median cohort wall time, cases per minute and its ratio to the baseline; the mean
time of a case inside its worker (``elapsed_s`` in the manifest) and the worker process's CPU
time meanwhile (``cpu_s``); the **scheduling overhead
per case** -- the time from sending a case to an actor to having its outcome back, less the
case's own time in the actor (``overhead_s`` in the manifest) -- and that overhead as a
percentage of the case's time; and the **fixed cost** of a cohort: wall time less the busiest
worker's case times (starting and stopping the actors, which import torch and load the model
on their first case... the model load is counted in the first case). Check: every row's label
maps are voxel-for-voxel those of the plain batch run with the same number of torch threads
per case (an untimed extra run where that differs from the baseline's: summing in another
order can flip a voxel whose classes are all but tied, and the check says how many differ from
the baseline). A failed check exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Column
from volseg.progress import Reporter

ROWS = ("plain batch", "Ray, 1 worker", "Ray, 2 workers")


class SmallConvNet(nn.Module):
    """Three 3D convolutions (1 -> C -> C -> 2 channels): a few seconds per case on a CPU core."""

    def __init__(self, channels: int = 12) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(1, channels, 3, padding=1), nn.ReLU(),
                                 nn.Conv3d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv3d(channels, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_cohort(folder: Path, n: int, size: tuple[int, int, int], channels: int = 12) -> dict[str, Any]:
    """``n`` CT-like NIfTI volumes, a TorchScript model and its card under ``folder``."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    cases = folder / "cases"
    cases.mkdir(parents=True)
    for i in range(n):
        a = rng.normal(-800, 100, size[::-1]).astype(np.float32)
        c = [s // 2 + int(rng.integers(-s // 8, s // 8 + 1)) for s in size[::-1]]
        r = [max(2, s // 5) for s in size[::-1]]
        a[c[0] - r[0]:c[0] + r[0], c[1] - r[1]:c[1] + r[1], c[2] - r[2]:c[2] + r[2]] = 400
        img = sitk.GetImageFromArray(a)
        img.SetSpacing((0.8, 0.8, 2.0))
        sitk.WriteImage(img, str(cases / f"case{i:03d}.nii.gz"))
    torch.manual_seed(0)
    model = folder / "net.pt"
    torch.jit.save(torch.jit.script(SmallConvNet(channels).eval()), str(model))
    card = {"id": "bench-conv", "title": "benchmark network", "architecture": {"name": "torchscript"},
            "inputs": [{"name": "CT", "modality": "CT"}],
            "labels": [{"value": 1, "name": "bright", "color": [255, 0, 0]}], "output": {"activation": "softmax"},
            "preprocessing": [{"name": "ScaleIntensityRange",
                               "args": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}}],
            "inference": {"roi_size": [64, 64, 64], "overlap": 0.25, "sw_batch_size": 1},
            "postprocessing": {"keep_largest_component": False, "fill_holes": False}}
    card_path = folder / "bench-conv.json"
    card_path.write_text(json.dumps(card))
    return {"cases": cases, "model": model, "card": card_path}


def template_for(cohort: dict[str, Any]):
    from volseg.cards import load_card
    from volseg.pipeline import SegmentRequest

    return SegmentRequest(inputs=[], card=load_card(str(cohort["card"])), output=Path("x"),
                          checkpoint=cohort["model"], device="cpu")


class Silent(Reporter):
    """Reports nothing (the benchmark prints its table only)."""

    def emit(self, event: dict[str, Any]) -> None:
        pass


def labels(out: Path) -> dict[str, np.ndarray]:
    import SimpleITK as sitk

    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(out.glob("*.nii.gz"))}


def run_cohort(row: str, cohort: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """One whole cohort through ``run_batch`` the way ``row`` says; wall time and manifest rows."""
    from volseg.cohort.batch import run_batch
    from volseg.cohort.cluster import ClusterSettings
    from volseg.cohort.manifest import MANIFEST_NAME, read_rows

    out = Path(tempfile.mkdtemp(prefix="out-", dir=scratch))
    cluster = None if row == ROWS[0] else ClusterSettings("local", workers=1 if row == ROWS[1] else 2, retries=0)
    t0 = time.perf_counter()
    summary = run_batch(template_for(cohort), [cohort["cases"]], out, ".nii.gz", Silent(), cluster=cluster)
    wall = time.perf_counter() - t0
    rows = list(read_rows(out / MANIFEST_NAME)[0].values())
    result = {"wall": wall, "rows": rows, "failed": summary["failed"], "labels": labels(out)}
    shutil.rmtree(out)
    return result


def worker_threads(row: str, cpus: int) -> int:
    """Torch threads per case in ``row``: the plain batch's own, or the CPUs shared by the workers."""
    if row == ROWS[0]:
        return torch.get_num_threads()
    return max(1, cpus // (1 if row == ROWS[1] else 2))


def plain_reference(cohort: dict[str, Any], scratch: Path, threads: int) -> dict[str, np.ndarray]:
    """The plain batch's label maps with ``threads`` torch threads (untimed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run_cohort(ROWS[0], cohort, scratch)["labels"]
    finally:
        torch.set_num_threads(before)


def differing_voxels(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> int | None:
    """Voxels whose labels differ between two sets of label maps (None: not the same cases/shapes)."""
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        return None
    return sum(int((a[k] != b[k]).sum()) for k in a)


def summarise(name: str, runs: list[dict[str, Any]], reference: dict[str, np.ndarray],
              baseline: dict[str, np.ndarray] | None = None, threads: int | None = None) -> dict[str, Any]:
    """A table row from the timed cohorts of one configuration.

    ``reference``: the plain batch's label maps with the row's own thread count (the check:
    identical); ``baseline``: those of the baseline row, only to say how many voxels differ
    from them when the thread count is not the same (summing in another order can flip a
    voxel whose classes are all but tied)."""
    n = len(runs[0]["rows"])
    wall = statistics.median(r["wall"] for r in runs)
    case_s = statistics.mean(row["elapsed_s"] for r in runs for row in r["rows"])
    cpu_s = statistics.mean(row["cpu_s"] for r in runs for row in r["rows"])
    overheads = [row["overhead_s"] for r in runs for row in r["rows"] if row.get("overhead_s") is not None]
    fixed = []
    for r in runs:
        per_worker: dict[str, float] = defaultdict(float)
        for row in r["rows"]:
            per_worker[row["worker"]] += row["elapsed_s"] + (row.get("overhead_s") or 0.0)
        fixed.append(r["wall"] - max(per_worker.values()))
    last = runs[-1]
    same = differing_voxels(last["labels"], reference) == 0
    ok = same and not last["failed"] and all(row["status"] == "done" for row in last["rows"])
    note = ""
    if ok and threads is not None:
        note = f" at {threads} thread(s)"
        if baseline is not None and baseline is not reference:
            note += f"; {differing_voxels(last['labels'], baseline)} voxel(s) differ from the baseline's threads"
    overhead = statistics.mean(overheads) if overheads else None
    return {"name": name, "cases": n, "seconds": wall, "per_min": n / wall * 60, "case_s": case_s, "cpu_s": cpu_s,
            "overhead_ms": None if overhead is None else overhead * 1000,
            "overhead_pct": None if overhead is None else 100 * overhead / case_s,
            "fixed_s": statistics.median(fixed), "ok": ok,
            "check": f"ok (= plain batch{note})" if ok else "FAIL: " + ("failed cases" if last["failed"] else "labels differ")}


def run(n_cases: int, size: tuple[int, int, int], cpus: int, repeats: int, warmup: int,
        rows: tuple[str, ...] = ROWS, scratch: Path | None = None) -> list[dict[str, Any]]:
    """Time ``rows`` on one cohort (interleaved rounds); the Ray instance is started here if needed."""
    owned = scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="volseg-bench-cluster-")) if owned else scratch
    try:
        cohort = make_cohort(scratch / "cohort", n_cases, size)
        if any(r != ROWS[0] for r in rows):
            import volseg.cohort.cluster

            if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
                volseg.cohort.cluster.start_local(num_cpus=cpus)
        for _ in range(warmup):
            for row in rows:
                run_cohort(row, cohort, scratch)
        timed: dict[str, list] = {row: [] for row in rows}
        for _ in range(max(1, repeats)):
            for row in rows:
                timed[row].append(run_cohort(row, cohort, scratch))
        baseline = timed[rows[0]][-1]["labels"]
        references = {worker_threads(rows[0], cpus): baseline}
        summaries = []
        for row in rows:
            threads = worker_threads(row, cpus)
            if threads not in references:
                references[threads] = plain_reference(cohort, scratch, threads)
            summaries.append(summarise(row, timed[row], references[threads], baseline, threads))
        return summaries
    finally:
        if owned:
            shutil.rmtree(scratch, ignore_errors=True)


COLUMNS = [Column("name", "configuration"), Column("cases", "cases"), Column("seconds", "cohort s", "{:.2f}"),
           Column("per_min", "cases/min", "{:.1f}"), Column("case_s", "s/case in worker", "{:.2f}"),
           Column("cpu_s", "CPU s/case", "{:.2f}"),
           Column("overhead_ms", "overhead ms/case", "{:.1f}"), Column("overhead_pct", "overhead % of case", "{:.2f}"),
           Column("fixed_s", "fixed s/cohort", "{:.2f}"), Column("check", "check")]


def table(rows: list[dict[str, Any]]) -> str:
    return common.markdown_table(rows, COLUMNS, baseline=rows[0]["name"], ratio_of=[("per_min", "x plain")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, repeats=2, device=False, threads=2,
                           quick_help="4 small cases, one round, no warm-up")
    parser.add_argument("--cases", type=int, default=None, help="cases in the cohort (default 8; 4 with --quick)")
    parser.add_argument("--size", type=int, nargs=3, default=None, metavar=("I", "J", "K"),
                        help="volume size (default 128 128 64; 64 64 48 with --quick)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (default 2)")
    args, _ = common.start(parser, argv)
    n = args.cases or (4 if args.quick else 8)
    size = tuple(args.size or ((64, 64, 48) if args.quick else (128, 128, 64)))
    rows = run(n, size, args.cpus, args.repeats, 0 if args.quick else 1)
    print(f"cohort: {n} synthetic volumes of {list(size)}, 3-convolution TorchScript net, 64^3 windows; "
          f"Ray: local instance of {args.cpus} CPUs (threads per worker = CPUs / workers); plain batch: "
          f"{torch.get_num_threads()} threads; {args.repeats} round(s), rows interleaved, median wall time")
    print()
    print(table(rows))
    return common.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
