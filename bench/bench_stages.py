"""Every stage of ``volseg segment`` on a generated 512 x 512 x K CT: today's path vs the torch stages.

    python bench/bench_stages.py [--quick] [--device cpu|cuda] [--slices K] [--cards uxnet-amos ...]
                                 [--back-slices K] [--no-back] [--repeats N]
    python bench/bench_stages.py --memory [--slices 800] [--device cpu]

Part 1, **whole runs** (``volseg.pipeline.segment``, what ``volseg segment`` runs, in this
process): a synthetic CT (int16-range HU, body ellipse with organs, 0.7 x 0.7 x 1.25 mm, written
once as NRRD) through

- ``uxnet-amos`` (16 classes; Spacing 1.5 x 1.5 x 2 linear, Orientation, intensity, crop), random weights;
- ``mednext-nnunet-kits19-template`` (3 classes; Spacing 1 mm with the 3rd-order spline, 7 flips), random weights;
- ``demo`` (its own small checkpoint; no Spacing).

Each card runs twice per round, interleaved: **baseline** (``VOLSEG_EXACT_STAGES=1``: MONAI's
float64 way in and way back on the CPU, as before issue 15) and **volseg** (the torch stages on
the run's device). Columns: seconds per stage (the ``done`` event's timings), whole run, peak
RSS growth, peak GPU memory, and **agree %** (voxels whose label equals the baseline's label map;
the check fails below 99.99 %). The ratio column is baseline / volseg for the whole run and for
the stages this issue changed (preprocess + postprocess).

Part 2, **the way back alone** (the issue's CPU target): 16-class probabilities (smooth
organ-shaped fields on the network grid of ``uxnet-amos``) onto 512 x 512 x ``--back-slices``
(default 100), baseline ``invert_to_labelmap`` vs ``export_labelmap``, interleaved, with peak RSS
growth and agreement.

``--memory``: the issue's memory target instead of parts 1 and 2: one run of the ``volseg``
path (no baseline: MONAI's exact path at this size takes many minutes) of ``uxnet-amos``'s
preprocessing, labels and way back (16 classes) with ``--quick``'s stand-in network, on
512 x 512 x 800 (``--slices``) at 0.7 x 0.7 x 1.25 mm, written as ``.seg.nrrd``; prints each
stage's seconds and **peak resident set** of the process (Linux: the kernel's high-water mark
``VmHWM``, reset at each stage through ``/proc/self/clear_refs``; elsewhere sampled every 2 ms),
and the way back's planned GPU memory for that grid on a device with 7 GB
(``export_prediction.way_back_gpu_bytes``). Fails when the peak exceeds 8 GB.

``--quick``: small enough for 2 CPU cores in under 3 minutes: 512 x 512 x 24 runs with a
stand-in network of the card's output channels (a 1x1x1 convolution and a sine, TorchScript;
window 64, no flips: the stages around the network are what is timed) and the way back onto
512 x 512 x 40. ``--device cuda``: the cards' own networks and flips; keep
``--slices`` such that the run fits the GPU check's time (CUDA default 100: an estimated 3
minutes on one H200, most of it the baseline's CPU way in and way back).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from volseg import models  # noqa: E402
from volseg.cards import load_card  # noqa: E402
from volseg.pipeline import segment  # noqa: E402
from volseg.postprocessing.export_prediction import export_labelmap  # noqa: E402
from volseg.postprocessing.to_input_grid import invert_to_labelmap  # noqa: E402
from volseg.preprocessing.card_steps import preprocess  # noqa: E402
from volseg.progress import Reporter  # noqa: E402
from volseg.request import Overrides, SegmentRequest  # noqa: E402

SPACING = (0.7, 0.7, 1.25)
CARDS = ("uxnet-amos", "mednext-nnunet-kits19-template", "demo")
STAGES = ("read", "load_model", "preprocess", "infer", "postprocess", "write")


class StandIn(torch.nn.Module):
    """``--quick``'s network: logits from the intensity (a 1x1x1 convolution and a sine), so every
    class wins somewhere and a window costs microseconds; the stages around it are what is timed."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(1.0, 12.0, classes).view(-1, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.linspace(0.0, 3.0, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.conv(x[:, :1]))


class Capture(Reporter):
    """Keeps the events (stage timings arrive with ``done``)."""

    def __init__(self) -> None:
        super().__init__(io.StringIO())
        self.events: list[dict] = []

    def emit(self, event: dict) -> None:
        self.events.append(event)


