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
from volseg.inference.gpu_settings import StepTimer
from volseg.inference.nnunet import predict_nnunet
from volseg.inference.sliding_window import count_windows, predict, run_precision

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


#: Realistic volumes on a GPU (issue 16): (channels x) I x J x K per architecture.
CUDA_SIZES = {"uxnet": (256, 256, 160), "segformer3d": (240, 240, 160), "mednext": (256, 256, 160)}
#: On a GPU, labels of every precision ``auto`` may pick must match fp32 on this share of voxels.
CUDA_AGREEMENT = 0.999


def official_cuda(arch: str, model, image, options, device, stats: dict):
    """The official recipe as its own code runs it on a GPU: eager PyTorch with torch's default
    flags (cuDNN may use TF32), fp32, the card's window size, the input copied once; the
    probabilities are left on the GPU (as volseg's), so neither side pays the copy back."""
    clock = StepTimer(stats, device)
    if arch == "mednext":  # nnU-Net predict_3D: one window at a time, mirroring, fp32
        return predict_nnunet(model, image, replace(options, sw_batch_size=1), device, autocast_dtype=None, clock=clock)
    x = image[None].to(device)
    clock.mark("to_device")
    with torch.inference_mode():
        logits = sliding_window_inference(x, list(options.roi_size), 4, lambda w: clock.network(model, w),
                                          overlap=0.5, mode="constant")
        clock.mark("windows_and_blending")
        probs = torch.softmax(logits, 1) if options.activation == "softmax" else torch.sigmoid(logits)
    clock.mark("activation")
    return probs[0]


def cuda_rows(arch: str, options, core: bool = False) -> list[tuple[str, object]]:
    """volseg's variants on a GPU: (name, options). The default is ``volseg auto``; the others
    show what each setting is worth (kept only where it pays). ``core``: only ``volseg auto``
    and ``volseg fp32`` (what the targets need: speed, memory, labels as fp32)."""
    fixed = dict(sw_batch_auto=False, cudnn_benchmark=False)
    rows = [
        ("volseg auto", replace(options, precision="auto")),
        ("volseg fp32", replace(options, precision="fp32")),
    ]
    if core:
        return rows
    rows += [
        ("volseg fp16", replace(options, precision="fp16")),
        ("volseg auto, channels-last", replace(options, precision="auto", channels_last=True)),
    ]
    if arch != "mednext":  # (MedNeXt: the slowest; its rows are kept to what the time budget allows)
        rows += [("volseg auto, card batch, no cudnn.benchmark", replace(options, precision="auto", **fixed)),
                 ("volseg fp32, card batch, no cudnn.benchmark", replace(options, precision="fp32", **fixed))]
    return rows


