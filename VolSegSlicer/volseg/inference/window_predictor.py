"""The network as the sliding-window loops see it: one batch of windows in, checked float32 out.

Shared by MONAI's blending (:mod:`volseg.inference.sliding_window`) and nnU-Net's (:mod:`volseg.inference.nnunet`):
it selects the output of a network that returns a list, applies the activation per window when
asked, reports progress, honours cancellation and turns a network failure into a clear error.
"""

from __future__ import annotations

import threading

import torch

from volseg.errors import Cancelled, CheckpointError, InputError
from volseg.options import InferenceOptions
from volseg.progress import Reporter

__all__ = ["WindowPredictor", "activate", "activate_"]


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    """Softmax over channels (dim 1), sigmoid, or nothing (``"none"``)."""
    if activation == "softmax":
        return torch.softmax(x, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    return x


def activate_(x: torch.Tensor, activation: str, slab_voxels: int = 2**20) -> torch.Tensor:
    """:func:`activate` in place on a (B, C, I, J, K) tensor: sigmoid in place, softmax slab by
    slab along I (a temporary of ``C * slab_voxels`` values, not a second volume). Returns ``x``."""
    if activation == "sigmoid":
        return x.sigmoid_()
    if activation == "softmax":
        step = max(1, slab_voxels // max(1, x.shape[3] * x.shape[4]))
        with torch.no_grad():
            for start in range(0, x.shape[2], step):
                slab = x[:, :, start:start + step]
                slab.copy_(torch.softmax(slab, dim=1))
    return x


class WindowPredictor:
    """Wraps the network for MONAI: selects the output, counts windows, honours cancellation."""

    def __init__(self, model: torch.nn.Module, options: InferenceOptions, total: int,
                 reporter: Reporter | None, cancel: threading.Event | None,
                 memory_format: torch.memory_format = torch.contiguous_format, clock=None,
                 float_output: bool = True) -> None:
        self.model, self.options, self.total = model, options, total
        # False: an autocast window is handed on in its own dtype (MONAI's constant blending adds it into
        # its float32 sums, exactly as a float32 copy would be: no per-window copy)
        self.float_output = float_output or options.activation_per_window
        self.memory_format, self.clock = memory_format, clock
        self.reporter, self.cancel = reporter, cancel
        self.done = 0

    def __call__(self, patches: torch.Tensor) -> torch.Tensor:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled()
        if self.memory_format is not torch.contiguous_format:
            patches = patches.contiguous(memory_format=self.memory_format)
        try:
            out = self.model(patches) if self.clock is None else self.clock.network(self.model, patches)
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
        if out.dtype != torch.float32 and (self.float_output or out.dtype not in (torch.float16, torch.bfloat16)):
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
