"""Benchmark sliding-window inference settings through ``volseg.inference.sliding_window.predict``.

    python bench/bench_inference.py [--quick] [--model segformer3d|unet] [--size I J K] [--threads N]

A small network (tiny SegFormer3D, or a small MONAI UNet) runs over slicerio's chest CT
(CTChest4.nrrd, 128x128x34, intensities scaled by volseg.preprocessing.card_steps) or a synthetic volume of
``--size``. The baseline is a model card's default (sw_batch_size 1, overlap 0.5, constant
blending, no flips); each other row changes one setting. Columns: windows run (counted at the
network, checked against ``count_windows``), median time, peak memory, their ratios to the
baseline, and a correctness check: rows that must give the same result as the baseline
(window batching) are compared with ``allclose``; every row must give valid probabilities
(finite, summing to 1 over classes). When CUDA is available a last row runs the baseline on
the GPU with AMP (compared with the CPU result at 2e-2); otherwise a note says it was skipped.
A failed check makes the script exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Column
from volseg import models
from volseg.inference.sliding_window import InferenceOptions, count_windows, predict

#: Tiny configurations (a few hundred thousand parameters) so a CPU run stays short.
TINY = {
    "segformer3d": {"in_channels": 1, "embed_dims": [8, 16, 40, 64], "decoder_head_embedding_dim": 32, "num_classes": 3},
    "unet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": (8, 16, 32, 64), "strides": (2, 2, 2),
                 "num_res_units": 1},
}
#: Preprocessing of the CT, as a model card would list it.
CT_STEPS = [{"name": "ScaleIntensityRange",
             "args": {"a_min": -1000, "a_max": 1000, "b_min": 0.0, "b_max": 1.0, "clip": True}}]


class CountingModel(nn.Module):
    """Passes windows to ``net`` and counts them (shape (B, C, X, Y, Z) in, B windows)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.windows = 0
        self.runs = 0  # predict() calls, counted by the caller

    def per_run(self) -> float:
        return self.windows / max(1, self.runs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return self.net(x)


@dataclass
class Case:
    """One row: a name, the options, where it runs, and whether it must equal the baseline."""

    name: str
    options: InferenceOptions
    device: torch.device
    same_as_baseline: bool = False
    atol: float = 1e-5


def load_image(size: tuple[int, int, int] | None) -> tuple[torch.Tensor, str]:
    """(1, I, J, K) float32 network input in [0, 1] and a description of it."""
    if size is not None:
        g = torch.Generator().manual_seed(0)
        coarse = torch.rand((1, 1, *[max(2, s // 8) for s in size]), generator=g)
        image = torch.nn.functional.interpolate(coarse, size=tuple(size), mode="trilinear")[0]
        return image, f"synthetic smooth volume {tuple(size)}"
    import slicerio
    from volseg.io import read_volume
    from volseg.preprocessing.card_steps import preprocess

    path = Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"
    volume = read_volume(path)
    pre = preprocess(volume.array[None].astype(np.float32), volume.ijk_to_ras, CT_STEPS)
    return pre.image, f"slicerio CTChest4.nrrd {volume.spatial_shape}, ScaleIntensityRange [-1000, 1000] -> [0, 1]"


def build_cases(roi: tuple[int, int, int], cuda: bool) -> list[Case]:
    cpu = torch.device("cpu")
    base = InferenceOptions(roi_size=roi, overlap=0.5, mode="constant", sw_batch_size=1, amp=False)
    cases = [
        Case("baseline (sw 1, overlap 0.5, constant)", base, cpu),
        Case("sw_batch_size 2", replace(base, sw_batch_size=2), cpu, same_as_baseline=True),
        Case("sw_batch_size 4", replace(base, sw_batch_size=4), cpu, same_as_baseline=True),
        Case("overlap 0.25", replace(base, overlap=0.25), cpu),
        Case("overlap 0.75", replace(base, overlap=0.75), cpu),
        Case("gaussian blending", replace(base, mode="gaussian"), cpu),
        Case("3 test-time flips", replace(base, flips=((0,), (1,), (2,))), cpu),
        Case("activation_per_window", replace(base, activation_per_window=True), cpu),
    ]
    if cuda:
        # the card's window batch (auto sizing would run uncounted measuring windows)
        cases.append(Case("cuda + AMP", replace(base, amp=True, sw_batch_auto=False), torch.device("cuda"),
                          same_as_baseline=True,
                          atol=2e-2))
    return cases


def check(out: torch.Tensor, reference: torch.Tensor | None, case: Case) -> tuple[bool, str]:
    """Is ``out`` valid probabilities, and (where required) the baseline's result?"""
    if not torch.isfinite(out).all():
        return False, "FAIL: non-finite values"
    sums = out.sum(dim=0)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        return False, f"FAIL: class sums off by {float((sums - 1).abs().max()):.1e}"
    if case.same_as_baseline and reference is not None:
        if not torch.allclose(out, reference, atol=case.atol):
            return False, f"FAIL: differs from baseline by {float((out - reference).abs().max()):.1e}"
        return True, "ok (= baseline)"
    return True, "ok (valid probabilities)"


def run(model_name: str = "segformer3d", roi: tuple[int, int, int] = (64, 64, 32),
        size: tuple[int, int, int] | None = None, repeats: int = 3, warmup: int = 1,
        only: int | None = None) -> tuple[list[dict], str]:
    """Measure every case; return the table rows and a description of the input.

    ``only`` limits the run to the first ``only`` cases (the smoke test uses 2).
    """
    torch.manual_seed(0)
    net = models.create(model_name, **TINY[model_name]).eval()
    image, what = load_image(size)
    cases = build_cases(roi, torch.cuda.is_available())[:only]
    counters = [CountingModel(net) for _ in cases]  # share the weights, count windows per case
    def run_case(case: Case, counter: CountingModel) -> torch.Tensor:
        counter.runs += 1
        return predict(counter, image, case.options, case.device, output_device=torch.device("cpu"))

    fns = [(lambda c=case, m=m: run_case(c, m), case.device) for case, m in zip(cases, counters)]
    timings = common.measure_interleaved(fns, repeats=repeats, warmup=warmup)
    net.to("cpu")
    reference = timings[0].result
    rows: list[dict] = []
    for case, counter, timing in zip(cases, counters, timings):
        passes = 1 + len(case.options.flips)
        expected = count_windows(image.shape[1:], case.options.roi_size, case.options.overlap) * passes
        counted = counter.per_run()
        out = timing.result
        ok, note = check(out, reference, case)
        if counted != expected:
            ok, note = False, f"FAIL: {counted} windows run, count_windows says {expected}"
        rows.append({
            "name": case.name, "device": str(case.device), "windows": round(counted, 2), **common.timing_fields(timing),
            "max_diff": float((out - reference).abs().max()), "check": note, "ok": ok,
            "no_ratio": ("peak_mib", "cpu_seconds") if case.device.type != "cpu" else (),
        })
    return rows, what


COLUMNS = [Column("name", "setting"), Column("device", "device"), Column("windows", "windows", "{:g}"),
           *common.TIMING_COLUMNS, Column("max_diff", "max abs diff vs baseline", "{:.1e}"), Column("check", "check")]


def table(rows: list[dict]) -> str:
    return common.timing_table(rows, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, repeats=3, device=False)  # CPU rows, plus a CUDA row when available
    parser.add_argument("--model", choices=sorted(TINY), default="segformer3d")
    parser.add_argument("--roi", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="window size (default 64 64 32; SegFormer3D needs multiples of 32)")
    parser.add_argument("--size", type=int, nargs=3, default=None, metavar=("I", "J", "K"),
                        help="synthetic volume of this size instead of the chest CT")
    args, _ = common.start(parser, argv, environment_device="cuda" if torch.cuda.is_available() else "cpu")
    roi = tuple(args.roi or (64, 64, 32))
    rows, what = run(args.model, roi, tuple(args.size) if args.size else None, repeats=args.repeats,
                     warmup=0 if args.quick else 1)
    print(f"input: {what}; network: tiny {args.model}; ROI {list(roi)}; "
          f"{args.repeats} round(s) of timed calls, rows interleaved, median; "
          "CPU s = process CPU time; CPU memory = peak RSS growth")
    if not torch.cuda.is_available():
        print("note: CUDA is not available here, so the 'cuda + AMP' row was skipped")
    print()
    print(table(rows))
    return common.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
