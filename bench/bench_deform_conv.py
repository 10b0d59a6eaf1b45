"""Benchmark the pure-PyTorch depthwise deformable conv against ``F.conv3d``.

    python bench/bench_deform_conv.py [--roi 64] [--threads 2] [--repeats 1] [--device cpu|cuda]

For each DeformUX-Net stage shape of one ``roi``^3 window (batch 1; the published ROI is 96, the
default 64 keeps the run under about a minute on 2 CPU cores) it times ``F.conv3d`` (depthwise
3x3x3, the baseline) and ``deform_conv3d`` with zero offsets at several chunk sizes, and prints
time and peak-memory ratios against the baseline measured in the same process. Peak memory is the
largest resident-set growth during the call on CPU (large blocks are forced to ``mmap`` so freed
memory really leaves the process), ``torch.cuda.max_memory_allocated`` growth on GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "VolSegSlicer"))
from volseg.models.deform_conv import _auto_chunk, deform_conv3d  # noqa: E402

#: Channels of the four DeformUX-Net stages; their sides are roi/2, roi/4, roi/8, roi/16.
CHANNELS = (48, 96, 192, 384)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roi", type=int, default=64, help="window side (96 = published; 64 default for speed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    force_mmap_for_large_blocks()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stages = [(c, args.roi // 2 ** (i + 1)) for i, c in enumerate(CHANNELS) if args.roi // 2 ** (i + 1) >= 1]
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"ROI {args.roi}^3, batch 1, zero offsets")
    header = (f"{'stage (C, side)':<16} {'method':<22} {'chunk':>6} {'time s':>9} {'x conv3d':>9} "
              f"{'peak MiB':>9} {'x conv3d':>9} {'max|diff|':>10}")
    print(header)
    print("-" * len(header))
    torch.manual_seed(0)
    with torch.no_grad():
        for channels, side in stages:
            x = torch.randn(1, channels, side, side, side, device=device)
            weight = torch.randn(channels, 1, 3, 3, 3, device=device)
            bias = torch.randn(channels, device=device)
            offset = torch.zeros(1, 81, side, side, side, device=device)
            ref = F.conv3d(x, weight, bias, padding=1, groups=channels)
            t_ref, m_ref = measure(lambda: F.conv3d(x, weight, bias, padding=1, groups=channels), device,
                                   args.repeats)
            label = f"({channels}, {side})"
            print(f"{label:<16} {'F.conv3d (baseline)':<22} {'-':>6} {t_ref:9.4f} {1.0:9.1f} "
                  f"{m_ref / 2**20:9.1f} {1.0:9.1f} {0.0:10.1e}")
            auto = _auto_chunk(1, channels, 27, side * side, side)
            for chunk in sorted({max(1, side // 8), auto, side}):
                out = deform_conv3d(x, offset, weight, bias, 1, chunk_size=chunk)
                diff = float((out - ref).abs().max())
                t, m = measure(lambda: deform_conv3d(x, offset, weight, bias, 1, chunk_size=chunk), device,
                               args.repeats, warm_up=False)  # the correctness call above warmed it up
                name = "deform_conv3d" + (" (auto)" if chunk == auto else "")
                mem_ratio = f"{m / m_ref:9.1f}" if m_ref >= 2**20 else f"{'-':>9}"  # too small to compare
                print(f"{'':<16} {name:<22} {chunk:>6} {t:9.4f} {t / t_ref:9.1f} {m / 2**20:9.1f} "
                      f"{mem_ratio} {diff:10.1e}")


if __name__ == "__main__":
    main()