def profile_call(name: str, fn, device, rows: int = 15) -> None:
    """One more call of ``fn`` under torch.profiler: its top operators by device time (CPU time
    off CUDA), and the synchronisations and host copies it made, to find what surrounds the network."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    table = None
    for key in (("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ()) + \
            ("self_cpu_time_total",):
        try:
            table = averages.table(sort_by=key, row_limit=rows, max_name_column_width=48)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    print(f"  profile of one call, {name}:")
    print("\n".join("    " + line for line in (table or "").splitlines()), flush=True)


def bench_arch_cuda(arch: str, args, device) -> list[dict]:
    """Official fp32 vs volseg's variants on one GPU, interleaved; everything needed to judge it printed."""
    card = load_card(CARDS[arch])
    config = {**card.config, **(TINY[arch] if args.quick else {})}
    if arch == "mednext" and not args.quick:
        config["model_id"] = args.mednext_model
    torch.manual_seed(0)
    model = models.create(card.architecture, **config).eval().to(device)
    roi = tuple(args.roi) if args.roi else card.inference.roi_size
    mirroring = args.mirroring or (arch == "mednext" and not args.no_mirroring and not args.quick)
    options = replace(card.inference, roi_size=roi, out_channels=None, runtime="torch",
                      flips=card.inference.flips if mirroring else ())
    size = tuple(args.size) if args.size else (CUDA_SIZES[arch] if not args.quick else
                                              (roi[0], roi[1], 2 * roi[2] - roi[2] // 2))
    in_ch = len(card.inputs)
    image = torch.randn(in_ch, *size, generator=torch.Generator().manual_seed(1))
    passes = len({tuple(f) for f in options.flips} | {()})
    windows = count_windows(size, roi, options.overlap, options.mode)
    print(f"\n{arch}: {card.id} {config.get('model_id', '')}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"parameters, image {in_ch}x{'x'.join(map(str, size))}, ROI {roi}, {windows} windows x {passes} passes, "
          f"{options.mode} blending, card window batch {options.sw_batch_size}", flush=True)
    runs = [("official fp32", None)] + cuda_rows(arch, options, core=args.core_rows)
    stats: list[dict] = [{} for _ in runs]

    def call(i: int):
        stats[i] = {}
        name, opts = runs[i]
        if opts is None:
            return official_cuda(arch, model, image, options, device, stats[i])
        return predict(model, image, opts, device, stats=stats[i])

    warm = 0 if args.quick else 1
    first = [0.0] * len(runs)
    for i in range(len(runs)):  # the first call pays cuDNN's autotuning and the window measurement
        for _ in range(warm):
            t0 = time.perf_counter()
            call(i)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first[i] = time.perf_counter() - t0
    repeats = max(1, args.repeats if arch != "mednext" else min(args.repeats, args.mednext_repeats))
    times: list[list[float]] = [[] for _ in runs]
    peaks = [0] * len(runs)
    outs: list = [None] * len(runs)
    for _ in range(repeats):
        for i in range(len(runs)):
            outs[i] = None
            wall, _, peak, outs[i] = common._timed_call(lambda i=i: call(i), device)
            times[i].append(wall)
            peaks[i] = max(peaks[i], peak)
    if args.profile:
        for i in (0, 1):  # official fp32, volseg auto
            profile_call(runs[i][0], lambda i=i: call(i), device)
    ref, exact = outs[0], outs[2]  # official fp32; volseg fp32 (TF32 off)
    rows = []
    for i, ((name, opts), t, out) in enumerate(zip(runs, times, outs)):
        sec = statistics.median(t)
        same = float((labels_of(out, options.activation) == labels_of(ref, options.activation)).float().mean())
        same_fp32 = float((labels_of(out, options.activation) == labels_of(exact, options.activation)).float().mean())
        precision = "fp32 (TF32 as torch has it)" if opts is None else stats[i].get("precision")
        sec_by_stage = stats[i].get("seconds", {})
        stages = ", ".join(f"{k} {v:.3f}" for k, v in sec_by_stage.items())
        ok = opts is None or (same >= CUDA_AGREEMENT and same_fp32 >= CUDA_AGREEMENT)
        rows.append({"name": f"{arch}: {name}", "seconds": sec, "speedup": statistics.median(times[0]) / sec,
                     "first": first[i] if warm else None, "peak": peaks[i] / 2**20,
                     "diff": float((out - ref).abs().max()), "agree": 100 * same, "agree32": 100 * same_fp32,
                     "precision": precision, "batch": stats[i].get("sw_batch_size", 4 if arch != "mednext" else 1),
                     "note": stages, "ok": ok})
        print(f"  {name}: median {sec:.3f} s ({rows[-1]['speedup']:.2f}x official), first call {first[i]:.2f} s, "
              f"peak GPU {peaks[i] / 2**20:.0f} MiB, {precision}, window batch {rows[-1]['batch']}, "
              f"labels same as official {100 * same:.3f} %, as volseg fp32 {100 * same_fp32:.3f} %, "
              f"max |p - official| {rows[-1]['diff']:.1e}; stages: {stages}", flush=True)
    del outs, ref, exact
    model.cpu()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def describe_gpu(device) -> None:
    props = torch.cuda.get_device_properties(device)
    cap = torch.cuda.get_device_capability(device)
    try:
        tf32 = f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}"
    except RuntimeError:
        tf32 = "TF32 flags set through fp32_precision"
    print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {cap[0]}.{cap[1]}, "
          f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; {tf32}; "
          f"auto picks {run_precision(replace(load_card(CARDS['uxnet']).inference, precision='auto'), device)[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, repeats=1, quick_help="tiny configurations, ROI 32, no warm-up")
    parser.add_argument("--arch", nargs="+", default=list(CARDS), choices=list(CARDS))
    parser.add_argument("--roi", type=int, nargs=3, default=None, help="window (default 64^3 on CPU, the card's on CUDA)")
    parser.add_argument("--size", type=int, nargs=3, default=None, help="image size (default: two windows along z)")
    parser.add_argument("--mirroring", action="store_true", help="MedNeXt with nnU-Net's 8-fold mirroring (CUDA: on)")
    parser.add_argument("--no-mirroring", action="store_true", help="CUDA: MedNeXt without mirroring")
    parser.add_argument("--mednext-model", default="S", choices=("S", "B", "M", "L"),
                        help="CUDA: MedNeXt size (default S, kernel 3, as issue 16 measured it)")
    parser.add_argument("--gpu-table-on-cpu", action="store_true", help=argparse.SUPPRESS)  # the tests' smoke run
    parser.add_argument("--mednext-repeats", type=int, default=1, help="CUDA: timed rounds for MedNeXt (default 1)")
    parser.add_argument("--profile", action="store_true",
                        help="CUDA: after the timed rounds, one profiled call of official fp32 and volseg auto (top operators)")
    parser.add_argument("--core-rows", action="store_true",
                        help="CUDA: only official fp32, volseg auto and volseg fp32 (bench/gpu_check.sh's time budget)")
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime", "openvino"])
    args, device = common.start(parser, argv)
    if args.roi is None and device.type == "cpu":
        args.roi = (32, 32, 32) if args.quick else (64, 64, 64)
    if device.type == "cuda" or args.gpu_table_on_cpu:
        return main_cuda(args, device)
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


def main_cuda(args, device) -> int:
    if device.type == "cuda":
        describe_gpu(device)
    order = [a for a in args.arch if a in CARDS]  # in the order asked (gpu_check.sh: one network per step)
    columns = [Column("name", "path"), Column("seconds", "median s", "{:.3f}"),
               Column("speedup", "x official", "{:.2f}x"), Column("first", "first call s", "{:.2f}"),
               Column("peak", "peak GPU MiB", "{:.0f}"), Column("precision", "precision"),
               Column("batch", "window batch"), Column("agree", "same labels as official %", "{:.3f}"),
               Column("agree32", "same labels as volseg fp32 %", "{:.3f}"),
               Column("diff", "max abs diff vs official", "{:.1e}"), Column("note", "stages (s)")]
    t0 = time.perf_counter()
    rows = []
    for arch in order:  # each network's table as soon as it is done: a time limit keeps the finished ones
        part = bench_arch_cuda(arch, args, device)
        rows += part
        print()
        print(common.markdown_table(part, columns, baseline=part[0]["name"]))
        print(f"  ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return common.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
