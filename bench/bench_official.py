"""volseg's fastest exact path against each architecture's official inference recipe, side by side.

    python bench/bench_official.py [--quick] [--arch uxnet mednext segformer3d] [--roi 64] [--size I J K]
                                   [--mirroring] [--runtimes torch onnxruntime openvino] [--device cuda]

For 3D UX-Net (``uxnet-amos``), MedNeXt (``mednext-nnunet-kits19-template``, MedNeXt-B k3) and
SegFormer3D (``segformer3d-brats``) with their published configurations (random weights, seed 0;
``--quick``: tiny configurations), one process runs, interleaved round by round:

- ``official``: the official recipe in eager fp32 PyTorch -- MONAI ``sliding_window_inference``
  (window batch 4, overlap 0.5, constant blending) then the activation for UX-Net and
  SegFormer3D (their ``test_seg.py``), nnU-Net's ``predict_3D`` for MedNeXt (volseg's
  re-implementation, equal to the official program's output to 4.5e-7 on its golden file).
- ``volseg <runtime>``: ``volseg.inference.sliding_window.predict`` with the card's settings through the network
  compiled for that runtime by ``volseg.inference.cpu_runtime`` (exported once, cached, checked against
  PyTorch on one window; the one-off conversion time is reported separately). ``auto`` marks the
  runtime that ``runtime="auto"`` picks.
- On CUDA (``--device cuda``): ``volseg cuda amp`` (the default, autocast fp16) and ``volseg cuda
  fp32`` against the official recipe run on the same GPU in fp32.

Columns: the median time, its ratio to the official row, the largest difference of the
probabilities from the official ones, the share of identical labels, and the network's attained
GFLOP/s (FLOPs counted by ``torch.utils.flop_counter`` on one window, times windows and passes)
against the CPU's peak (theoretical: cores x clock x 32 fp32 FLOP/cycle for AVX2/AVX-512 FMA;
and a measured 2048^2 sgemm, the practical ceiling). A row whose probabilities differ by more
than 1e-4 (CPU) with fewer than 99.99 % identical labels fails the check. The window ROI
defaults to 64^3 on the CPU (96^3 / 128^3 official) and MedNeXt's mirroring is off unless
``--mirroring`` (8x the work, same ratio): the machine this was written on has 2 shared cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Column
from volseg import models
from volseg.cards import load_card
from volseg.inference.cpu_runtime import PREFERRED, compile_for_cpu
from volseg.inference.sliding_window import count_windows, predict

CARDS = {"uxnet": "uxnet-amos", "mednext": "mednext-nnunet-kits19-template", "segformer3d": "segformer3d-brats"}
TINY = {
    "uxnet": {"depths": [1, 1, 1, 1], "feat_size": [48, 8, 8, 8], "hidden_size": 8},
    "mednext": {"model_id": "S", "n_channels": 4},
    "segformer3d": {"embed_dims": [8, 16, 40, 64], "decoder_head_embedding_dim": 32},
}
TOLERANCE, AGREEMENT = 1e-4, 0.9999


def peak_gflops(threads: int) -> tuple[float | None, float]:
    """(theoretical fp32 peak from the clock and the vector units, measured 2048^2 sgemm) in GFLOP/s."""
    theoretical = None
    try:
        info = Path("/proc/cpuinfo").read_text()
        mhz = max(float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz"))
        flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
        per_cycle = 32 if ("avx2" in flags and "fma" in flags) else 16  # two 256-bit FMA pipes (or one 512-bit pair)
        theoretical = threads * mhz / 1000 * per_cycle
    except (OSError, StopIteration, ValueError):
        pass
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(3):
        torch.mm(a, b)
    return theoretical, 3 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9


def window_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """FLOPs of one forward pass over a window batch of ``shape``."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(shape))
    return float(counter.get_total_flops())


def official(arch: str, model, image, options, device):
    """The official recipe in eager fp32: MONAI sliding window + activation, or nnU-Net's predict_3D."""
    if arch == "mednext":  # nnU-Net predict_3D (golden-checked re-implementation), fp32, PyTorch eager
        return predict(model, image, replace(options, amp=False, runtime="torch"), device)
    with torch.inference_mode():
        logits = sliding_window_inference(image[None].to(device), list(options.roi_size), 4, model.to(device),
                                          overlap=0.5, mode="constant")
    probs = torch.softmax(logits, 1) if options.activation == "softmax" else torch.sigmoid(logits)
    return probs[0].float().cpu()


def labels_of(p: torch.Tensor, activation: str) -> torch.Tensor:
    return p.argmax(0) if activation == "softmax" else p > 0.5


