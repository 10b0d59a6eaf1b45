"""Sliding-window inference with progress, cancellation, test-time flips and OOM fallback."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from monai.inferers import sliding_window_inference

from volseg.errors import Cancelled, CheckpointError, InputError, ResourceError
from volseg.options import InferenceOptions
from volseg.progress import Reporter

__all__ = ["InferenceOptions", "count_windows", "predict", "predict_with_fallback"]


def count_windows(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's ``sliding_window_inference`` runs for one pass."""
    total = 1
    for size, roi in zip(image_size, roi_size):
        size = max(size, roi)  # MONAI pads small images up to the window
        if size == roi:
            continue
        interval = int(roi * (1 - overlap)) or 1
        total *= math.ceil((size - roi) / interval) + 1
    return total


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "softmax":
        return torch.softmax(x, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    return x


class _Predictor:
    """Wraps the network for MONAI: selects the output, counts windows, honours cancellation."""

    def __init__(self, model: torch.nn.Module, options: InferenceOptions, total: int,
                 reporter: Reporter | None, cancel: threading.Event | None) -> None:
        self.model, self.options, self.total = model, options, total
        self.reporter, self.cancel = reporter, cancel
        self.done = 0

    def __call__(self, patches: torch.Tensor) -> torch.Tensor:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled()
        try:
            out = self.model(patches)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError) as exc:
            raise InputError(
                f"the network failed on a window of {list(patches.shape[2:])} with {patches.shape[1]} input "
                f"channel(s): {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
                hint="the window size (--roi-size) may not suit this network (many need multiples of 16 or 32), "
                "or the number of inputs in the card does not match the checkpoint",
            ) from None
        if isinstance(out, list | tuple):
            out = out[self.options.select_output]
        if not isinstance(out, torch.Tensor):
            raise InputError(f"the network returned {type(out).__name__}, not a tensor",
                             hint="volseg needs a network that returns logits (B, C, ...) or a list of them")
        if self.done == 0:
            self._check_first(out, patches)
        out = out.float()
        if self.options.activation_per_window:
            out = activate(out, self.options.activation)
        self.done += patches.shape[0]
        if self.reporter is not None:
            self.reporter.progress(min(self.done, self.total), self.total)
        return out

    def _check_first(self, out: torch.Tensor, patches: torch.Tensor) -> None:
        """Catch a mismatched window size or label count on the first window, not after the last."""
        if tuple(out.shape[2:]) != tuple(patches.shape[2:]):
            raise InputError(
                f"the network turned a window of {list(patches.shape[2:])} into {list(out.shape[2:])}",
                hint="choose a window size (--roi-size) the network maps onto itself, usually a multiple of 16 or 32",
            )
        expected = self.options.out_channels
        if expected is not None and out.shape[1] != expected:
            raise CheckpointError(
                f"the network returns {out.shape[1]} channels but the card (or --num-labels) describes {expected}",
                hint="the card's labels (or output.channels), or --num-labels, do not match the checkpoint; "
                "check the label count",
            )


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
    over the identity pass and each test-time flip in ``options.flips``.
    """
    passes = [()] + [tuple(f) for f in options.flips]
    total = count_windows(image.shape[1:], options.roi_size, options.overlap) * len(passes)
    predictor = _Predictor(model, options, total, reporter, cancel)
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
