"""Sliding-window inference with progress, cancellation, test-time flips and OOM fallback.

Two ways of tiling and blending: MONAI's ``sliding_window_inference`` (the default, what the
UX-Net, RepUX-Net, DeformUX-Net and SegFormer3D test scripts run) and nnU-Net's
(``mode="nnunet"``, what MedNeXt checkpoints are evaluated with; :mod:`volseg.inference.nnunet`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from monai.inferers import sliding_window_inference

from volseg.errors import ResourceError
from volseg.inference.nnunet import count_windows_nnunet, predict_nnunet
from volseg.options import InferenceOptions
from volseg.progress import Reporter
from volseg.inference.window_predictor import WindowPredictor, activate

__all__ = ["InferenceOptions", "count_windows", "predict", "predict_with_fallback"]


def count_windows(image_size: Sequence[int], roi_size: Sequence[int], overlap: float, mode: str = "constant") -> int:
    """Number of windows one pass runs: MONAI's ``sliding_window_inference``, or nnU-Net's tiling
    when ``mode`` is ``"nnunet"``."""
    if mode == "nnunet":
        return count_windows_nnunet(image_size, roi_size, overlap)
    total = 1
    for size, roi in zip(image_size, roi_size):
        size = max(size, roi)  # MONAI pads small images up to the window
        if size == roi:
            continue
        interval = int(roi * (1 - overlap)) or 1
        total *= math.ceil((size - roi) / interval) + 1
    return total


def _one_pass(model, image, options, predictor, device, sw_device, flip_axes):
    x = image if not flip_axes else torch.flip(image, dims=[a + 2 for a in flip_axes])
    autocast = options.amp and sw_device.type == "cuda"
    with torch.inference_mode(), torch.autocast(device_type=sw_device.type, enabled=autocast):
        y = sliding_window_inference(
            x, roi_size=list(options.roi_size), sw_batch_size=options.sw_batch_size, predictor=predictor,
            overlap=options.overlap, mode=options.mode, sigma_scale=options.sigma_scale,
            padding_mode=options.padding_mode, sw_device=sw_device, device=device,
        )
    y = y.float()
    return y if not flip_axes else torch.flip(y, dims=[a + 2 for a in flip_axes])


def predict(model: torch.nn.Module, image: torch.Tensor, options: InferenceOptions, device: torch.device,
            reporter: Reporter | None = None, cancel: threading.Event | None = None,
            stitch_device: torch.device | None = None) -> torch.Tensor:
    """Run the network over a (C, I, J, K) image; return (C_out, I, J, K) float32 on the CPU.

    The result holds probabilities (softmax or sigmoid per ``options.activation``), averaged
    over the identity pass and each test-time flip in ``options.flips``. With
    ``options.mode == "nnunet"`` the tiling, weighting and mirroring are nnU-Net's
    (:func:`volseg.inference.nnunet.predict_nnunet`).
    """
    if options.mode == "nnunet":
        return predict_nnunet(model, image, options, device, reporter, cancel, stitch_device)
    passes = [()] + [tuple(f) for f in options.flips]
    total = count_windows(image.shape[1:], options.roi_size, options.overlap) * len(passes)
    predictor = WindowPredictor(model, options, total, reporter, cancel)
    stitch = stitch_device or device
    plain = image.as_tensor() if hasattr(image, "as_tensor") else image  # drop MetaTensor bookkeeping
    batch = plain[None].to(stitch)
    model.to(device)
    acc = None
    for axes in passes:
        y = _one_pass(model, batch, options, predictor, stitch, device, axes)
        if not options.activation_per_window:
            y = activate(y, options.activation)
        acc = y if acc is None else acc + y
    return (acc / len(passes))[0].cpu()


def predict_with_fallback(model: torch.nn.Module, image: torch.Tensor, options: InferenceOptions,
                          device: torch.device, reporter: Reporter | None = None,
                          cancel: threading.Event | None = None,
                          run: Callable[..., torch.Tensor] = predict) -> tuple[torch.Tensor, str]:
    """:func:`predict`, stepping down when the GPU runs out of memory.

    Order: smaller window batches, then stitching on the CPU, then everything on the CPU.
    Returns the result and a sentence saying what ran where.
    """
    attempts: list[tuple[InferenceOptions, torch.device, torch.device | None, str]] = [
        (options, device, None, f"ran on {device}")]
    if device.type != "cpu":
        b = options.sw_batch_size
        while b > 1:
            b //= 2
            attempts.append((replace(options, sw_batch_size=b), device, None,
                             f"ran on {device} with the window batch reduced to {b} after running out of GPU memory"))
        attempts.append((replace(options, sw_batch_size=1), device, torch.device("cpu"),
                         f"ran windows on {device} and stitched on the CPU after running out of GPU memory"))
        attempts.append((replace(options, sw_batch_size=1, amp=False), torch.device("cpu"), None,
                         "ran on the CPU after running out of GPU memory"))
    last_error: Exception | None = None
    for opts, dev, stitch, what in attempts:
        try:
            result = run(model, image, opts, dev, reporter, cancel, stitch_device=stitch)
            if last_error is not None and reporter is not None:
                reporter.log(what, level="warning")
            return result, what
        except torch.OutOfMemoryError as exc:
            last_error = exc
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if reporter is not None:
                reporter.log(f"out of memory ({what.replace('ran', 'running')}); trying a smaller setting", "warning")
    raise ResourceError("out of memory even on the CPU", hint="use a smaller ROI (--roi-size) or free memory") from last_error
