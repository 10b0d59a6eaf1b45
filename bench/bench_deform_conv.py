"""Benchmark the pure-PyTorch depthwise deformable conv: new vs previous implementation vs ``F.conv3d``.

    python bench/bench_deform_conv.py [--roi 64] [--threads 2] [--repeats 3] [--device cpu|cuda]

For each DeformUX-Net stage shape of one ``roi``^3 window (batch 1; the published ROI is 96, the
default 64 keeps the run around a minute on 2 CPU cores) it times, in the same process:

* ``F.conv3d`` (depthwise 3x3x3, zero offsets: the baseline; a deformable conv cannot beat it);
* :func:`reference_deform_conv3d`, the engine's previous implementation, kept here verbatim
  (voxel-major im2col with masks; its gathered table was a strided view, which keeps
  ``embedding_bag`` off its vectorised path) with its automatic chunking;
* ``volseg``'s :func:`deform_conv3d` with automatic chunks and a few fixed chunk sizes,

all with the same random fractional offsets (std 1 voxel, so some taps leave the volume). It
prints time and peak-memory ratios against the baseline and the speed-up over the previous
implementation, plus the largest difference from it (and, at zero offsets, from ``F.conv3d``).
Peak memory is the largest resident-set growth during the call on CPU (large blocks are forced to
``mmap`` so freed memory really leaves the process), ``torch.cuda.max_memory_allocated`` growth
on GPU. Times are the best of ``--repeats`` calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "VolSegSlicer"))
from volseg.models.deform_conv import _auto_chunk, deform_conv3d  # noqa: E402

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


def force_mmap_for_large_blocks() -> None:
    """glibc: serve every block >= 64 KiB by mmap and return it on free, so RSS tracks live memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also disables its dynamic growth)
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: memory figures are then upper bounds on CPU


class PeakRSS:
    """Largest RSS growth over a block, sampled every millisecond (CPU)."""

    def __enter__(self) -> PeakRSS:
        self._proc = psutil.Process()
        gc.collect()
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def grown(self) -> int:
        return self.peak - self.base


def measure(fn, device: torch.device, repeats: int, warm_up: bool = True) -> tuple[float, int]:
    """(best seconds, peak extra bytes) of ``fn()``."""
    if warm_up:
        fn()
    best = float("inf")
    peak = 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        else:
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                out = fn()
                best = min(best, time.perf_counter() - t0)
            peak = max(peak, mem.grown)
        del out
    return best, peak


def stage_rows(channels: int, side: int, device: torch.device, repeats: int) -> list[dict]:
    """Time every method on one stage shape; returns table rows (seconds, bytes, max differences)."""
    x = torch.randn(1, channels, side, side, side, device=device)
    weight = torch.randn(channels, 1, 3, 3, 3, device=device)
    bias = torch.randn(channels, device=device)
    offset = torch.randn(1, 81, side, side, side, device=device)
    zero = torch.zeros_like(offset)
    conv = F.conv3d(x, weight, bias, padding=1, groups=channels)
    reference = reference_deform_conv3d(x, offset, weight, bias, 1)
    t_conv, m_conv = measure(lambda: F.conv3d(x, weight, bias, padding=1, groups=channels), device, repeats)
    t_ref, m_ref = measure(lambda: reference_deform_conv3d(x, offset, weight, bias, 1), device, repeats)
    rows = [dict(method="F.conv3d (baseline)", chunk="-", t=t_conv, m=m_conv, diff=0.0, zero_diff=0.0),
            dict(method="previous (reference)", chunk=str(reference_auto_chunk(1, channels, 27, side * side, side)),
                 t=t_ref, m=m_ref, diff=0.0,
                 zero_diff=float((reference_deform_conv3d(x, zero, weight, bias, 1) - conv).abs().max()))]
    auto = _auto_chunk(1, channels, 27, side * side, side, device.type)
    for chunk in sorted({1, auto, side}):
        def call(chunk=chunk):
            return deform_conv3d(x, offset, weight, bias, 1, chunk_size=chunk)
        diff = float((call() - reference).abs().max())
        zero_diff = float((deform_conv3d(x, zero, weight, bias, 1, chunk_size=chunk) - conv).abs().max())
        t, m = measure(call, device, repeats)
        rows.append(dict(method="deform_conv3d" + (" (auto)" if chunk == auto else ""), chunk=str(chunk),
                         t=t, m=m, diff=diff, zero_diff=zero_diff))
    for row in rows:
        row["x_conv"] = row["t"] / t_conv
        row["speedup"] = t_ref / row["t"]
        row["m_ratio"] = row["m"] / m_conv if m_conv >= 2**20 else None  # too small to compare
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roi", type=int, default=64, help="window side (96 = published; 64 default for speed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    force_mmap_for_large_blocks()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stages = [(c, args.roi // 2 ** (i + 1)) for i, c in enumerate(CHANNELS) if args.roi // 2 ** (i + 1) >= 1]
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"ROI {args.roi}^3, batch 1, random offsets (std 1 voxel), best of {args.repeats}")
    print("| stage (C, side) | method | chunk | time s | x conv3d | speed-up vs previous | peak MiB | "
          "x conv3d | max diff vs previous | max diff vs conv3d (zero offsets) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    with torch.no_grad():
        for channels, side in stages:
            for i, row in enumerate(stage_rows(channels, side, device, args.repeats)):
                label = f"({channels}, {side})" if i == 0 else ""
                m_ratio = "-" if row["m_ratio"] is None else f"{row['m_ratio']:.1f}"
                print(f"| {label} | {row['method']} | {row['chunk']} | {row['t']:.4f} | {row['x_conv']:.1f} | "
                      f"{row['speedup']:.1f} | {row['m'] / 2**20:.1f} | {m_ratio} | {row['diff']:.1e} | "
                      f"{row['zero_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
