"""Which floating-point precision the network runs in, and making ``fp32`` mean float32.

``--precision auto|fp32|fp16|bf16`` (card ``inference.precision``, default ``auto``):

- ``auto``: on a CUDA GPU, float16 autocast: the fastest precision that kept the labels. On an
  H200 (``bench/gpu_check.sh``, 2026-12-04) fp16 and bf16 ran equally fast (3D UX-Net at
  256x256x160: 2.03x and 1.98x the official fp32 recipe), but bf16's 8-bit mantissa changed
  0.1-0.5 % of the labels of every tiny golden network (99.50-99.89 % identical to fp32, below
  the 99.9 % bound of ``test_cuda.py``) where fp16 kept them; float32 on the CPU and on Apple MPS.
- ``fp16`` / ``bf16``: that autocast on CUDA (``bf16`` on a GPU without it runs ``fp16`` and says
  so); on other devices float32, said so.
- ``fp32``: true IEEE float32. cuDNN convolutions and cuBLAS matmuls use TF32 (10-bit mantissa)
  by default on Ampere and later, which moves probabilities by ~1e-3; :func:`exact_fp32` turns
  TF32 off for the duration of the run and restores the process's settings afterwards.

``InferenceOptions.amp = False`` (``--no-amp``, a card's ``"amp": false``) asks for ``fp32``.

Everything here but :func:`exact_fp32` and :func:`autocast_dtype` is plain Python, so the
choice is tested on the CPU for any compute capability.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")

__all__ = ["PRECISIONS", "autocast_dtype", "choose_precision", "exact_fp32", "requested_precision"]


def requested_precision(precision: str, amp: bool) -> str:
    """The precision asked for: ``precision``, or ``fp32`` when mixed precision is switched off (``amp=False``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return "fp32" if not amp else precision


def choose_precision(requested: str, device_type: str, capability: tuple[int, int] | None = None) -> tuple[str, str]:
    """The precision a run uses, and why, in words.

    Args:
        requested: ``auto``, ``fp32``, ``fp16`` or ``bf16``.
        device_type: ``cuda``, ``cpu`` or ``mps`` (``torch.device.type``).
        capability: the CUDA GPU's compute capability (``torch.cuda.get_device_capability``);
            None when unknown (taken as older than 8.0: ``fp16``).

    Returns:
        (``fp32`` | ``fp16`` | ``bf16``, the reason).
    """
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; use one of {', '.join(PRECISIONS)}")
    if device_type != "cuda":
        if requested in ("auto", "fp32"):
            return "fp32", f"fp32 on {device_type}" + (" (mixed precision is used on CUDA GPUs only)" if requested == "auto" else "")
        return "fp32", f"{requested} was asked for, but mixed precision runs on CUDA GPUs only: fp32 on {device_type}"
    has_bf16 = capability is not None and tuple(capability) >= (8, 0)
    cc = f"compute capability {capability[0]}.{capability[1]}" if capability is not None else "unknown compute capability"
    if requested == "fp32":
        return "fp32", "fp32 asked for: float32 with TF32 off"
    if requested == "fp16":
        return "fp16", "fp16 autocast asked for"
    if requested == "bf16":
        if has_bf16:
            return "bf16", "bf16 autocast asked for"
        return "fp16", f"bf16 was asked for, but this GPU ({cc}) has no native bfloat16: fp16 autocast"
    return "fp16", f"auto: fp16 autocast ({cc}; it keeps the labels where bf16 changed up to 0.5 %)"


def autocast_dtype(precision: str):
    """The ``torch.autocast`` dtype of a chosen precision, or None for float32 (autocast off)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)


@contextlib.contextmanager
def exact_fp32(enabled: bool = True) -> Iterator[None]:
    """Turn TF32 off for cuDNN convolutions and CUDA matmuls inside the block; restore after.

    Uses the flags the process already uses (the legacy ``allow_tf32`` ones, or, where the
    process switched to them, ``fp32_precision``: torch refuses reads that mix the two).
    """
    if not enabled:
        yield
        return
    import torch

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    try:
        saved = ("legacy", cudnn.allow_tf32, matmul.allow_tf32)
    except RuntimeError:  # the new fp32_precision API was used in this process
        saved = ("new", cudnn.conv.fp32_precision, matmul.fp32_precision)
    try:
        if saved[0] == "legacy":
            cudnn.allow_tf32, matmul.allow_tf32 = False, False
        else:
            cudnn.conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        yield
    finally:
        if saved[0] == "legacy":
            cudnn.allow_tf32, matmul.allow_tf32 = saved[1], saved[2]
        else:
            cudnn.conv.fp32_precision, matmul.fp32_precision = saved[1], saved[2]
