"""Benchmark RepUX-Net's exact centre-only fast path against the full ``ks``^3 depthwise conv.

    python bench/bench_repux.py [--quick] [--roi 64] [--ks 21] [--no-network] [--repeats 3] [--threads 2]

Checkpoints trained with the official RepUX-Net code are expected to hold 21^3 kernels whose
off-centre taps are exactly 0 (REFERENCE sections 2 and 8); ``volseg`` then replaces each block's
conv by the identical per-channel scale (:class:`volseg.models.repuxnet.RepUXBlock`). For each
encoder stage of one ``roi``^3 window (batch 1, eval, no grad) the table times one stage (its
two blocks) with

* full, random ``ks``^3 kernels (the baseline: what any RepUX-Net costs without the fast path),
* centre-only kernels with the fast path switched off (the same conv on zeros: shows the work
  the fast path saves, and checks the baseline does not get faster on zeros),
* centre-only kernels with the fast path (what ``volseg`` runs),

and, unless ``--no-network``, the whole published network (65.8 M parameters) the same three ways.
Each fast-path row is checked bit for bit against the conv on the same centre-only weights
(column "equal"); a mismatch makes the script exit with status 1. Rows of one group are timed in
interleaved rounds (median), so a change in machine load hits all alike.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Column
from volseg.models.repuxnet import RepUXBlock, RepUXNet

#: Channels of the four encoder stages; their sides are roi/2, roi/4, roi/8, roi/16.
CHANNELS = (48, 96, 192, 384)


def make_centre_only(module: nn.Module) -> None:
    """Zero every off-centre tap of every RepUX block's depthwise kernel (in place)."""
    with torch.no_grad():
        for block in module.modules():
            if isinstance(block, RepUXBlock):
                weight = block.dwconv.weight
                c = weight.shape[-1] // 2
                centre = weight[:, :, c, c, c].clone()
                weight.zero_()
                weight[:, :, c, c, c] = centre


@contextmanager
def fast_path_disabled():
    """Force the full conv in every :class:`RepUXBlock` within the block."""
    original = RepUXBlock.uses_fast_path
    RepUXBlock.uses_fast_path = lambda self, x: False
    try:
        yield
    finally:
        RepUXBlock.uses_fast_path = original


def _without_fast_path(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        with fast_path_disabled():
            return fn()
    return call


def compare(name: str, full: nn.Module, centre: nn.Module, x: torch.Tensor, device: torch.device,
            repeats: int, warmup: int) -> tuple[list[dict], bool]:
    """Rows for one module pair: full kernels (baseline), centre-only without / with the fast path."""
    with torch.no_grad():
        timings = common.measure_interleaved([
            (lambda: full(x), device),
            (_without_fast_path(lambda: centre(x)), device),
            (lambda: centre(x), device),
        ], repeats=repeats, warmup=warmup)
    _, t_conv, t_fast = timings
    equal = torch.equal(t_fast.result, t_conv.result)
    labels = ("full kernels (baseline)", "centre-only, full conv", "centre-only, fast path")
    rows = [{"name": f"{name}: {label}", "s": t.seconds, "cpu": t.cpu_seconds, "mib": common.mib(t.peak_bytes),
             "equal": None} for label, t in zip(labels, timings)]
    rows[2]["equal"] = "yes" if equal else "NO"
    return rows, equal


def stage_case(channels: int, side: int, ks: int, device: torch.device) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """Two random RepUX blocks (one stage) with full kernels, a centre-only copy, and an input."""
    full = nn.Sequential(RepUXBlock(channels, ks), RepUXBlock(channels, ks)).to(device).eval()
    centre = nn.Sequential(RepUXBlock(channels, ks), RepUXBlock(channels, ks)).to(device).eval()
    centre.load_state_dict(full.state_dict())
    make_centre_only(centre)
    return full, centre, torch.randn(1, channels, side, side, side, device=device)


def network_case(roi: int, ks: int, device: torch.device) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """The published RepUX-Net (16 classes, AMOS), random weights, and a centre-only copy."""
    kwargs = {"in_chans": 1, "out_chans": 16, "ks": ks}
    full = RepUXNet(**kwargs).to(device).eval()
    centre = RepUXNet(**kwargs).to(device).eval()
    centre.load_state_dict(full.state_dict())
    make_centre_only(centre)
    assert centre.centre_only_blocks() == (8, 8) and full.centre_only_blocks()[0] == 0
    return full, centre, torch.randn(1, 1, roi, roi, roi, device=device)


def run(roi: int, ks: int, network: bool, device: torch.device, repeats: int, warmup: int,
        on_table: Callable[[str], None] | None = None) -> tuple[list[str], bool]:
    """Markdown tables (one per stage, one for the network; each also passed to ``on_table`` as soon
    as it is measured); whether every fast path was exact."""
    columns = [Column("name", "case"), Column("s", "time s", "{:.4f}"), Column("cpu", "CPU s", "{:.3f}"),
               Column("mib", "peak MiB", "{:.1f}"), Column("equal", "equal to conv")]
    tables, all_equal = [], True
    torch.manual_seed(0)
    cases = [(f"stage ({c}, {roi // 2 ** (i + 1)}^3)", lambda c=c, i=i: stage_case(c, roi // 2 ** (i + 1), ks, device))
             for i, c in enumerate(CHANNELS) if roi // 2 ** (i + 1) >= 1]
    if network:
        cases.append((f"network {roi}^3", lambda: network_case(roi, ks, device)))
    for name, build in cases:
        full, centre, x = build()
        rows, equal = compare(name, full, centre, x, device, repeats, warmup)
        all_equal &= equal
        tables.append(common.markdown_table(rows, columns, baseline=rows[0]["name"],
                                            ratio_of=[("s", "x baseline"), ("cpu", "CPU x")]))
        if on_table is not None:
            on_table(tables[-1])
        del full, centre, x
    return tables, all_equal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, repeats=3, quick_help="ROI 32, no network, one round, no warm-up")
    parser.add_argument("--roi", type=int, default=None,
                        help="window side (96 = published; default 64 for speed, 32 with --quick)")
    parser.add_argument("--ks", type=int, default=21, help="depthwise kernel size (21 published)")
    parser.add_argument("--no-network", action="store_true", help="stages only")
    args, device = common.start(parser, argv)
    roi = args.roi or (32 if args.quick else 64)
    repeats = args.repeats
    print(f"RepUX-Net {args.ks}^3 depthwise blocks, batch 1, eval, no grad, ROI {roi}^3, "
          f"median of {repeats} interleaved rounds")
    _, all_equal = run(roi, args.ks, network=not (args.quick or args.no_network), device=device,
                       repeats=repeats, warmup=0 if args.quick else 1,
                       on_table=lambda table: print(f"\n{table}", flush=True))
    if not all_equal:
        print("\nFAIL: the fast path differs from the conv on centre-only kernels")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
