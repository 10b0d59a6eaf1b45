"""Benchmark one forward pass of each seed architecture: time and peak memory.

    python bench/bench_models.py [--quick] [--published [--published-size 64]] [--device cuda]

Tiny configurations (default): the networks of ``Testing/golden/*_small.pt`` -- built by
``volseg.models.load`` from the golden state dicts, run on the golden 32^3 input, and checked
against the output the official code produced (relative error < 1e-4), so a fast but wrong
change fails. Baseline: a MONAI UNet of comparable parameter count on the same input.

``--published``: the published configurations of ``Testing/golden/manifests/*_default.json``
(constructor kwargs), randomly initialised, on a reduced ``--published-size``^3 input (the
published ROIs are 96^3-128^3). Checked: parameter count equal to the manifest's, output shape,
finite values. Baseline: a MONAI UNet of similar size (about 19 M parameters).

A failed check makes the script exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Column
from volseg import models

GOLDEN_DIR = common.REPO_ROOT / "Testing" / "golden"

#: Golden file -> (registry name, constructor arguments a state dict cannot show).
TINY_GOLDEN = {
    "uxnet_small.pt": ("uxnet", {}),
    "repuxnet_small.pt": ("repuxnet", {}),
    "deformuxnet_small.pt": ("deformuxnet", {}),
    "deformuxnet_egg_small.pt": ("deformuxnet", {}),
    "segformer3d_small.pt": ("segformer3d", {}),
    "mednext_small.pt": ("mednext", {}),
    "mednext_small_k5.pt": ("mednext", {}),
}
UNET_TINY = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": (16, 32, 64, 128), "strides": (2, 2, 2),
                 "num_res_units": 1}  # 0.60 M parameters, like the golden tiny networks (0.1-0.6 M)
UNET_PUBLISHED = {"spatial_dims": 3, "in_channels": 1, "out_channels": 14, "channels": (32, 64, 128, 256, 512),
                      "strides": (2, 2, 2, 2), "num_res_units": 2}  # 19.2 M parameters (published nets: 5-66 M)
#: DeformUX-Net variants differ in a switch the manifest names but the constructor spells out.
VARIANT_KWARGS = {("deformuxnet", "source"): {"offset_kernel_size": 1}, ("deformuxnet", "egg"): {"offset_kernel_size": 3}}


@dataclass
class Case:
    """A network, its input, and how to check its output."""

    name: str
    net: nn.Module
    x: torch.Tensor
    expected: torch.Tensor | None = None  # golden output to match
    expected_shape: tuple[int, ...] | None = None
    expected_params: int | None = None


def _first(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, list | tuple) else y


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def tiny_cases(golden_dir: Path = GOLDEN_DIR, names: list[str] | None = None) -> list[Case]:
    torch.manual_seed(0)
    unet = models.create("unet", **UNET_TINY).eval()
    cases = [Case("MONAI UNet (baseline)", unet, torch.randn(1, 1, 32, 32, 32), expected_shape=(1, 3, 32, 32, 32))]
    for filename, (arch, extra) in TINY_GOLDEN.items():
        if names is not None and filename not in names:
            continue
        g = torch.load(golden_dir / filename, weights_only=True)
        net = models.load(arch, g["state_dict"], **extra)
        x = g["input"][:1]
        ref = g.get("output_per_sample_batch1", g["output"])
        ref = _first(ref)[:1]
        label = f"{arch} ({g['variant']})" if g.get("variant") else arch
        if filename.endswith("_k5.pt"):
            label += " k5"
        cases.append(Case(label, net, x, expected=ref, expected_params=g["n_params"]))
    return cases


def published_cases(size: int, manifest_dir: Path = GOLDEN_DIR / "manifests") -> list[Case]:
    torch.manual_seed(0)
    cases = [Case("MONAI UNet (baseline)", models.create("unet", **UNET_PUBLISHED).eval(),
                  torch.randn(1, 1, size, size, size), expected_shape=(1, 14, size, size, size))]
    for path in sorted(manifest_dir.glob("*_default.json")):
        info = json.loads(path.read_text())
        config = info["config"]
        arch = config["family"]
        kwargs = {**config["kwargs"], **VARIANT_KWARGS.get((arch, config.get("variant")), {})}
        net = models.create(arch, **kwargs).eval()
        channels = config["input"][1]
        label = info["name"] + (" (source)" if config.get("variant") == "source" else "")
        cases.append(Case(label, net, torch.randn(1, channels, size, size, size), expected_params=info["n_params"]))
    return cases


def check(case: Case, y: Any) -> tuple[bool, str]:
    out = _first(y)
    if case.expected_params is not None and n_params(case.net) != case.expected_params:
        return False, f"FAIL: {n_params(case.net)} parameters, expected {case.expected_params}"
    if not torch.isfinite(out).all():
        return False, "FAIL: non-finite output"
    if case.expected_shape is not None and tuple(out.shape) != case.expected_shape:
        return False, f"FAIL: output shape {tuple(out.shape)}, expected {case.expected_shape}"
    if case.expected is not None:
        if out.shape != case.expected.shape:
            return False, f"FAIL: output shape {tuple(out.shape)}, golden {tuple(case.expected.shape)}"
        err = float((out.detach().cpu() - case.expected).abs().max() / case.expected.abs().max())
        if err > 1e-4:
            return False, f"FAIL: relative error {err:.1e} vs golden"
        return True, f"ok (golden, rel err {err:.0e})"
    return True, "ok (params, shape, finite)" if case.expected_params else "ok (shape, finite)"


def run(cases: list[Case], device: torch.device, repeats: int = 3, warmup: int = 1) -> list[dict]:
    def forward(case: Case) -> Any:
        with torch.inference_mode():
            return case.net(case.x)

    for case in cases:
        case.net.to(device)
        case.x = case.x.to(device)
    timings = common.measure_interleaved([(lambda c=c: forward(c), device) for c in cases],
                                         repeats=repeats, warmup=warmup)
    rows = []
    for case, timing in zip(cases, timings):
        ok, note = check(case, timing.result)
        rows.append({"name": case.name, "params_m": n_params(case.net) / 1e6,
                     "input": "x".join(str(s) for s in case.x.shape[1:]), **common.timing_fields(timing),
                     "check": note, "ok": ok})
        case.net.to("cpu")
    return rows


COLUMNS = [Column("name", "network"), Column("params_m", "params M", "{:.2f}"), Column("input", "input (C x D x H x W)"),
           *common.TIMING_COLUMNS, Column("check", "check")]


def table(rows: list[dict]) -> str:
    return common.timing_table(rows, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, repeats=3)
    parser.add_argument("--published", action="store_true",
                        help="also the published configurations (from the golden manifests) at a reduced input")
    parser.add_argument("--published-size", type=int, default=64, help="input side for --published (default 64)")
    args, device = common.start(parser, argv)
    print(f"one forward pass, batch 1, inference mode, float32; {args.repeats} round(s), rows interleaved, "
          "median; CPU memory = peak RSS growth, GPU = max_memory_allocated growth")
    print("\n### Tiny configurations (golden files, 32^3 input)\n")
    rows = run(tiny_cases(), device, repeats=args.repeats, warmup=0 if args.quick else 1)
    print(table(rows))
    if args.published:
        print(f"\n### Published configurations (manifests), {args.published_size}^3 input\n")
        published = run(published_cases(args.published_size), device, repeats=args.repeats, warmup=1)
        print(table(published))
        rows += published
    return common.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
