"""Fuzz the engine with hostile and broken inputs; every case must end in a clean outcome.

    python bench/fuzz_run.py --cases 10000 [--seed 0] [--workers 1] [--timeout 20] [--memory-cap-mib 1024]
    python bench/fuzz_run.py --seed 0 --only 1234 --keep /tmp/case   # reproduce one case

The cases come from ``fuzz_cases.make_case`` (seeded: the same seed and index give the same
files). Each runs through ``volseg.cli.main.main`` - the entry point of ``volseg segment`` - with
``--progress json`` in a warm worker process (torch imported once) whose address space is
capped at its size after warm-up plus ``--memory-cap-mib`` (``RLIMIT_AS``); the parent kills
and restarts a worker that takes longer than ``--timeout`` seconds on a case.

Outcome classes:

- ``refused``: exit code 2 or 3, the last JSON event an error with a one-line message (no
  internal error, no traceback, no staging path, not an allocation failure), nothing in the
  output folder, nothing on stderr;
- ``segmented``: exit code 0, a ``done`` event, the label map and its colour table (nothing
  else) in the output folder, on the input's grid (size, spacing, origin), nothing on stderr;
- ``failure``: anything else - an internal error (exit 1), a traceback, a hang (timeout), a
  crashed worker, memory above the cap, output left after a refusal, a multi-line message,
  library output on stderr.

The exit status is 1 when any case failed. A Markdown table per family is printed, with the
slowest case and the largest resident memory the worker reached.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for folder in (str(BENCH_DIR), str(REPO_ROOT / "VolSegSlicer")):
    if folder not in sys.path:
        sys.path.insert(0, folder)

from fuzz_cases import FAMILIES, THRESHOLD_CARD, UNET_CARD, make_case  # noqa: E402

#: Substrings of an error message that reveal a failure dressed as a refusal.
BAD_MESSAGE_PARTS = ("internal error", "Traceback", "bad_alloc", "out of memory", ".volseg-stage", ".volseg-tmp",
                     "can't allocate memory", "Cannot allocate memory")


# -- the worker ------------------------------------------------------------------------------------
def _assets(folder: Path) -> dict:
    import numpy as np
    import SimpleITK as sitk
    from fuzz_cases import CheckpointBases

    bases = CheckpointBases()
    model = folder / "threshold.pt"
    model.write_bytes(bases.torchscript)
    threshold_card = folder / "threshold.json"
    threshold_card.write_text(json.dumps(THRESHOLD_CARD))
    unet_card = folder / "unet.json"
    unet_card.write_text(json.dumps(UNET_CARD))
    a = np.full((6, 7, 8), -1000, np.int16)
    a[:3, :3, :3] = 800
    clean = folder / "clean.nrrd"
    image = sitk.GetImageFromArray(a)
    image.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(image, str(clean))
    return {"threshold_card": threshold_card, "unet_card": unet_card, "threshold_model": model,
            "clean_volume": clean, "bases": bases}


def _run_captured(main, args: list[str], case_dir: Path) -> tuple[int, str, str]:
    """Run ``main(args)`` with file descriptors 1 and 2 sent to files (C libraries print there too)."""
    out_path, err_path = case_dir / "stdout.txt", case_dir / "stderr.txt"
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            try:
                rc = main(args)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - anything escaping main is a failure to report
                sys.stderr.write("escaped main(): " + traceback.format_exc())
                rc = -1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return rc, out_path.read_text(errors="replace"), err_path.read_text(errors="replace")


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def classify(rc: int, stdout: str, stderr: str, case: dict) -> tuple[str, str]:
    """The outcome class (``refused``, ``segmented`` or ``failure``) and a one-line reason."""
    out_dir = Path(case["output"]).parent
    events = []
    for line in stdout.splitlines():
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                return "failure", f"stdout line is not JSON: {line[:120]!r}"
    if stderr.strip():
        return "failure", f"stderr output: {stderr.strip().splitlines()[0][:160]!r}"
    last = events[-1] if events else {}
    if rc in (2, 3):
        message = str(last.get("message", ""))
        if last.get("event") != "error":
            return "failure", f"exit {rc} without an error event"
        if "\n" in message or not message:
            return "failure", f"error message is not one line: {message[:160]!r}"
        bad = [part for part in BAD_MESSAGE_PARTS if part.lower() in message.lower()]
        if bad:
            return "failure", f"refusal hides a failure ({bad[0]}): {message[:160]}"
        if _listing(out_dir):
            return "failure", f"output left after a refusal: {_listing(out_dir)}"
        return "refused", message[:160]
    if rc == 0:
        if last.get("event") != "done":
            return "failure", "exit 0 without a done event"
        names = _listing(out_dir)
        if names != ["seg.csv", "seg.nrrd"]:
            return "failure", f"unexpected output files {names}"
        return _check_grid(case)
    if rc == 1:
        return "failure", f"exit 1: {str(last.get('message', ''))[:160]}"
    return "failure", f"exit code {rc}: {str(last.get('message', ''))[:160]}"


def _check_grid(case: dict) -> tuple[str, str]:
    """Whether the written label map lies on the grid the engine read the input on."""
    import numpy as np
    import SimpleITK as sitk
    from volseg.io import read_volume

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        volume = read_volume(case["inputs"][0])
    reader = sitk.ImageFileReader()
    reader.SetFileName(case["output"])
    reader.ReadImageInformation()
    size = tuple(int(n) for n in reader.GetSize())
    if size != tuple(volume.spatial_shape):
        return "failure", f"output size {size} differs from the input grid {volume.spatial_shape}"
    if not np.allclose(reader.GetSpacing(), volume.spacing, rtol=1e-5) or not np.allclose(
            reader.GetOrigin(), volume.origin, rtol=1e-5, atol=1e-4):
        return "failure", "output spacing/origin differ from the input grid"
    return "segmented", f"grid {size}"


def worker(conn, memory_cap: int, torch_threads: int) -> None:
    """Serve cases from ``conn`` until it closes: receive (seed, index, keep), answer a result."""
    import resource

    import psutil
    import torch

    torch.set_num_threads(torch_threads)
    from volseg.cli.main import main

    base = Path(tempfile.mkdtemp(prefix="volseg-fuzz-"))
    try:
        assets = _assets(base)
        warm = base / "warm"
        warm.mkdir()
        out = warm / "o.nrrd"
        _run_captured(main, ["segment", str(assets["clean_volume"]), "--model", str(assets["threshold_card"]),
                             "--checkpoint", str(assets["threshold_model"]), "-o", str(out), "--progress", "json"], warm)
        process = psutil.Process()
        baseline_rss = process.memory_info().rss
        if memory_cap:
            limit = process.memory_info().vms + memory_cap
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        conn.send({"ready": True, "baseline_rss": baseline_rss})
        while True:
            try:
                job = conn.recv()
            except EOFError:
                return
            seed, index, keep = job
            case_dir = Path(keep) if keep else base / f"case-{index}"
            if case_dir.exists():
                shutil.rmtree(case_dir)
            case_dir.mkdir(parents=True)
            start = time.perf_counter()
            peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # pydicom on the damaged values it is asked to write
                    case = make_case(seed, index, case_dir, assets)
            except Exception as exc:  # a generator bug, not an engine failure (still counted as a failure)
                conn.send({"index": index, "family": "?", "outcome": "generator-error",
                           "reason": f"{type(exc).__name__}: {exc}"[:200], "seconds": 0.0})
                if not keep:
                    shutil.rmtree(case_dir, ignore_errors=True)
                continue
            rc, stdout, stderr = _run_captured(main, case["args"], case_dir)
            seconds = time.perf_counter() - start
            try:
                outcome, reason = classify(rc, stdout, stderr, case)
            except Exception as exc:  # noqa: BLE001
                outcome, reason = "failure", f"checking the result failed: {type(exc).__name__}: {exc}"[:200]
            rss = process.memory_info().rss
            peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
            conn.send({"index": index, "family": case["family"], "outcome": outcome, "reason": reason,
                       "seconds": round(seconds, 3), "rc": rc, "rss_growth": rss - baseline_rss,
                       "peak_growth": peak_growth})
            if not keep:
                shutil.rmtree(case_dir, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- the parent ------------------------------------------------------------------------------------
class Worker:
    """A warm worker process and its pipe; restarted after a hang or a crash."""

    def __init__(self, memory_cap: int, torch_threads: int, start_timeout: float = 300.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker, args=(child, memory_cap, torch_threads), daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(start_timeout):
            self.kill()
            raise RuntimeError("the fuzz worker did not start")
        self.ready = self.conn.recv()

    def run(self, seed: int, index: int, timeout: float, keep: str | None = None) -> dict | None:
        """The result of one case, or None when the worker hung (killed) or died."""
        self.conn.send((seed, index, keep))
        if not self.conn.poll(timeout):
            self.kill()
            return None
        try:
            return self.conn.recv()
        except EOFError:
            self.kill()
            return None

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)

    @property
    def exitcode(self):
        return self.process.exitcode


def run_cases(seed: int, indices: list[int], timeout: float = 20.0, memory_cap: int = 1 << 30,
              torch_threads: int = 1, keep: str | None = None, progress=None) -> list[dict]:
    """Run the cases ``indices`` of ``seed`` in one warm worker; returns one result per case."""
    results = []
    current = Worker(memory_cap, torch_threads)
    try:
        for index in indices:
            result = current.run(seed, index, timeout, keep)
            if result is None:
                code = current.exitcode
                from fuzz_cases import family_of

                reason = f"hang: no answer within {timeout:g} s" if code in (None, -9) else f"worker died (exit {code})"
                result = {"index": index, "family": family_of(seed, index), "outcome": "failure", "reason": reason,
                          "seconds": timeout, "rc": None, "rss_growth": 0}
                current = Worker(memory_cap, torch_threads)
            results.append(result)
            if progress:
                progress(result)
    finally:
        current.conn.close()
        current.process.join(10)
        current.kill()
    return results


def summary_table(results: list[dict]) -> str:
    by_family: dict[str, Counter] = defaultdict(Counter)
    slowest: dict[str, float] = defaultdict(float)
    peak: dict[str, int] = defaultdict(int)
    for r in results:
        by_family[r["family"]][r["outcome"]] += 1
        slowest[r["family"]] = max(slowest[r["family"]], r["seconds"])
        peak[r["family"]] = max(peak[r["family"]], r.get("peak_growth") or 0)
    lines = ["| family | cases | refused | segmented | failures | slowest case s | largest peak-memory rise MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for family in [*FAMILIES, *sorted(set(by_family) - set(FAMILIES))]:
        c = by_family.get(family)
        if not c:
            continue
        failures = sum(v for k, v in c.items() if k not in ("refused", "segmented"))
        lines.append(f"| {family} | {sum(c.values())} | {c['refused']} | {c['segmented']} | {failures} | "
                     f"{slowest[family]:.2f} | {peak[family] / 2**20:.0f} |")
    total = Counter()
    for c in by_family.values():
        total.update(c)
    failures = sum(v for k, v in total.items() if k not in ("refused", "segmented"))
    lines.append(f"| all | {sum(total.values())} | {total['refused']} | {total['segmented']} | {failures} | "
                 f"{max(slowest.values(), default=0):.2f} | {max(peak.values(), default=0) / 2**20:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300, help="number of cases (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first case index")
    parser.add_argument("--only", type=int, nargs="*", help="run just these case indices")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, each with its own share of the cases")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--memory-cap-mib", type=int, default=1024, help="address space a worker may add after warm-up")
    parser.add_argument("--keep", help="with one --only case: keep its files in this folder")
    parser.add_argument("--json", help="write every result to this JSON file")
    args = parser.parse_args(argv)
    indices = args.only if args.only else list(range(args.start, args.start + args.cases))
    started = time.perf_counter()
    failures: list[dict] = []

    def progress(result: dict) -> None:
        if result["outcome"] not in ("refused", "segmented"):
            failures.append(result)
            print(f"FAIL seed {args.seed} case {result['index']} ({result['family']}): {result['reason']}", flush=True)

    shares = [indices[i::args.workers] for i in range(max(1, args.workers))]
    if len(shares) == 1:
        results = run_cases(args.seed, shares[0], args.timeout, args.memory_cap_mib << 20, 1, args.keep, progress)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(shares)) as pool:
            futures = [pool.submit(run_cases, args.seed, share, args.timeout, args.memory_cap_mib << 20, 1, None,
                                   progress) for share in shares]
            results = [r for f in futures for r in f.result()]
    elapsed = time.perf_counter() - started
    print(f"\nseed {args.seed}, {len(results)} cases in {elapsed:.0f} s ({args.workers} worker(s), "
          f"timeout {args.timeout:g} s, memory cap +{args.memory_cap_mib} MiB)\n")
    print(summary_table(results))
    growth = max((r.get("rss_growth", 0) for r in results), default=0)
    print(f"\nlargest resident-memory growth of a worker over its warm-up size: {growth / 2**20:.0f} MiB")
    peak = max(results, key=lambda r: r.get("peak_growth", 0), default=None)
    if peak is not None and peak.get("peak_growth"):
        print(f"largest rise of a worker's peak resident memory in one case: {peak['peak_growth'] / 2**20:.0f} MiB "
              f"(case {peak['index']}, {peak['family']})")
    ckpt = [r for r in results if r["family"] == "checkpoint" and r["outcome"] == "refused"]
    if ckpt:
        print(f"checkpoint refusals: {len(ckpt)}, slowest {max(r['seconds'] for r in ckpt):.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
