"""Benchmark the pure-PyTorch depthwise deformable conv: new vs previous implementation vs ``F.conv3d``.

    python bench/bench_deform_conv.py [--quick] [--roi 64] [--threads 2] [--repeats 3] [--device cpu|cuda]

For each DeformUX-Net stage shape of one ``roi``^3 window (batch 1; the published ROI is 96, the
default 64 keeps the run around a minute on 2 CPU cores; ``--quick``: ROI 32, one round, no
warm-up) it times, in the same process:

* ``F.conv3d`` (depthwise 3x3x3, zero offsets: the baseline; a deformable conv cannot beat it);
* :func:`reference_deform_conv3d`, the engine's previous implementation, kept here verbatim
  (voxel-major im2col with masks; its gathered table was a strided view, which keeps
  ``embedding_bag`` off its vectorised path) with its automatic chunking;
* ``volseg``'s :func:`deform_conv3d` with automatic chunks and a few fixed chunk sizes,

all with the same random fractional offsets (std 1 voxel, so some taps leave the volume). It
prints time and peak-memory ratios against the baseline and the speed-up over the previous
implementation, plus the largest difference from it (and, at zero offsets, from ``F.conv3d``).
The rows of one stage are measured by :func:`common.measure_interleaved`: median of
``--repeats`` interleaved rounds after one warm-up call, with normal heap reuse; peak memory
from one more call per row (CPU: resident-set growth with large blocks forced to ``mmap``; GPU:
``torch.cuda.max_memory_allocated`` growth over the timed calls).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Column
from volseg.models.deform_conv import _auto_chunk, deform_conv3d

#: Channels of the four DeformUX-Net stages; their sides are roi/2, roi/4, roi/8, roi/16.
CHANNELS = (48, 96, 192, 384)

# --- the previous engine implementation (reference for speed and results) ----------------------

#: The previous implementation's bound on one chunk's sampled columns (elements).
REFERENCE_CHUNK_ELEMENTS = 1 << 26


def _axis_weights(low: torch.Tensor, frac: torch.Tensor, size: int) -> torch.Tensor:
    """Linear weights of the neighbours ``low`` and ``low + 1``, zero for those outside ``[0, size)``."""
    w_low = (1 - frac) * ((low >= 0) & (low < size))
    w_high = frac * ((low >= -1) & (low < size - 1))
    return torch.stack((w_low, w_high), dim=-1)


def _trilinear_taps(
    pd: torch.Tensor, ph: torch.Tensor, pw: torch.Tensor, size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices ``(M, 8)`` into the ``(B*D*H*W, C)`` input and weights ``(M, 8)``, zero outside."""
    D, H, W = size
    d0, h0, w0 = torch.floor(pd), torch.floor(ph), torch.floor(pw)
    wd = _axis_weights(d0, pd - d0, D)
    wh = _axis_weights(h0, ph - h0, H)
    ww = _axis_weights(w0, pw - w0, W)
    weight = (wd[..., :, None, None] * wh[..., None, :, None]) * ww[..., None, None, :]
    batch = torch.arange(pd.shape[0], device=pd.device).view((-1,) + (1,) * (pd.dim() - 1))
    corner = ((batch * D + d0.long()) * H + h0.long()) * W + w0.long()
    delta = torch.tensor([a * H * W + b * W + c for a in (0, 1) for b in (0, 1) for c in (0, 1)],
                         device=pd.device)
    index = (corner.unsqueeze(-1) + delta).clamp_(0, pd.shape[0] * D * H * W - 1)
    return index.reshape(-1, 8), weight.reshape(-1, 8)


