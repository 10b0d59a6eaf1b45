"""The way in on a device: the card's preprocessing on a torch tensor where the network will run.

The volume goes to the device once, as its stored dtype (a pinned host copy, then one transfer),
and becomes float32 there. Every card step then runs on that tensor:

* ``Spacing`` (bilinear, or an integer spline order as nnU-Net cards use): MONAI computes the
  geometry (run lazily: output affine, shape and the record its inverse needs, no data touched),
  :class:`volseg.preprocessing.resampling.GridResampler` resamples in float32 on the device,
  separably, slab by slab;
* everything else (``Orientation``, intensity steps, ``CropForeground``, crops/pads, volseg's own
  transforms) is MONAI's or volseg's transform itself, which work on device tensors.

The result carries the same affine and operation records as :func:`volseg.preprocessing.card_steps.preprocess`,
so the way back inverts it alike. Against that exact path (MONAI's float64 resampling on the
CPU) the images agree within 1e-4 (linear) / 1e-3 (spline) relative (tests:
``Testing/python/test_on_device.py``); a ``Spacing`` without a fast path (``nearest``,
reflection padding, ``recompute_affine``) is MONAI's own, on the device.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing, Transform
from monai.utils import TraceKeys

from volseg.memory import gpu_available_bytes

from volseg.preprocessing.resampling import GridResampler, UnsupportedResampling

__all__ = ["TRANSFER_DTYPES", "resample_spacing", "run_step", "to_device", "upload"]

#: The keys MONAI's lazy resampling adds to a pending operation (``monai.utils.LazyAttr``).
_LAZY_SHAPE, _LAZY_AFFINE = "lazy_shape", "lazy_affine"

#: Bytes of resampling temporaries per slab (on the CPU; a GPU gets a share of its free memory).
SLAB_BYTES_CPU = 256 * 2**20


#: Dtypes that travel as they are stored (anything else is made float32 on the host first).
TRANSFER_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
                   torch.uint16, torch.int32)


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` -> a contiguous tensor of the same dtype on ``device``: the one transfer of the way in.

    CUDA: one copy into pinned (page-locked) host memory, straight from ``host``'s layout, then an
    asynchronous copy to the GPU (the caching host allocator keeps the pinned block until it is
    done). The CPU: ``host`` itself (no copy; the cast to float32 that follows makes the one copy).
    """
    if device.type == "cuda":
        pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        pinned.copy_(host)
        return pinned.to(device, non_blocking=True)
    return host


def to_device(array: np.ndarray, ijk_to_ras: np.ndarray, device: torch.device) -> MetaTensor:
    """(C, I, J, K) array -> float32 MetaTensor on ``device``: one transfer (:func:`upload`) of the
    stored dtype (an int16 CT moves and occupies half the bytes of float32), the cast to float32 on
    the device. Any strides (a reader's transposed view) are fine; the result is contiguous."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if any(s < 0 for s in array.strides):  # torch takes no negative strides
        array = np.ascontiguousarray(array)
    with warnings.catch_warnings():  # a read-only (memory-mapped) array: only read here, never written
        warnings.simplefilter("ignore", UserWarning)
        host = torch.from_numpy(array)
    if host.dtype not in TRANSFER_DTYPES:  # float64, int64, uint32, bool: float32 on the host, as before
        host = host.to(torch.float32, memory_format=torch.contiguous_format)
    data = upload(host, device).to(torch.float32, memory_format=torch.contiguous_format)
    return MetaTensor(data, affine=torch.as_tensor(ijk_to_ras, dtype=torch.float64), meta={"space": "RAS"})


def _slab_rows(channels: int, dst_shape: Sequence[int], device: torch.device) -> int:
    if device.type == "cuda":
        budget = min(int(0.25 * gpu_available_bytes(device)), 2 * 2**30)
    else:
        budget = SLAB_BYTES_CPU
    per_row = channels * 4 * 4 * int(np.prod(dst_shape[1:]))
    return int(max(1, min(dst_shape[0], budget // max(1, per_row))))


def resample_spacing(t: Spacing, image: MetaTensor) -> MetaTensor:
    """``t(image)`` with the resampling done by :class:`GridResampler` on ``image``'s device.

    Raises:
        UnsupportedResampling: no fast path for this ``Spacing`` (the caller runs ``t`` itself).
    """
    if t.recompute_affine or image.pending_operations:
        raise UnsupportedResampling("Spacing with recompute_affine (or pending operations) has no fast path")
    lazy = t(image, lazy=True)
    ops = lazy.pending_operations
    if len(ops) != 1:
        raise UnsupportedResampling("Spacing recorded more than one pending operation")
    op = ops[0]
    extra = op[TraceKeys.EXTRA_INFO]
    if extra.get("align_corners") not in (False, TraceKeys.NONE, None):
        raise UnsupportedResampling("Spacing with align_corners=True has no fast path")
    new_affine = lazy.peek_pending_affine()
    shape = tuple(int(s) for s in op[_LAZY_SHAPE])
    mapping = np.asarray(torch.as_tensor(op[_LAZY_AFFINE]).cpu(), dtype=np.float64)
    src = image.as_tensor()
    if np.allclose(mapping, np.eye(4), atol=1e-6) and shape == tuple(src.shape[1:]):
        data = src.float()  # MONAI keeps the data as it is then
    else:
        resampler = GridResampler(mapping, src.shape[1:], shape, extra["mode"], extra["padding_mode"], src.device)
        data = resampler(src, _slab_rows(src.shape[0], shape, src.device))
    record = {k: v for k, v in op.items() if not str(k).startswith("lazy_")}
    record[TraceKeys.LAZY] = False
    out = MetaTensor(data)
    out.copy_meta_from(image, copy_attr=True)
    out.affine = torch.as_tensor(new_affine, dtype=torch.float64)
    out.applied_operations = copy.deepcopy(image.applied_operations) + [record]
    return out


def run_step(t: Transform, image: MetaTensor) -> MetaTensor:
    """One card step on the device: ``Spacing`` through :func:`resample_spacing` when it can."""
    if isinstance(t, Spacing):
        try:
            return resample_spacing(t, image)
        except UnsupportedResampling:
            if image.is_cuda:  # MONAI's integer modes need CuPy on a GPU: its CPU path, then back
                return t(image.cpu()).to(image.device)
    return t(image)
