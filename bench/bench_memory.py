"""Peak memory of a whole-CT run through a 16-class card: all classes at once vs one class at a time.

    python bench/bench_memory.py [--quick] [--size I J K] [--compare-size I J K] [--no-full] [--device cuda]

A synthetic CT (int16 HU, body ellipse with organs and noise, 0.8 x 0.8 x 1.0 mm) goes through
the ``uxnet-amos`` card's engine path: its preprocessing (1.5 x 1.5 x 2 mm, RAS, [-125, 275] ->
[0, 1], crop to foreground), ``volseg.inference.sliding_window.predict`` with the card's window settings (96^3,
overlap 0.5, window batch 4) and the label map on the input grid. The network is a stand-in
with the card's 16 output channels (a 1x1x1 convolution and a sine, microseconds per window),
so what is measured is the engine's own buffers: the image, the blended probabilities, the
inversion and the label map. A real network adds its activations for one window batch on
top (one 96^3 UX-Net window: about 1.65 GiB on the CPU, REFERENCE.md section 7; use window
batch 1 on the CPU to keep it there).

Rows:

- ``all classes`` (baseline): ``to_labelmap(invert(probs))``, the path used when the
  probabilities are also written: every class mapped back to the input grid at once.
- ``one class at a time``: ``volseg.postprocessing.to_input_grid.invert_to_labelmap``, the path of a run
  without ``--probabilities``.

Both at ``--compare-size`` (interleaved, same process; label maps must be identical), then the
streamed path alone at ``--size`` (default 512 x 512 x 800; skip with ``--no-full``), with the
baseline's figure extrapolated linearly in the voxel count (its fp32 buffer alone is
16 x 4 bytes per voxel, more than this machine's memory allows at full size). Peak memory: CPU,
the process's resident set (absolute and growth over the call, sampled every ms); CUDA
(``--device cuda``), the allocator's peak while the windows run and stitch on the GPU.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Column
from volseg.cards import load_card
from volseg.inference.sliding_window import predict
from volseg.postprocessing.labels import to_labelmap
from volseg.preprocessing.card_steps import invert, preprocess
from volseg.postprocessing.to_input_grid import invert_to_labelmap

CARD = "uxnet-amos"
SPACING = (0.8, 0.8, 1.0)
BUDGET_CPU_GIB = 8.0
BUDGET_GPU_GIB = 7.0


class StandIn(nn.Module):
    """16-class logits from the intensity: cheap, but every class wins somewhere."""

    def __init__(self, classes: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(1.0, 12.0, classes).view(-1, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.linspace(0.0, 3.0, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.conv(x))


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """(1, I, J, K) float32 HU: air outside a body ellipse, soft tissue and brighter organs inside, noise."""
    rng = np.random.default_rng(seed)
    i, j = np.ogrid[:shape[0], :shape[1]]
    ci, cj = shape[0] / 2, shape[1] / 2
    r = ((i - ci) / (0.42 * shape[0])) ** 2 + ((j - cj) / (0.32 * shape[1])) ** 2
    slab = np.where(r < 1, 40.0, -1000.0).astype(np.float32)
    slab[(r < 0.3)] = 150.0
    slab[(r < 0.08)] = 300.0
    out = np.empty((1, *shape), dtype=np.float32)
    for k in range(shape[2]):  # slice by slice: no full-size temporaries besides the output
        out[0, :, :, k] = slab + rng.normal(0, 25, size=slab.shape).astype(np.float32) * (slab > -500)
    return out


def run(shape: tuple[int, int, int], streamed: bool, device: torch.device) -> dict:
    """One engine run; returns the label map, the seconds and the probability grid."""
    card = load_card(CARD)
    options = card.inference
    arr = synthetic_ct(shape)
    affine = np.diag([*SPACING, 1.0])
    t0 = time.perf_counter()
    pre = preprocess(arr, affine, card.preprocessing)
    del arr
    net = StandIn(card.out_channels).eval()
    probs = predict(net, pre.image, options, device, output_device=torch.device("cpu"))  # the way back reads CPU tensors
    grid = tuple(probs.shape[1:])
    if streamed:
        labels = invert_to_labelmap(probs, pre, card.labels, card.activation, card.threshold)
    else:
        labels = to_labelmap(invert(probs, pre), card.labels, card.activation, card.threshold)
    return {"labels": labels, "seconds": time.perf_counter() - t0, "grid": grid}


def measured(shape, streamed, device) -> dict:
    gc.collect()
    common.malloc_for_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with common.PeakRSS() as mem:
        out = run(shape, streamed, device)
    out["peak_mib"] = mem.peak / common.MiB
    out["grown_mib"] = mem.grown / common.MiB
    out["gpu_mib"] = torch.cuda.max_memory_allocated(device) / common.MiB if device.type == "cuda" else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, repeats=1, quick_help="small sizes only (96x96x80 and 128x128x100)")
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 800), help="the full-size run (default 512 512 800)")
    parser.add_argument("--compare-size", type=int, nargs=3, default=(256, 256, 200),
                        help="size of the interleaved comparison with the all-classes baseline (default 256 256 200)")
    parser.add_argument("--no-full", action="store_true", help="skip the full-size run")
    args, device = common.start(parser, argv)
    compare = (96, 96, 80) if args.quick else tuple(args.compare_size)
    full = None if args.no_full else ((128, 128, 100) if args.quick else tuple(args.size))
    print(f"process RSS before: {psutil.Process().memory_info().rss / common.MiB:.0f} MiB; "
          f"machine memory {psutil.virtual_memory().total / 2**30:.1f} GiB")
    results: dict[str, list[dict]] = {"all": [], "streamed": []}
    for _ in range(max(1, args.repeats)):
        for key in ("all", "streamed"):
            results[key].append(measured(compare, key == "streamed", device))
    base, stream = results["all"][-1], results["streamed"][-1]
    same = bool(np.array_equal(base["labels"], stream["labels"]))
    voxels = int(np.prod(compare))
    rows = []
    for name, res in (("all classes at once (baseline)", base), ("one class at a time", stream)):
        rows.append({"name": name, "size": "x".join(map(str, compare)), "grid": "x".join(map(str, res["grid"])),
                     "seconds": min(r["seconds"] for r in results["all" if res is base else "streamed"]),
                     "peak_mib": res["peak_mib"], "grown_mib": res["grown_mib"], "gpu_mib": res["gpu_mib"],
                     "bytes_per_voxel": res["grown_mib"] * common.MiB / voxels, "check": "identical" if same else "DIFFER",
                     "ok": same})
    if full is not None:
        res = measured(full, True, device)
        n = int(np.prod(full))
        extrapolated = base["grown_mib"] * n / voxels
        rows.append({"name": "one class at a time, full size", "size": "x".join(map(str, full)),
                     "grid": "x".join(map(str, res["grid"])), "seconds": res["seconds"], "peak_mib": res["peak_mib"],
                     "grown_mib": res["grown_mib"], "gpu_mib": res["gpu_mib"],
                     "bytes_per_voxel": res["grown_mib"] * common.MiB / n,
                     "check": f"<= {BUDGET_CPU_GIB:g} GiB" if res["peak_mib"] <= BUDGET_CPU_GIB * 1024 else "OVER BUDGET",
                     "ok": res["peak_mib"] <= BUDGET_CPU_GIB * 1024
                     and (res["gpu_mib"] is None or res["gpu_mib"] <= BUDGET_GPU_GIB * 1024)})
        rows.append({"name": "all classes at once, full size (extrapolated)", "size": "x".join(map(str, full)),
                     "grid": "-", "seconds": None, "peak_mib": None, "grown_mib": extrapolated, "gpu_mib": None,
                     "bytes_per_voxel": base["grown_mib"] * common.MiB / voxels, "check": "not run", "ok": True})
    columns = [Column("name", "path"), Column("size", "input grid"), Column("grid", "network grid"),
               Column("seconds", "s", "{:.1f}"), Column("peak_mib", "peak RSS MiB", "{:.0f}"),
               Column("grown_mib", "growth MiB", "{:.0f}"), Column("bytes_per_voxel", "bytes/input voxel", "{:.1f}"),
               Column("gpu_mib", "GPU peak MiB", "{:.0f}"), Column("check", "check")]
    print(f"\ncard {CARD}: 16 classes, stand-in network; spacing {SPACING} mm; device {device}\n")
    print(common.markdown_table(rows, columns, baseline=rows[0]["name"], ratio_of=[("bytes_per_voxel", "x base")]))
    return common.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
