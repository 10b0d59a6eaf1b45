"""The settings a run changes on a CUDA GPU, for its duration only, and the window batch it picks.

- :func:`run_settings`: TF32 off when the precision is ``fp32``
  (:func:`volseg.inference.precision.exact_fp32`), cuDNN autotuning (``cudnn.benchmark``) per
  ``options.cudnn_benchmark``; the process's own settings come back afterwards.
- :func:`resolve_window_batch`: with ``options.sw_batch_auto`` on CUDA, the window batch sized
  from the free memory (:mod:`volseg.inference.window_batch`).
- :func:`to_device`: one copy of the image to the device (asynchronous from pinned memory).
- :class:`StepTimer`: per-step seconds for benchmarks (synchronising the device only when asked),
  and the network's own seconds within them.

On the CPU each is a no-op, so the CPU path is exactly what it was.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator
from dataclasses import replace

import torch

from volseg.inference.precision import autocast_dtype, exact_fp32
from volseg.inference.window_batch import (
    measure_window_bytes,
    official_limit_bytes,
    stitch_bytes,
    wants_free_memory,
    window_batch_size,
)
from volseg.memory import gpu_available_bytes
from volseg.options import InferenceOptions

__all__ = ["StepTimer", "memory_format", "resolve_window_batch", "run_settings", "set_weight_layout", "to_device"]


def memory_format(options: InferenceOptions, device: torch.device) -> torch.memory_format:
    """channels-last 3D (NDHWC) for the windows and the network when the options ask and the device is CUDA."""
    if options.channels_last and device.type == "cuda":
        return torch.channels_last_3d
    return torch.contiguous_format


_channels_last_models: weakref.WeakSet = weakref.WeakSet()


def set_weight_layout(model, fmt: torch.memory_format) -> None:
    """Put a network's weights in the windows' memory format: channels-last 3D when asked, and
    back to contiguous for a network an earlier run converted (others are left untouched)."""
    if not isinstance(model, torch.nn.Module):
        return
    if fmt is torch.channels_last_3d:
        model.to(memory_format=fmt)
        _channels_last_models.add(model)
    elif model in _channels_last_models:
        model.to(memory_format=torch.contiguous_format)
        _channels_last_models.discard(model)


@contextlib.contextmanager
def run_settings(device: torch.device, precision: str, options: InferenceOptions) -> Iterator[None]:
    """TF32 off for ``fp32`` and cuDNN autotuning as ``options`` say, on CUDA, for the block only."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(options.cudnn_benchmark)
    try:
        with exact_fp32(precision == "fp32"):
            yield
    finally:
        torch.backends.cudnn.benchmark = saved


def to_device(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``image`` (MetaTensor bookkeeping dropped) on ``device``: one copy, non-blocking from pinned memory."""
    plain = image.as_tensor() if hasattr(image, "as_tensor") else image
    if plain.device == device:
        return plain
    return plain.to(device, non_blocking=device.type == "cuda" and plain.is_pinned())


def resolve_window_batch(model, image: torch.Tensor, options: InferenceOptions, device: torch.device,
                         precision: str, windows: int) -> InferenceOptions:
    """``options`` with ``sw_batch_size`` chosen from the GPU's free memory when
    ``options.sw_batch_auto`` and ``device`` is a CUDA GPU (one window's forward pass is measured
    once per network and window size); otherwise ``options`` unchanged.

    A batch may use half the free memory, and (unless the user opts in with
    ``VOLSEG_WINDOW_BATCH=free``) at most what the card's batch uses in float32 as the official
    recipe runs it (:func:`volseg.inference.window_batch.official_limit_bytes`; issue 16's
    peak-memory target). Under autocast the float32 window is measured too (once, cuDNN
    autotuning off as torch's default), not assumed to be twice the autocast one. Networks whose
    output depends on the rest of the batch keep theirs.
    """
    if not (options.sw_batch_auto and device.type == "cuda" and isinstance(model, torch.nn.Module)
            and torch.cuda.is_available()) or getattr(model, "batch_dependent", False):
        return options
    free_policy = wants_free_memory()
    dtype = autocast_dtype(precision)
    fmt = memory_format(options, device)
    try:
        window = measure_window_bytes(model, image.shape[0], tuple(options.roi_size), device, dtype, fmt)
        limit = None
        if not free_policy:
            window_fp32 = window if dtype is None and fmt is torch.contiguous_format else \
                _official_window_bytes(model, image.shape[0], tuple(options.roi_size), device)
            limit = official_limit_bytes(options.sw_batch_size, window_fp32)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, TypeError):  # the window loop says what is wrong, in words
        return replace(options, sw_batch_auto=False)
    reserved = stitch_bytes(tuple(max(s, r) for s, r in zip(image.shape[1:], options.roi_size)), image.shape[0],
                            options.out_channels or 2, 1 + len(options.flips))
    batch = window_batch_size(gpu_available_bytes(device), window, windows, reserved, limit_bytes=limit)
    return replace(options, sw_batch_size=batch, sw_batch_auto=False)


def _official_window_bytes(model, in_channels: int, roi_size: tuple[int, ...], device: torch.device) -> int:
    """One float32 window as the official recipe runs it: contiguous, cuDNN autotuning off."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        with set_layout_for(model, torch.contiguous_format):
            return measure_window_bytes(model, in_channels, roi_size, device, None, torch.contiguous_format)
    finally:
        torch.backends.cudnn.benchmark = saved


@contextlib.contextmanager
def set_layout_for(model, fmt: torch.memory_format) -> Iterator[None]:
    """The network's weights in ``fmt`` for the block, back to the layout a run gave them after."""
    converted = model in _channels_last_models
    if converted and fmt is torch.contiguous_format:
        model.to(memory_format=torch.contiguous_format)
    try:
        yield
    finally:
        if converted and fmt is torch.contiguous_format:
            model.to(memory_format=torch.channels_last_3d)


class StepTimer:
    """Seconds per step into ``stats["seconds"]`` (the device synchronised at each mark); no-op without stats."""

    def __init__(self, stats: dict | None, device: torch.device) -> None:
        self.stats, self.device = stats, device
        self._cpu_network = 0.0  # seconds of network calls on the CPU since the last mark
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # the same on a GPU, as event pairs
        if stats is not None:
            stats.setdefault("seconds", {})
            self._sync()
        self.last = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def mark(self, name: str) -> None:
        if self.stats is None:
            return
        self._sync()
        now = time.perf_counter()
        self.stats["seconds"][name] = self.stats["seconds"].get(name, 0.0) + now - self.last
        self.last = now
        self._add_network()

    def network(self, model, x: torch.Tensor):
        """``model(x)``, its time added to ``stats["seconds"]["network"]`` at the next mark (CUDA
        events on a GPU: no synchronisation between windows, the copies still overlap)."""
        if self.stats is None:
            return model(x)
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            out = model(x)
            self._cpu_network += time.perf_counter() - t0
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = model(x)
        end.record()
        self._events.append((start, end))
        return out

    def _add_network(self) -> None:
        seconds = self._cpu_network + sum(start.elapsed_time(end) / 1000 for start, end in self._events)
        if seconds:
            self.stats["seconds"]["network"] = self.stats["seconds"].get("network", 0.0) + seconds
        self._cpu_network, self._events = 0.0, []