class StagePeaks(Capture):
    """:class:`Capture` that also keeps each stage's peak resident set (bytes, the whole process).

    Linux: the kernel's high-water mark (``VmHWM``), reset when a stage begins by writing 5 to
    ``/proc/self/clear_refs``, read when it ends: exact. Elsewhere a thread samples the RSS every
    2 ms (a shorter spike can be missed)."""

    def __init__(self) -> None:
        super().__init__()
        import psutil

        self._proc = psutil.Process()
        self.peaks: dict[str, int] = {}
        self.current = "start-up"
        self.exact = self._reset()
        self._stop = threading.Event()
        self._thread = None if self.exact else threading.Thread(target=self._sample, daemon=True)
        if self._thread is not None:
            self._thread.start()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _hwm() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise OSError("no VmHWM in /proc/self/status")

    def _note(self) -> None:
        now = self._hwm() if self.exact else self._proc.memory_info().rss
        self.peaks[self.current] = max(self.peaks.get(self.current, 0), now)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._note()
            time.sleep(0.002)

    def emit(self, event: dict) -> None:
        super().emit(event)
        if event.get("event") in ("stage", "done"):
            self._note()
            self.current = event.get("stage", "done")
            if self.exact:
                self._reset()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """(I, J, K) int16 HU: air, a body ellipse of soft tissue, organs (ellipsoids of several
    densities), bone, noise; generated slice by slice."""
    rng = np.random.default_rng(seed)
    i, j = np.ogrid[:shape[0], :shape[1]]
    u, v = (i - shape[0] / 2) / (0.42 * shape[0]), (j - shape[1] / 2) / (0.32 * shape[1])
    out = np.empty(shape, dtype=np.int16)
    organs = [(-0.4, 0.3, 0.35, 60.0), (0.35, 0.25, 0.3, 120.0), (0.0, -0.4, 0.25, 200.0), (-0.2, -0.2, 0.2, 30.0)]
    for k in range(shape[2]):
        w = 2.0 * k / max(1, shape[2] - 1) - 1.0
        sl = np.where(u ** 2 + v ** 2 < 1, 40.0, -1000.0)
        for cu, cv, r, hu in organs:
            sl[(u - cu) ** 2 + (v - cv) ** 2 + (0.6 * w) ** 2 < r ** 2] = hu
        sl[(u ** 2 + (v + 0.8) ** 2) < 0.02] = 700.0
        sl += rng.normal(0, 20, size=sl.shape) * (sl > -500)
        out[:, :, k] = np.clip(sl, -1024, 3000)
    return out


def write_ct(folder: Path, shape: tuple[int, int, int]) -> Path:
    import nrrd

    path = folder / f"ct_{shape[0]}x{shape[1]}x{shape[2]}.nrrd"
    header = {"space": "left-posterior-superior", "space directions": np.diag([-SPACING[0], -SPACING[1], SPACING[2]]),
              "space origin": np.array([170.0, 170.0, -100.0]), "encoding": "raw"}
    nrrd.write(str(path), synthetic_ct(shape), header)
    return path


