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
from volseg.inference.gpu_settings import (
    StepTimer,
    memory_format,
    resolve_window_batch,
    run_settings,
    set_weight_layout,
    to_device,
)
from volseg.inference.precision import autocast_dtype, choose_precision, requested_precision
from volseg.inference.window_predictor import WindowPredictor, activate, activate_

__all__ = ["InferenceOptions", "add_flipped_", "count_windows", "predict", "predict_with_fallback", "run_precision",
           "whole_volume_options"]


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


def whole_volume_options(options: InferenceOptions, shape: Sequence[int]) -> InferenceOptions:
    """``options`` for one pass of the network on the whole (I', J', K') preprocessed volume, as MONAI's
    ``SimpleInferer`` runs it: a single window the size of the volume (no padding, uniform blending,
    so the output is the network's own). A size that is not a multiple of ``options.size_multiple``
    is refused before anything runs: the network cannot take it (MONAI's own run fails on it)."""
    shape = tuple(int(s) for s in shape)
    m = options.size_multiple
    if m > 1 and any(s % m for s in shape):
        from volseg.errors import InputError

        raise InputError(
            f"this model runs on the whole volume at once and needs each size of the preprocessed grid to be a "
            f"multiple of {m}; this volume's grid is {' x '.join(map(str, shape))}",
            hint=f"crop or pad the volume to sizes that are multiples of {m} (MONAI's own run of this model fails "
            f"on it too), or run it in windows with --roi-size (e.g. --roi-size {' '.join(str(max(m, s - s % m)) for s in shape)}), "
            "which gives other values near the borders",
        )
    return replace(options, roi_size=shape, overlap=0.0, mode="constant", padding_mode="constant")


def _one_pass(image, options, predictor, device, sw_device, flip_axes, dtype):
    x = image if not flip_axes else torch.flip(image, dims=[a + 2 for a in flip_axes])
    # On a GPU the blended output is a normal tensor (no_grad, not inference_mode), so the
    # activation can overwrite it in place (one volume of probabilities less at the peak) and the
    # way back may do the same.
    grad_off = torch.no_grad() if device.type == "cuda" else torch.inference_mode()
    with grad_off, torch.autocast(device_type=sw_device.type, dtype=dtype or torch.float16,
                                  enabled=dtype is not None):
        y = sliding_window_inference(
            x, roi_size=list(options.roi_size), sw_batch_size=options.sw_batch_size, predictor=predictor,
            overlap=options.overlap, mode=options.mode, sigma_scale=options.sigma_scale,
            padding_mode=options.padding_mode, sw_device=sw_device, device=device,
        )
    return y.float()  # still flipped: add_flipped_ turns it back slab by slab, without a second volume