def bench_arch(arch: str, args, device, peaks) -> list[dict]:
    card = load_card(CARDS[arch])
    config = {**card.config, **(TINY[arch] if args.quick else {})}
    torch.manual_seed(0)
    model = models.create(card.architecture, **config).eval()
    roi = tuple(args.roi) if args.roi else card.inference.roi_size
    options = replace(card.inference, roi_size=roi, out_channels=None,
                      flips=card.inference.flips if args.mirroring else ())
    size = tuple(args.size) if args.size else (roi[0], roi[1], 2 * roi[2] - roi[2] // 2)
    in_ch = len(card.inputs)
    image = torch.randn(in_ch, *size, generator=torch.Generator().manual_seed(1))
    passes = 1 + len(options.flips) if options.mode != "nnunet" else len({tuple(f) for f in options.flips} | {()})
    windows = count_windows(size, roi, options.overlap, options.mode) * passes
    flops = window_flops(model, (1, in_ch, *roi)) * windows
    print(f"\n{arch}: {card.id}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, image {size}, "
          f"ROI {roi}, {windows} windows x passes, {options.mode} blending, {flops / 1e9:.1f} GFLOP", flush=True)
    runs = [("official", lambda: official(arch, model, image, options, device), "torch eager fp32")]
    notes = {}
    if device.type == "cpu":
        auto = next(iter(PREFERRED.get(arch, ())), "torch")
        for runtime in args.runtimes:
            if runtime == "torch":
                net = model
            else:
                t0 = time.perf_counter()
                try:
                    net, err = compile_for_cpu(model, runtime, (1, in_ch, *roi))
                except Exception as exc:  # noqa: BLE001 -- the table says what failed
                    print(f"  {runtime}: not usable ({str(exc).splitlines()[0][:200]})")
                    continue
                notes[runtime] = f"conversion {time.perf_counter() - t0:.0f} s (cached after), check {err:.1e}"
            opts = replace(options, runtime="torch")
            name = f"volseg {runtime}" + (" (auto)" if runtime == auto else "")
            runs.append((name, (lambda n=net, o=opts: predict(n, image, o, device)), notes.get(runtime, "")))
    else:
        runs.append(("volseg cuda amp", lambda: predict(model, image, replace(options, amp=True), device), "autocast"))
        runs.append(("volseg cuda fp32", lambda: predict(model, image, replace(options, amp=False), device), ""))
    warm = 0 if args.quick else 1
    for _, fn, _ in runs:
        for _ in range(warm):
            fn()
    times: list[list[float]] = [[] for _ in runs]
    outs: list = [None] * len(runs)
    for _ in range(max(1, args.repeats)):
        for i, (_, fn, _) in enumerate(runs):
            wall, _, _, outs[i] = common._timed_call(fn, device)
            times[i].append(wall)
    ref = outs[0]
    theoretical, measured = peaks
    rows = []
    for (name, _, note), t, out in zip(runs, times, outs):
        sec = statistics.median(t)
        diff = float((out - ref).abs().max())
        agree = float((labels_of(out, options.activation) == labels_of(ref, options.activation)).float().mean())
        gflops = flops / sec / 1e9
        cpu_row = device.type == "cpu"
        ok = (diff <= TOLERANCE or agree >= AGREEMENT) if cpu_row else agree >= 0.99
        rows.append({"name": f"{arch}: {name}", "seconds": sec, "speedup": statistics.median(times[0]) / sec, "diff": diff, "agree": 100 * agree,
                     "gflops": gflops, "peak": (100 * gflops / theoretical) if theoretical and cpu_row else None,
                     "sgemm": (100 * gflops / measured) if cpu_row else None, "note": note, "ok": ok})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, repeats=1, quick_help="tiny configurations, ROI 32, no warm-up")
    parser.add_argument("--arch", nargs="+", default=list(CARDS), choices=list(CARDS))
    parser.add_argument("--roi", type=int, nargs=3, default=None, help="window (default 64^3 on CPU, the card's on CUDA)")
    parser.add_argument("--size", type=int, nargs=3, default=None, help="image size (default: two windows along z)")
    parser.add_argument("--mirroring", action="store_true", help="MedNeXt with nnU-Net's 8-fold mirroring")
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime", "openvino"])
    args, device = common.start(parser, argv)
    if args.roi is None and device.type == "cpu":
        args.roi = (32, 32, 32) if args.quick else (64, 64, 64)
    threads = torch.get_num_threads()
    peaks = peak_gflops(threads)
    print(f"CPU peak: theoretical {peaks[0] or float('nan'):.0f} GFLOP/s ({threads} threads), "
          f"measured sgemm {peaks[1]:.0f} GFLOP/s; machine load {os.getloadavg()[0]:.1f} (shared machines: "
          "compare ratios, not seconds)")
    rows = []
    for arch in args.arch:
        rows += bench_arch(arch, args, device, peaks)
    columns = [Column("name", "path"), Column("seconds", "median s", "{:.2f}"), Column("speedup", "speed-up", "{:.2f}x"),
               Column("diff", "max abs diff vs official", "{:.1e}"), Column("agree", "same labels %", "{:.3f}"),
               Column("gflops", "GFLOP/s", "{:.1f}"), Column("peak", "% of peak", "{:.0f}"),
               Column("sgemm", "% of sgemm", "{:.0f}"), Column("note", "note")]
    print()
    for arch in args.arch:
        part = [r for r in rows if r["name"].startswith(arch + ":")]
        print(common.markdown_table(part, columns, baseline=part[0]["name"]))
        print()
    return common.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