def bench_card(card_id: str, quick: bool, folder: Path):
    """The card (tiny network with --quick) and a random-weight checkpoint for it (seed 0)."""
    card = load_card(card_id)
    if card_id == "demo":
        return card, None
    if quick:  # the card's preprocessing, labels and window mode; a stand-in network, no flips
        path = folder / f"{card_id}-standin.pt"
        torch.jit.save(torch.jit.script(StandIn(card.out_channels)), str(path))
        card = dataclasses.replace(card, architecture="torchscript", config={},
                                   inference=dataclasses.replace(card.inference, roi_size=(64, 64, 64), flips=(),
                                                                 sw_batch_size=4))
        return card, path
    torch.manual_seed(0)
    net = models.create(card.architecture, **card.config)
    path = folder / f"{card_id}-random.pt"
    torch.save({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return card, path


def run_once(card, checkpoint, ct: Path, out: Path, device: str, baseline: bool) -> dict:
    """One ``segment`` run; returns stage seconds, whole seconds, peaks and the label map."""
    import nrrd

    os.environ["VOLSEG_EXACT_STAGES"] = "1" if baseline else "0"
    gc.collect()
    common.malloc_for_memory()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    rep = Capture()
    request = SegmentRequest(inputs=[ct], card=card, output=out, checkpoint=checkpoint, overwrite=True,
                             device=device, overrides=Overrides())
    with common.PeakRSS() as peak:
        t0 = time.perf_counter()
        segment(request, rep)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        whole = time.perf_counter() - t0
    done = next(e for e in rep.events if e.get("event") == "done")
    labels, _ = nrrd.read(str(out))
    gpu = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    notes = [e["message"] for e in rep.events if e.get("event") == "log" and "way back" in e.get("message", "")]
    return {"timings": done.get("timings", {}), "whole": whole, "rss": peak.grown, "gpu": gpu,
            "labels": labels, "notes": notes}


def part1(args, folder: Path) -> list[dict]:
    shape = (512, 512, args.slices)
    ct = write_ct(folder, shape)
    rows = []
    for card_id in args.cards:
        card, ckpt = bench_card(card_id, args.quick, folder)
        results: dict[str, list[dict]] = {"baseline": [], "volseg": []}
        for _ in range(args.repeats):
            for name in ("baseline", "volseg"):
                results[name].append(run_once(card, ckpt, ct, folder / f"{card_id}-{name}.seg.nrrd", args.device,
                                              baseline=name == "baseline"))
        ref = results["baseline"][-1]["labels"]
        inside = covered(ct, card)
        for name, runs in results.items():
            med = {s: float(np.median([r["timings"].get(s, np.nan) for r in runs])) for s in STAGES}
            agree = 100.0 * float(np.mean(runs[-1]["labels"][inside] == ref[inside]))
            stray = int(np.count_nonzero(runs[-1]["labels"][~inside])) if name == "volseg" else 0
            rows.append({"card": card_id, "path": name, **med, "whole": float(np.median([r["whole"] for r in runs])),
                         "rss": max(r["rss"] for r in runs), "gpu": max((r["gpu"] or 0) for r in runs) or None,
                         "agree": agree, "ok": agree >= 99.99 and stray == 0,
                         "outside": int((~inside).sum()), "stray": stray, "notes": "; ".join(runs[-1]["notes"])})
            r = rows[-1]  # as each card finishes, so a run cut short by a time limit still says something
            print(f"  {card_id} {name}: whole {r['whole']:.2f} s; " + ", ".join(
                f"{s} {r[s]:.2f}" for s in STAGES if r[s] == r[s]) + f"; GPU peak "
                f"{(r['gpu'] or 0) / 2**20:.0f} MiB; agree {r['agree']:.4f} %", flush=True)
            del runs
    return rows


def covered(ct: Path, card) -> np.ndarray:
    """Input voxels the network's grid covers (MONAI's exact inverse of a ones image > 1e-6).

    Outside a ``CropForeground`` box the exact path's probabilities are the float64 round-off of
    the zero padding (about 1e-17) and its argmax there is noise; agreement is measured inside,
    and the torch path must give background outside (``stray`` counts its labels there)."""
    from volseg.io import read_inputs
    from volseg.preprocessing.card_steps import invert

    volume = read_inputs([ct])
    pre = preprocess(volume.array, volume.ijk_to_ras, card.preprocessing)
    ones = torch.ones((1, *pre.image.shape[1:]))
    return (invert(ones, pre)[0] > 1e-6).numpy()


def print_part1(rows: list[dict], shape) -> None:
    print(f"\n### Whole runs: `volseg segment` on 512x512x{shape} (seconds per stage, median)\n")
    head = ["card", "path", *STAGES, "whole", "pre+post", "ratio whole", "ratio pre+post", "RSS MiB", "GPU MiB",
            "agree %"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    base = {r["card"]: r for r in rows if r["path"] == "baseline"}
    for r in rows:
        b = base[r["card"]]
        pp, bpp = r["preprocess"] + r["postprocess"], b["preprocess"] + b["postprocess"]
        cells = [r["card"], r["path"], *[f"{r[s]:.2f}" for s in STAGES], f"{r['whole']:.2f}", f"{pp:.2f}",
                 f"{b['whole'] / r['whole']:.2f}x", f"{bpp / pp:.2f}x" if pp > 0 else "-",
                 f"{r['rss'] / 2**20:.0f}", "-" if r["gpu"] is None else f"{r['gpu'] / 2**20:.0f}",
                 f"{r['agree']:.4f}"]
        print("| " + " | ".join(cells) + " |")
    print("\nagree %: inside the network's grid (see `covered`); outside it the baseline's labels are "
          "round-off noise.")
    for r in rows:
        if r["path"] == "volseg":
            print(f"- {r['card']}: {r['outside']} voxels outside the network's grid, volseg labels there: "
                  f"{r['stray']}; {r['notes']}")


def organ_probs(shape, channels: int, seed: int = 0) -> torch.Tensor:
    """(C, *shape) softmax of smooth organ-shaped logits: every class owns a blob, background the rest."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    logits = torch.empty((channels, *shape))
    logits[0] = 0.0
    for c in range(1, channels):
        centre = torch.rand(3, generator=g) * 1.2 - 0.6
        radius = 0.12 + 0.15 * float(torch.rand(1, generator=g))
        d2 = sum((grids[a] - centre[a]) ** 2 for a in range(3))
        logits[c] = 8.0 * (1.0 - d2 / radius ** 2)
    logits += 0.3 * torch.randn(logits.shape, generator=g)
    return torch.softmax(logits, 0)


def part2(args, device: torch.device) -> list[dict]:
    card = load_card("uxnet-amos")
    shape = (512, 512, args.back_slices)
    ct = synthetic_ct(shape)[None].astype(np.float32)
    affine = np.diag([*SPACING, 1.0])
    pre = preprocess(ct, affine, card.preprocessing)
    del ct
    probs = organ_probs(tuple(pre.image.shape[1:]), card.out_channels)
    probs_dev = probs.to(device)
    fns = [
        ("baseline: invert_to_labelmap (MONAI float64, CPU)",
         lambda: invert_to_labelmap(probs, pre, card.labels, "softmax"), torch.device("cpu")),
        (f"volseg: export_labelmap ({device})",
         lambda: export_labelmap(probs_dev, pre, card.labels, "softmax", device=device), device),
    ]
    results = {name: [] for name, _, _ in fns}
    for _ in range(args.repeats):
        for name, fn, dev in fns:
            gc.collect()
            common.malloc_for_memory()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            with common.PeakRSS() as peak:
                t0 = time.perf_counter()
                labels = fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                secs = time.perf_counter() - t0
            results[name].append((secs, peak.grown, torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
                                  else None, labels))
    ref = results[fns[0][0]][-1][3]
    rows = []
    for name, runs in results.items():
        agree = 100.0 * float(np.mean(runs[-1][3] == ref))
        rows.append({"name": name, "s": float(np.median([r[0] for r in runs])), "rss": max(r[1] for r in runs),
                     "gpu": runs[-1][2], "agree": agree, "ok": agree >= 99.99})
    print(f"\n### The way back alone: 16 classes, network grid {tuple(pre.image.shape[1:])} -> 512x512x{shape[2]}\n")
    print("| path | median s | ratio | RSS growth MiB | GPU MiB | agree % |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        gpu = "-" if r["gpu"] is None else f"{r['gpu'] / 2**20:.0f}"
        print(f"| {r['name']} | {r['s']:.2f} | {rows[0]['s'] / r['s']:.2f}x | {r['rss'] / 2**20:.0f} | {gpu} | "
              f"{r['agree']:.4f} |")
    return rows


#: The issue's targets for a 16-class card on 512 x 512 x 800.
RAM_TARGET, GPU_TARGET = 8 * 10**9, 7 * 10**9


def memory_target(args, folder: Path, device: torch.device) -> list[dict]:
    """``--memory``: one volseg run of the 16-class card (stand-in network) on 512 x 512 x K, the
    peak resident set per stage, and the way back's planned GPU memory on a 7 GB device."""
    from volseg.postprocessing.export_prediction import way_back_gpu_bytes
    from volseg.preprocessing.planning import plan_preprocessing, planned_shape

    shape = (512, 512, args.slices)
    ct = write_ct(folder, shape)
    gc.collect()
    card, ckpt = bench_card("uxnet-amos", True, folder)
    os.environ["VOLSEG_EXACT_STAGES"] = "0"
    common.malloc_for_memory()
    gc.collect()
    rep = StagePeaks()
    request = SegmentRequest(inputs=[ct], card=card, output=folder / "memory.seg.nrrd", checkpoint=ckpt,
                             overwrite=True, device=str(device), overrides=Overrides())
    try:
        t0 = time.perf_counter()
        segment(request, rep)
        whole = time.perf_counter() - t0
    finally:
        rep.close()
    done = next(e for e in rep.events if e.get("event") == "done")
    notes = [e["message"] for e in rep.events if e.get("event") == "log" and "way back" in e.get("message", "")]
    print(f"\n### Memory: `volseg segment` of a {card.out_channels}-class card ({card.id}'s preprocessing, "
          f"a stand-in network) on 512x512x{args.slices} at {SPACING[0]}x{SPACING[1]}x{SPACING[2]} mm, {device}\n")
    print(f"peak resident set per stage ({'kernel high-water mark' if rep.exact else 'sampled every 2 ms'}); "
          f"target <= {RAM_TARGET / 1e9:.0f} GB\n")
    print("| stage | seconds | peak RSS GB |")
    print("|---|---:|---:|")
    for stage in ("start-up", *STAGES):
        if stage in rep.peaks:
            secs = done.get("startup_s") if stage == "start-up" else done["timings"].get(stage)
            print(f"| {stage} | {secs if secs is not None else float('nan'):.2f} | {rep.peaks[stage] / 1e9:.2f} |")
    peak = max(rep.peaks.values())
    print(f"| **whole run** | {whole:.2f} | **{peak / 1e9:.2f}** |")
    print("\n- " + "; ".join(notes))
    # the way back's plan on a GPU with 7 GB (what export_labelmap sizes from, after inference)
    plans = plan_preprocessing(shape, np.diag([*SPACING, 1.0]), card.preprocessing, 1)
    net = planned_shape(shape, plans)
    est = way_back_gpu_bytes(card.out_channels, net, shape, free=GPU_TARGET)
    print(f"- way back on a GPU with {GPU_TARGET / 1e9:.0f} GB: network grid {tuple(net)}, {est.plan.group} classes "
          f"per group, {est.plan.slab_rows} rows per slab; planned peak {est.total / 1e9:.2f} GB "
          f"(probabilities {est.probabilities / 1e9:.2f} GB, label map {est.labelmap / 1e9:.2f} GB, "
          f"temporaries {est.temporaries / 1e9:.2f} GB)")
    return [{"name": "memory: peak RSS", "ok": peak <= RAM_TARGET},
            {"name": "memory: planned GPU way back", "ok": est.total <= GPU_TARGET}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, repeats=1)
    parser.add_argument("--slices", type=int, default=None, help="K of the 512x512xK CT (default 120; CUDA 100; --quick 24)")
    parser.add_argument("--back-slices", type=int, default=None, help="K for the way back alone (default 100; --quick 40)")
    parser.add_argument("--cards", nargs="+", default=list(CARDS), choices=CARDS)
    parser.add_argument("--no-back", action="store_true", help="skip part 2 (the way back alone)")
    parser.add_argument("--no-runs", action="store_true", help="skip part 1 (whole runs)")
    parser.add_argument("--memory", action="store_true",
                        help="instead: peak RAM per stage of a 16-class card on 512x512x800 (see above)")
    args, device = common.start(parser, argv)
    # the network's own runtime is not what this measures: torch, no ONNX/OpenVINO export on the CPU
    os.environ.setdefault("VOLSEG_RUNTIME", "torch")
    if args.memory:
        args.slices = args.slices or 800
        with tempfile.TemporaryDirectory(prefix="volseg-bench-memory-") as tmp:
            rows = memory_target(args, Path(tmp), device)
        os.environ.pop("VOLSEG_EXACT_STAGES", None)
        return common.exit_status(rows)
    args.slices = args.slices or (24 if args.quick else 100 if device.type == "cuda" else 120)
    args.back_slices = args.back_slices or (40 if args.quick else 100)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="volseg-bench-stages-") as tmp:
        if not args.no_runs:
            if device.type == "cuda":  # CUDA context, cuDNN and kernels warmed up outside the timed rows
                warm = Path(tmp) / "warm"
                warm.mkdir()
                demo = load_card("demo")
                run_once(demo, None, write_ct(warm, (64, 64, 16)), warm / "w.seg.nrrd", args.device, baseline=False)
            part1_rows = part1(args, Path(tmp))
            print_part1(part1_rows, args.slices)
            rows += [dict(r, name=f"{r['card']} {r['path']}") for r in part1_rows]
    if not args.no_back:
        rows += part2(args, device)
    os.environ.pop("VOLSEG_EXACT_STAGES", None)
    return common.exit_status(rows)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
