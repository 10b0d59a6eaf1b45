"""What volseg adds around the network: ``predict`` against plain MONAI plus the activation, interleaved.

    python bench/bench_window_overhead.py [--quick] [--device cpu|cuda] [--size I J K] [--repeats N]
                                          [--nets segformer3d conv]

Issue 16 asked whether SegFormer3D's small network loses its GPU speed-up to per-window work
around it (pad/crop copies, importance maps rebuilt per call, dtype casts, host syncs). Each
case runs, round by round in one process, the **baseline** -- MONAI's ``sliding_window_inference``
with the same window batch, overlap and blending, the flips done by hand, then the activation:
what volseg's MONAI mode must equal -- and **volseg**'s ``predict`` (torch runtime, float32,
the window batch fixed to the card's). Cases: a tiny SegFormer3D (4 inputs, 3 sigmoid outputs,
as the BraTS card) and a 1x1x1 convolution (a network that costs nothing, so the row is volseg's
overhead alone), without and with two flips. Columns: median wall seconds and their ratio, median
CPU seconds (steadier on a shared machine), volseg's extra CPU milliseconds per window, and whether
the outputs are the same (the check: float32 on the CPU bit for bit; on CUDA within 1e-5).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Column
from volseg import models
from volseg.cards import load_card
from volseg.inference.sliding_window import count_windows, predict

TINY_SEGFORMER = {"embed_dims": [8, 16, 40, 64], "decoder_head_embedding_dim": 32}


def baseline(net, image: torch.Tensor, options, device: torch.device) -> torch.Tensor:
    """MONAI's sliding window per pass (flipped input, flipped back), averaged, then the activation."""
    with torch.inference_mode():
        x = image[None].to(device)
        passes = []
        for axes in [(), *options.flips]:
            dims = [a + 2 for a in axes]
            y = sliding_window_inference(torch.flip(x, dims) if axes else x, list(options.roi_size),
                                         options.sw_batch_size, net, overlap=options.overlap, mode=options.mode)
            y = torch.flip(y, dims) if axes else y
            passes.append(torch.sigmoid(y) if options.activation == "sigmoid" else torch.softmax(y, 1))
        return (sum(passes[1:], passes[0]) / len(passes))[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, repeats=7, quick_help="small volume, one round")
    parser.add_argument("--size", type=int, nargs=3, default=None, help="image I J K (default 96 96 64; --quick 64 64 48)")
    parser.add_argument("--nets", nargs="+", default=["segformer3d", "conv"], choices=["segformer3d", "conv"])
    args, device = common.start(parser, argv)
    size = tuple(args.size or ((64, 64, 48) if args.quick else (96, 96, 64)))
    card = load_card("segformer3d-brats")
    torch.manual_seed(0)
    nets = {}
    if "segformer3d" in args.nets:
        nets["tiny SegFormer3D"] = models.create(card.architecture, **{**card.config, **TINY_SEGFORMER}).eval().to(device)
    if "conv" in args.nets:
        nets["1x1x1 conv (overhead only)"] = torch.nn.Conv3d(4, 3, 1).eval().to(device)
    image = torch.randn(4, *size, generator=torch.Generator().manual_seed(1))
    base_opts = replace(card.inference, roi_size=(32, 32, 32), out_channels=None, runtime="torch", precision="fp32",
                        amp=False, sw_batch_auto=False, flips=())
    rows = []
    for net_name, net in nets.items():
        for flips in ((), ((0,), (1, 2))):
            opts = replace(base_opts, flips=flips)
            windows = count_windows(size, opts.roi_size, opts.overlap) * (1 + len(flips))
            timings = common.measure_interleaved(
                [(lambda n=net, o=opts: baseline(n, image, o, device), device),
                 (lambda n=net, o=opts: predict(n, image, o, device), device)], repeats=args.repeats, warmup=1)
            ref, out = timings[0].result, timings[1].result
            exact = torch.equal(out, ref) if device.type == "cpu" else float((out - ref).abs().max()) <= 1e-5
            case = f"{net_name}, {'no flips' if not flips else f'{len(flips)} flips'}"
            for name, t in (("baseline: MONAI + activation", timings[0]), ("volseg predict", timings[1])):
                rows.append({"case": case, "name": f"{case}: {name}", "path": name, "seconds": t.seconds,
                             "cpu": t.cpu_seconds, "ratio": timings[0].seconds / t.seconds, "windows": windows,
                             "extra_ms": 1000 * (t.cpu_seconds - timings[0].cpu_seconds) / windows,
                             "same": "identical" if exact else "DIFFERS", "ok": exact})
    columns = [Column("case", "case"), Column("path", "path"), Column("windows", "windows"),
               Column("seconds", "median s", "{:.4f}"), Column("ratio", "speed vs baseline", "{:.2f}x"),
               Column("cpu", "median CPU s", "{:.4f}"), Column("extra_ms", "extra CPU ms per window", "{:+.3f}"),
               Column("same", "output")]
    print(f"\nimage 4x{'x'.join(map(str, size))}, ROI 32^3, window batch {base_opts.sw_batch_size}, "
          f"overlap {base_opts.overlap}, {base_opts.mode} blending, {base_opts.activation}, {args.repeats} rounds\n")
    print(common.markdown_table(rows, columns, baseline=rows[0]["name"]))
    return common.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
