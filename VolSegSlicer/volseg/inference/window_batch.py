"""How many windows one forward pass runs on a GPU: sized from its free memory.

A card's ``sw_batch_size`` (1-4) suits a small GPU; a big one could run more windows at once, but
never at the price of more memory than the official recipe takes unless the user asks. On CUDA
(unless the user fixed ``--sw-batch-size``) the batch is the largest that fits in a share of the
free memory and (unless ``VOLSEG_WINDOW_BATCH=free``) in the memory the card's batch takes in
float32 (:func:`official_limit_bytes`; see
:func:`volseg.inference.gpu_settings.resolve_window_batch`), from the memory one window costs
(measured once per network, window size, input channels and precision, by one forward pass of
one window; the float32 window measured too under autocast), evened out so that every forward
pass has about the same number of windows (fewer distinct shapes: fewer cuDNN autotuning runs,
no tiny last batch).

:func:`window_batch_size` is plain arithmetic on a free-memory figure, tested on the CPU;
:func:`measure_window_bytes` needs a GPU.
"""

from __future__ import annotations

import math
import weakref

import torch

__all__ = ["MAX_WINDOW_BATCH", "MEMORY_ENV", "measure_window_bytes", "official_limit_bytes", "stitch_bytes",
           "window_batch_size", "wants_free_memory"]

#: The most windows per forward pass: beyond this a GPU gains nothing more, only memory.
MAX_WINDOW_BATCH = 16
#: The share of the free memory the window batch may use (the rest: stitching, fragmentation, other work).
MEMORY_SHARE = 0.5

#: ``VOLSEG_WINDOW_BATCH=free``: the user opts in to a batch sized from the free memory alone (a peak
#: above the official recipe's); by default the batch stays within the official recipe's footprint.
MEMORY_ENV = "VOLSEG_WINDOW_BATCH"

_measured: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def window_batch_size(free_bytes: int, window_bytes: int, windows: int, reserved_bytes: int = 0,
                      share: float = MEMORY_SHARE, maximum: int = MAX_WINDOW_BATCH,
                      limit_bytes: int | None = None) -> int:
    """Windows per forward pass for a device with ``free_bytes`` free.

    Args:
        free_bytes: the device's free memory now (``torch.cuda.mem_get_info()[0]``).
        window_bytes: the memory one window's forward pass needs (input, activations, output).
        windows: windows in one pass over the image (no point batching more).
        reserved_bytes: memory the run needs besides the windows (input, sums, weights).
        share: the share of ``free_bytes - reserved_bytes`` the windows may use.
        maximum: an upper bound (:data:`MAX_WINDOW_BATCH`).
        limit_bytes: at most this much for the batch whatever is free (e.g. what the official
            recipe's batch takes: issue 16's peak-memory target).

    Returns:
        At least 1 (a GPU too small for one window is the out-of-memory fallback's business),
        at most ``min(maximum, windows)``; evened out: ``ceil(windows / passes)`` with the
        fewest forward passes that fit.
    """
    if window_bytes <= 0:
        raise ValueError(f"window_bytes must be positive, got {window_bytes}")
    budget = max(0.0, (free_bytes - reserved_bytes) * share)
    if limit_bytes is not None:
        budget = min(budget, limit_bytes)
    fit = max(1, min(int(budget // window_bytes), maximum, max(1, windows)))
    passes = math.ceil(max(1, windows) / fit)
    return math.ceil(max(1, windows) / passes)


def official_limit_bytes(card_batch: int, window_fp32_bytes: int) -> int:
    """The memory the official recipe's window batch takes: the card's ``sw_batch_size`` windows
    in float32 (torch's defaults), each costing ``window_fp32_bytes`` (measured, not assumed to
    be twice the autocast window: under autocast softmax, normalisation and attention stay in
    float32, so a window often takes well over half).

    volseg's batch (:func:`window_batch_size`'s ``limit_bytes``) stays within this, so its peak
    is no higher than the official recipe's: the rest of the peak (input, blended sums, weights)
    is the same or smaller (volseg's activation runs in place, the official one makes a copy).
    """
    if window_fp32_bytes <= 0:
        raise ValueError(f"window_fp32_bytes must be positive, got {window_fp32_bytes}")
    return max(1, int(card_batch)) * int(window_fp32_bytes)


def wants_free_memory(environ=None) -> bool:
    """True when the user opted in (``VOLSEG_WINDOW_BATCH=free``) to a window batch sized from the
    free memory alone, above the official recipe's footprint. Anything else but unset or
    ``official`` is refused, with the values that work."""
    import os

    value = (environ if environ is not None else os.environ).get(MEMORY_ENV, "").strip().lower()
    if value in ("", "official"):
        return False
    if value == "free":
        return True
    from volseg.errors import InputError

    raise InputError(f"{MEMORY_ENV}={value!r} is not a window batch policy",
                     hint=f"set {MEMORY_ENV}=official (the default: no more GPU memory than the official recipe) "
                     "or free (half the free GPU memory), or fix the batch with --sw-batch-size")


def stitch_bytes(image_shape: tuple[int, ...], in_channels: int, out_channels: int, passes: int = 1) -> int:
    """Bytes of the float32 tensors kept on the device for the whole run: the input, the
    blended sum, the weights, and the running mean when there are test-time flips."""
    voxels = math.prod(image_shape)
    return 4 * voxels * (in_channels + out_channels + 1 + (out_channels if passes > 1 else 0))


def measure_window_bytes(model: torch.nn.Module, in_channels: int, roi_size: tuple[int, ...],
                         device: torch.device, autocast_dtype: torch.dtype | None,
                         memory_format: torch.memory_format = torch.contiguous_format) -> int:
    """Peak memory of one window's forward pass on a CUDA ``device`` (measured once, cached per network).

    The window runs twice and the second pass is measured: the first may autotune cuDNN
    (``cudnn.benchmark``), whose trial workspaces would inflate the figure. The peak still
    includes the chosen algorithms' workspace, so the batch errs on the small side. The cache
    key includes ``cudnn.benchmark`` (the official recipe's float32 window is measured with it
    off, as torch runs by default).
    """
    key = (tuple(roi_size), in_channels, str(device), autocast_dtype, memory_format,
           bool(torch.backends.cudnn.benchmark))
    cache = _measured.setdefault(model, {})
    if key in cache:
        return cache[key]
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=autocast_dtype or torch.float16,
                                                 enabled=autocast_dtype is not None):
        for _ in range(2):
            torch.cuda.reset_peak_memory_stats(device)
            x = torch.zeros((1, in_channels, *roi_size), device=device).to(memory_format=memory_format)
            out = model(x)
            del out, x
    torch.cuda.synchronize(device)
    cache[key] = max(1, torch.cuda.max_memory_allocated(device) - before)
    return cache[key]