def reference_auto_chunk(batch: int, channels: int, n_points: int, plane: int, depth: int) -> int:
    per_slice = batch * n_points * plane * (channels + 24)
    return max(1, min(depth, REFERENCE_CHUNK_ELEMENTS // max(1, per_slice)))


def reference_deform_conv3d(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: int = 1,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The previous ``volseg`` implementation (same contract as :func:`deform_conv3d`)."""
    B, C, D, H, W = x.shape
    k = weight.shape[-1]
    out_size = (D + 2 * padding - k + 1, H + 2 * padding - k + 1, W + 2 * padding - k + 1)
    n_points = k ** 3
    Do, Ho, Wo = out_size
    step = reference_auto_chunk(B, C, n_points, Ho * Wo, Do) if chunk_size is None else max(1, int(chunk_size))
    rows = x.permute(0, 2, 3, 4, 1).reshape(B * D * H * W, C)
    kernel_t = weight.reshape(C, n_points).t().to(x.dtype)  # (K, C)
    pos_dtype = torch.promote_types(x.dtype, torch.float32)
    offset = offset.to(pos_dtype).view(B, n_points, 3, Do, Ho, Wo)
    taps = torch.arange(k, device=x.device, dtype=pos_dtype) - padding
    tap_d = taps.repeat_interleave(k * k).view(1, n_points, 1, 1, 1)
    tap_h = taps.repeat_interleave(k).repeat(k).view(1, n_points, 1, 1, 1)
    tap_w = taps.repeat(k * k).view(1, n_points, 1, 1, 1)
    grid_h = torch.arange(Ho, device=x.device, dtype=pos_dtype).view(1, 1, 1, Ho, 1) + tap_h
    grid_w = torch.arange(Wo, device=x.device, dtype=pos_dtype).view(1, 1, 1, 1, Wo) + tap_w
    chunks = []
    for d0 in range(0, Do, step):
        d1 = min(Do, d0 + step)
        off = offset[:, :, :, d0:d1]  # (B, K, 3, n, Ho, Wo)
        grid_d = torch.arange(d0, d1, device=x.device, dtype=pos_dtype).view(1, 1, -1, 1, 1) + tap_d
        pd = (grid_d + off[:, :, 0]).permute(0, 2, 3, 4, 1)
        ph = (grid_h + off[:, :, 1]).permute(0, 2, 3, 4, 1)
        pw = (grid_w + off[:, :, 2]).permute(0, 2, 3, 4, 1)
        index, tap_weight = _trilinear_taps(pd, ph, pw, (D, H, W))
        sampled = F.embedding_bag(index, rows, per_sample_weights=tap_weight.to(rows.dtype), mode="sum")
        sampled = sampled.view(-1, n_points, C).mul_(kernel_t).sum(dim=1)
        chunks.append(sampled.view(B, d1 - d0, Ho, Wo, C))
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.permute(0, 4, 1, 2, 3)


# --- measurement ----------------------------------------------------------------------------------


#: Largest difference allowed from the previous implementation and, at zero offsets, from ``F.conv3d``
#: (float32 sums of 27 taps of unit-variance values; on CUDA ``F.conv3d`` may use TF32).
TOLERANCE = {"cpu": 1e-3, "cuda": 5e-2}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def stage_rows(channels: int, side: int, device: torch.device, repeats: int, warmup: int = 1) -> list[dict]:
    """Time every method on one stage shape (interleaved rounds); returns the table rows of the stage."""
    x = torch.randn(1, channels, side, side, side, device=device)
    weight = torch.randn(channels, 1, 3, 3, 3, device=device)
    bias = torch.randn(channels, device=device)
    offset = torch.randn(1, 81, side, side, side, device=device)
    zero = torch.zeros_like(offset)
    auto = _auto_chunk(1, channels, 27, side * side, side, device.type)
    chunks = sorted({1, auto, side})
    methods = [  # (method, chunk shown, the timed call, its output at zero offsets)
        ("F.conv3d (baseline)", "-", lambda: F.conv3d(x, weight, bias, padding=1, groups=channels), None),
        ("previous (reference)", str(reference_auto_chunk(1, channels, 27, side * side, side)),
         lambda: reference_deform_conv3d(x, offset, weight, bias, 1),
         lambda: reference_deform_conv3d(x, zero, weight, bias, 1)),
    ] + [("deform_conv3d" + (" (auto)" if chunk == auto else ""), str(chunk),
          lambda c=chunk: deform_conv3d(x, offset, weight, bias, 1, chunk_size=c),
          lambda c=chunk: deform_conv3d(x, zero, weight, bias, 1, chunk_size=c)) for chunk in chunks]
    timings = common.measure_interleaved([(call, device) for _, _, call, _ in methods], repeats=repeats,
                                         warmup=warmup)
    conv, reference = timings[0].result, timings[1].result
    t_ref = timings[1].seconds
    small = timings[0].peak_bytes < common.MiB  # the baseline's memory is too small to compare with
    tolerance = TOLERANCE.get(device.type, TOLERANCE["cuda"])
    rows = []
    for i, ((method, chunk, _, at_zero), timing) in enumerate(zip(methods, timings)):
        diff = 0.0 if i < 2 else _max_diff(timing.result, reference)
        zero_diff = 0.0 if at_zero is None else _max_diff(at_zero(), conv)
        rows.append({
            "stage": f"({channels}, {side})" if i == 0 else "", "method": method, "chunk": chunk,
            "case": f"{method}, chunk {chunk}, stage ({channels}, {side})",
            **common.timing_fields(timing), "speedup": t_ref / timing.seconds, "diff": diff, "zero_diff": zero_diff,
            "ok": max(diff, zero_diff) <= tolerance, "no_ratio": ("peak_mib",) if small else (),
        })
    return rows


COLUMNS = [Column("stage", "stage (C, side)"), Column("method", "method"), Column("chunk", "chunk"),
           Column("seconds", "median s", "{:.4f}"), Column("cpu_seconds", "CPU s", "{:.3f}"),
           Column("speedup", "speed-up vs previous", "{:.1f}"), Column("peak_mib", "peak MiB", "{:.1f}"),
           Column("diff", "max diff vs previous", "{:.1e}"),
           Column("zero_diff", "max diff vs conv3d (zero offsets)", "{:.1e}")]
RATIOS = [("seconds", "x conv3d"), ("cpu_seconds", "CPU x conv3d"), ("peak_mib", "memory x conv3d")]


def stage_table(rows: list[dict], header: bool = True) -> str:
    """The stage's rows as Markdown, ratios against its ``F.conv3d`` row (without the header lines)."""
    lines = common.markdown_table(rows, COLUMNS, baseline=rows[0]["method"], name_key="method",
                                  ratio_of=RATIOS).splitlines()
    return "\n".join(lines if header else lines[2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, repeats=3, quick_help="ROI 32, one round, no warm-up", threads=2,
                           default_device="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--roi", type=int, default=None,
                        help="window side (96 = published; default 64 for speed, 32 with --quick)")
    args, device = common.start(parser, argv)
    roi = args.roi or (32 if args.quick else 64)
    stages = [(c, roi // 2 ** (i + 1)) for i, c in enumerate(CHANNELS) if roi // 2 ** (i + 1) >= 1]
    print(f"ROI {roi}^3, batch 1, random offsets (std 1 voxel); median of {args.repeats} interleaved round(s) "
          "per stage; CPU memory = peak RSS growth in a separate call; memory ratio n/a: the baseline's peak "
          "is under 1 MiB; a max diff over "
          f"{TOLERANCE.get(device.type, TOLERANCE['cuda']):g} fails the run (exit status 1)")
    print()
    torch.manual_seed(0)
    all_rows: list[dict] = []
    with torch.no_grad():
        for i, (channels, side) in enumerate(stages):
            rows = stage_rows(channels, side, device, args.repeats, warmup=0 if args.quick else 1)
            print(stage_table(rows, header=i == 0), flush=True)
            all_rows += rows
    return common.exit_status(all_rows, name_key="case")


if __name__ == "__main__":
    sys.exit(main())
