"""nnU-Net (v1) sliding-window inference, as ``SegmentationNetwork.predict_3D`` computes it.

MedNeXt checkpoints are trained and evaluated with nnU-Net's predictor. Where windows overlap it
blends differently from MONAI's ``sliding_window_inference``, so a card that must give the
published numbers selects this mode with ``"inference": {"mode": "nnunet"}``. The differences
(REFERENCE.md section 9, re-implemented here from that description):

- **Padding**: an axis shorter than the window is padded with zeros to the window, half before
  (rounded down) and the rest after; the padding is cropped off the result. Longer axes are not
  padded.
- **Window positions** per axis (image ``i``, window ``k``, step ``s = 1 - overlap``):
  ``n = ceil((i - k) / (k * s)) + 1`` windows spread evenly over ``[0, i - k]`` at
  ``round(j * (i - k) / (n - 1))`` with round-half-to-even; MONAI uses a fixed stride instead.
- **Importance map**: a Gaussian with its peak (exactly 1) at ``k // 2`` (not ``(k - 1) / 2``),
  sigma ``k * sigma_scale``, truncated at ``int(4 * sigma + 0.5)`` voxels, exact zeros replaced
  by the smallest non-zero value (MONAI clamps at 1e-3). It is used only when there is more
  than one window; a single window has weight 1.
- **Activation and mirroring per window**: every flipped prediction goes through the activation
  (softmax), is flipped back and averaged with weight ``1 / passes`` before the Gaussian
  weighting; the flips run in nnU-Net's order (identity, W, H, WH, D, WD, HD, WHD).
- **Aggregation**: ``sum(w * p) / sum(w)`` in float32, windows in raster order (axis 0 outermost).

Example::

    >>> options = InferenceOptions(roi_size=(16, 32, 32), overlap=0.5, mode="nnunet", flips=ALL_FLIPS)
    >>> probabilities = predict_nnunet(model, image, options, torch.device("cpu"))  # (C_out, I, J, K)
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from volseg.options import InferenceOptions
from volseg.progress import Reporter
from volseg.inference.gpu_settings import memory_format, to_device
from volseg.inference.window_predictor import WindowPredictor

__all__ = ["ALL_FLIPS", "count_windows_nnunet", "nnunet_gaussian", "nnunet_steps", "predict_nnunet"]

#: The seven flips of nnU-Net's mirroring over all three axes (``mirror_axes=(0, 1, 2)``).
ALL_FLIPS: tuple[tuple[int, ...], ...] = ((2,), (1,), (1, 2), (0,), (0, 2), (0, 1), (0, 1, 2))


def nnunet_steps(image_size: Sequence[int], patch_size: Sequence[int], step_size: float) -> list[list[int]]:
    """Window start positions per axis, by nnU-Net's rule.

    Args:
        image_size: the (padded) image size; every axis at least as long as the window.
        patch_size: the window size.
        step_size: the step as a fraction of the window (nnU-Net's ``step_size``; ``1 - overlap``).

    Returns:
        One sorted list of start indices per axis.

    Raises:
        ValueError: an axis is shorter than the window or the step is not in (0, 1].
    """
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    steps = []
    for size, patch in zip(image_size, patch_size):
        if size < patch:
            raise ValueError(f"image axis of {size} is shorter than the window {patch}: pad it first")
        n = math.ceil((size - patch) / (patch * step_size)) + 1
        if n == 1:
            steps.append([0])
            continue
        actual = (size - patch) / (n - 1)
        steps.append([round(actual * j) for j in range(n)])  # round() is half-to-even, as numpy's
    return steps


def count_windows_nnunet(image_size: Sequence[int], patch_size: Sequence[int], overlap: float) -> int:
    """Number of windows of one pass of :func:`predict_nnunet` (after padding small axes)."""
    padded = [max(s, p) for s, p in zip(image_size, patch_size)]
    return math.prod(len(s) for s in nnunet_steps(padded, patch_size, 1.0 - overlap))


def nnunet_gaussian(patch_size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """nnU-Net's importance map for one window (float32, peak exactly 1 at ``k // 2`` per axis).

    The closed form of a unit impulse at ``k // 2`` filtered by a truncated Gaussian
    (sigma ``k * sigma_scale``, radius ``int(4 * sigma + 0.5)``) and divided by its maximum;
    exact zeros (beyond the radius) become the smallest non-zero value.
    """
    profiles = []
    for k in patch_size:
        sigma = k * sigma_scale
        d = np.arange(k, dtype=np.float64) - k // 2
        w = np.exp(-(d**2) / (2.0 * sigma**2))
        w[np.abs(d) > int(4.0 * sigma + 0.5)] = 0.0
        profiles.append(w)
    full = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    full = (full / full.max()).astype(np.float32)
    if (full == 0).any():
        full[full == 0] = full[full != 0].min()
    return torch.from_numpy(full)


def _nnunet_order(flips: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The identity pass and the flips, in the order nnU-Net adds them (W=1, H=2, D=4 as a bit mask)."""
    passes = {tuple(sorted(set(f))) for f in flips if f} | {()}
    return sorted(passes, key=lambda axes: sum(1 << (2 - a) for a in axes))


def _pad_to_window(x: torch.Tensor, roi: Sequence[int]) -> tuple[torch.Tensor, list[slice]]:
    """Zero-pad (C, I, J, K) up to the window per axis (half before, rounded down); the crop back."""
    before = [max(0, r - s) // 2 for s, r in zip(x.shape[1:], roi)]
    after = [max(0, r - s) - b for s, r, b in zip(x.shape[1:], roi, before)]
    if not any(before) and not any(after):
        return x, [slice(None)] * 3
    pads: list[int] = []
    for b, a in zip(reversed(before), reversed(after)):
        pads += [b, a]
    crop = [slice(b, b + s) for b, s in zip(before, x.shape[1:])]
    return F.pad(x, pads, mode="constant", value=0.0), crop


def predict_nnunet(model: torch.nn.Module, image: torch.Tensor, options: InferenceOptions, device: torch.device,
                   reporter: Reporter | None = None, cancel: threading.Event | None = None,
                   stitch_device: torch.device | None = None, autocast_dtype: torch.dtype | None = None,
                   clock=None) -> torch.Tensor:
    """Run the network over a (C, I, J, K) image with nnU-Net's tiling; (C_out, I, J, K) float32 on the stitch device.

    Args:
        model: the network (eval mode); a list output is reduced to ``options.select_output``.
        image: the preprocessed image.
        options: ``roi_size`` (nnU-Net's patch size), ``overlap`` (``1 - step_size``),
            ``sigma_scale``, ``flips`` (the mirroring; :data:`ALL_FLIPS` for nnU-Net's default),
            ``sw_batch_size`` (windows per forward call; nnU-Net runs one) and ``activation``
            (applied per window).
        device: where the network runs.
        reporter, cancel: progress per window and a cancel request between windows.
        stitch_device: where the image and the sums are kept (default ``device``); the result is there.
        autocast_dtype: float16/bfloat16 autocast on CUDA (nnU-Net's ``mixed_precision``), None for float32
            (:func:`volseg.inference.sliding_window.predict` chooses it from ``options.precision``).
        clock: per-step timing for benchmarks (:class:`volseg.inference.gpu_settings.StepTimer`).
    """
    roi = tuple(int(r) for r in options.roi_size)
    stitch = stitch_device or device
    x, crop = _pad_to_window(to_device(image, stitch).float(), roi)
    if clock is not None:
        clock.mark("to_device")
    steps = nnunet_steps(x.shape[1:], roi, 1.0 - options.overlap)
    windows = list(itertools.product(*steps))
    gaussian = nnunet_gaussian(roi, options.sigma_scale).to(stitch) if len(windows) > 1 else None
    passes = _nnunet_order(options.flips)
    predictor = WindowPredictor(model, replace(options, activation_per_window=True), len(windows) * len(passes),
                                reporter, cancel, memory_format(options, device), clock)
    model.to(device)
    autocast = autocast_dtype is not None
    acc: torch.Tensor | None = None
    weights = torch.zeros(x.shape[1:], dtype=torch.float32, device=stitch)
    batch_size = max(1, int(options.sw_batch_size))
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        regions = [tuple(slice(p, p + r) for p, r in zip(pos, roi)) for pos in batch]
        patches = torch.stack([x[(slice(None), *reg)] for reg in regions]).to(device)
        with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float16,
                                                     enabled=autocast):
            mean = None
            for axes in passes:
                dims = [a + 2 for a in axes]
                y = predictor(torch.flip(patches, dims) if axes else patches)
                y = (torch.flip(y, dims) if axes else y) * (1.0 / len(passes))
                mean = y if mean is None else mean + y
        mean = mean.float().to(stitch)
        if gaussian is not None:
            mean = mean * gaussian
        if acc is None:
            acc = torch.zeros((mean.shape[1], *x.shape[1:]), dtype=torch.float32, device=stitch)
        for b, reg in enumerate(regions):
            acc[(slice(None), *reg)] += mean[b]
            weights[reg] += 1.0 if gaussian is None else gaussian
    assert acc is not None
    acc /= weights
    if clock is not None:
        clock.mark("windows_and_blending")
    return acc[(slice(None), *crop)].contiguous()