def add_flipped_(acc: torch.Tensor, y: torch.Tensor, flip_axes: Sequence[int], slab_voxels: int = 2**20) -> torch.Tensor:
    """``acc += torch.flip(y, spatial flip_axes)`` for (B, C, I, J, K) tensors, slab by slab along I:
    a temporary of ``B * C * slab_voxels`` values instead of a flipped copy of the whole volume.
    Bit for bit the same sums. Returns ``acc``."""
    dims = [a + 2 for a in flip_axes]
    if not dims:
        return acc.add_(y)
    size = y.shape[2]
    step = max(1, slab_voxels // max(1, y.shape[3] * y.shape[4]))
    for start in range(0, size, step):
        stop = min(size, start + step)
        source = y[:, :, size - stop:size - start] if 2 in dims else y[:, :, start:stop]
        acc[:, :, start:stop] += torch.flip(source, dims)
    return acc


def run_precision(options: InferenceOptions, device: torch.device) -> tuple[str, str]:
    """The precision ``options`` run in on ``device`` (``fp32``, ``fp16``, ``bf16``) and why
    (:func:`volseg.inference.precision.choose_precision`)."""
    capability = None
    if device.type == "cuda" and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(device)
    return choose_precision(requested_precision(options.precision, options.amp), device.type, capability)


def predict(model: torch.nn.Module, image: torch.Tensor, options: InferenceOptions, device: torch.device,
            reporter: Reporter | None = None, cancel: threading.Event | None = None,
            stitch_device: torch.device | None = None, output_device: torch.device | None = None,
            stats: dict | None = None) -> torch.Tensor:
    """Run the network over a (C, I, J, K) image; return (C_out, I, J, K) float32 probabilities.

    The result holds probabilities (softmax or sigmoid per ``options.activation``), averaged
    over the identity pass and each test-time flip in ``options.flips``. With
    ``options.mode == "nnunet"`` the tiling, weighting and mirroring are nnU-Net's
    (:func:`volseg.inference.nnunet.predict_nnunet`).

    The result stays where it was blended (``stitch_device``, default ``device``: on a GPU the
    probabilities stay on the GPU for the way back) unless ``output_device`` asks for another.
    On CUDA the run uses :func:`run_settings` (the precision, TF32 off for fp32, cuDNN
    autotuning, channels-last) and, with ``options.sw_batch_auto``, a window batch sized from
    the free memory (:func:`resolve_window_batch`). ``stats``, when given, receives the
    precision and the seconds of each step (synchronised: for benchmarks).
    """
    precision, _ = run_precision(options, device)
    with run_settings(device, precision, options):
        model.to(device)
        set_weight_layout(model, memory_format(options, device))
        windows = count_windows(image.shape[1:], options.roi_size, options.overlap, options.mode)
        options = resolve_window_batch(model, image, options, device, precision, windows)
        clock = StepTimer(stats, device)
        if options.mode == "nnunet":
            out = predict_nnunet(model, image, options, device, reporter, cancel, stitch_device,
                                 autocast_dtype=autocast_dtype(precision), clock=clock)
        else:
            out = _predict_monai(model, image, options, device, reporter, cancel, stitch_device,
                                 autocast_dtype(precision), clock)
        if output_device is not None:
            out = out.to(output_device)
            clock.mark("to_output_device")
    if stats is not None:
        stats.update(precision=precision, sw_batch_size=options.sw_batch_size)
    return out


def _predict_monai(model, image, options, device, reporter, cancel, stitch_device, dtype, clock):
    passes = [()] + [tuple(f) for f in options.flips]
    total = count_windows(image.shape[1:], options.roi_size, options.overlap) * len(passes)
    # constant blending (weights exactly 1): an autocast window goes into MONAI's float32 sums as it is,
    # the same sums as from a float32 copy of it; Gaussian weights would round in its dtype, so those copy
    predictor = WindowPredictor(model, options, total, reporter, cancel, memory_format(options, device), clock,
                                float_output=options.mode != "constant")
    stitch = stitch_device or device
    batch = to_device(image, stitch)[None]
    clock.mark("to_device")
    acc = None
    for axes in passes:
        y = _one_pass(batch, options, predictor, stitch, device, axes, dtype)  # still flipped
        acc = _accumulate(acc, y, axes, options, in_place=y.device.type == "cuda")
        del y
    if len(passes) > 1:
        acc = acc / len(passes) if acc.is_inference() else acc.div_(len(passes))
    elif acc.is_inference():  # activation "none": hand out a normal tensor, as the division did
        acc = acc.clone()
    clock.mark("windows_and_blending")
    return acc[0]


def _accumulate(acc: torch.Tensor | None, y: torch.Tensor, axes: tuple[int, ...], options: InferenceOptions,
                in_place: bool) -> torch.Tensor:
    """``acc`` plus pass ``y`` (still flipped along ``axes``) flipped back and activated.

    ``in_place`` (on a GPU): the activation overwrites ``y`` (slab by slab, per voxel: the same
    before or after flipping back) and ``y`` is added back slab by slab (:func:`add_flipped_`):
    no flipped copy of the volume, one volume of probabilities less at the peak. Otherwise (the
    CPU) the order of old -- flip back, activate, add -- bit for bit what MONAI plus the
    activation gives (the CPU's softmax rounds the last bit differently by position).
    """
    dims = [a + 2 for a in axes]
    if in_place:
        if not options.activation_per_window:
            y = activate_(y, options.activation)
        if acc is None:
            return torch.flip(y, dims) if axes else y
        with torch.inference_mode() if acc.is_inference() else torch.no_grad():
            return add_flipped_(acc, y, axes)
    if axes:
        y = torch.flip(y, dims)
    if not options.activation_per_window:
        y = activate(y, options.activation)
    if acc is None:
        return y
    return acc + y if acc.is_inference() else acc.add_(y)  # in place where the tensor allows it


def predict_with_fallback(model: torch.nn.Module, image: torch.Tensor, options: InferenceOptions,
                          device: torch.device, reporter: Reporter | None = None,
                          cancel: threading.Event | None = None,
                          run: Callable[..., torch.Tensor] = predict, output_device: torch.device | None = None,
                          stats: dict | None = None) -> tuple[torch.Tensor, str]:
    """:func:`predict`, stepping down when the GPU runs out of memory.

    Order: smaller window batches, then stitching on the CPU, then everything on the CPU. On a
    CUDA GPU with ``options.sw_batch_auto`` the first attempt's window batch is sized from the
    free memory, and the smaller ones halve it. The result is where :func:`predict` leaves it
    (the device, or the CPU after stitching there) unless ``output_device`` is given.
    ``stats`` receives ``precision`` (what the successful attempt ran in) and ``sw_batch_size``.
    Returns the result and a sentence saying what ran where.
    """
    precision, reason = run_precision(options, device)
    if reporter is not None:
        reporter.log(f"precision {precision}: {reason}")
    if device.type == "cuda" and options.sw_batch_auto and isinstance(model, torch.nn.Module) \
            and torch.cuda.is_available():
        with run_settings(device, precision, options):
            model.to(device)
            windows = count_windows(image.shape[1:], options.roi_size, options.overlap, options.mode)
            try:
                options = resolve_window_batch(model, image, options, device, precision, windows)
                if reporter is not None:
                    reporter.log(f"window batch {options.sw_batch_size} (sized from the free GPU memory)")
            except torch.OutOfMemoryError:  # not even one window fits: the fallback below takes over
                torch.cuda.empty_cache()
                options = replace(options, sw_batch_auto=False)
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
    extra = {} if output_device is None else {"output_device": output_device}
    last_error: Exception | None = None
    for opts, dev, stitch, what in attempts:
        try:
            result = run(model, image, opts, dev, reporter, cancel, stitch_device=stitch, **extra)
            if last_error is not None and reporter is not None:
                reporter.log(what, level="warning")
            if stats is not None:
                stats.update(precision=run_precision(opts, dev)[0], sw_batch_size=opts.sw_batch_size)
            return result, what
        except torch.OutOfMemoryError as exc:
            last_error = exc
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if reporter is not None:
                reporter.log(f"out of memory ({what.replace('ran', 'running')}); trying a smaller setting", "warning")
    raise ResourceError("out of memory even on the CPU", hint="use a smaller ROI (--roi-size) or free memory") from last_error
