"""RepUX-Net (Lee et al., MICCAI 2023), key-compatible with MASILab/RepUX-Net checkpoints.

The block is a large-kernel depthwise conv followed by BatchNorm and GELU -- no residual,
no MLP, no layer scale (despite the official docstring).

Bayesian frequency re-parameterisation (BFM) is a *training-time* device: the official
``deploy=False`` path multiplies the depthwise weight by a fixed mask on every forward call
(cumulatively, which makes even eval calls non-deterministic) and cannot be built without CUDA.
The official inference script uses ``deploy=True``: the plain conv with the stored weights.
This implementation is always the deploy form; ``a`` and ``deploy`` are accepted so official
configs pass straight in, and do not change inference. The state dict is the same in both modes.

Centre-only fast path. Because of a defect in the official BFM code, the optimiser never updates
the large kernels and each training forward call multiplies them by the BFM mask again, so in
checkpoints trained with the official code every off-centre tap is expected to have underflowed
to exactly 0 (REFERENCE sections 2 and 8; predicted from the code, not yet seen in a released
checkpoint). A depthwise conv whose off-centre taps are all exactly zero is exactly
``x * w_centre + bias`` per channel, so :class:`RepUXBlock` computes that instead of the ``ks``^3
conv when

* every off-centre tap of ``dwconv.weight`` is exactly zero (checked on every call by counting
  non-zeros -- one pass over the weights, milliseconds -- so no edit of the weights is missed),
* no gradient for the weights is being recorded (the conv's weight gradient has off-centre
  terms the scale cannot give), and
* the input is finite (inf/NaN spread to neighbours through the conv's zero taps: ``0 * inf``).

The result is then bit-identical to the CPU conv (same two roundings, product then bias; tested,
also under bfloat16 autocast, which the scale follows); a GPU conv algorithm may round
differently, by its own rounding error only. Nothing is added
to the module's state: keys, shapes and checkpoints are unchanged.
``RepUXBlock.centre_only()`` and ``RepUXNet.centre_only_blocks()`` tell whether it applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from volseg.models.registry import Architecture
from volseg.models.ux_common import UXEncoder, UXUNet, first_block_tensor, scaffold_config

PREFIX = "repuxnet_3d"


class RepUXBlock(nn.Module):
    """``GELU(BN(dwconv(x)))`` with a ``ks``^3 depthwise conv (exact per-channel scale when centre-only).

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)``.
    Keys: ``dwconv.{weight [C,1,ks,ks,ks], bias}``, ``norm.{weight, bias, running_*, num_batches_tracked}``.
    """

    def __init__(self, channels: int, ks: int = 21) -> None:
        super().__init__()
        self.dwconv = nn.Conv3d(channels, channels, ks, padding=ks // 2, groups=channels, bias=True)
        self.norm = nn.BatchNorm3d(channels)
        self.act = nn.GELU()

    def centre_only(self) -> bool:
        """Whether every off-centre tap of ``dwconv.weight`` is exactly zero (the conv is then a scale)."""
        weight = self.dwconv.weight
        if weight.is_meta:
            return False
        c = weight.shape[-1] // 2
        # exact: NaN counts as non-zero, and both counts are integers
        return bool(torch.count_nonzero(weight) == torch.count_nonzero(weight[:, :, c, c, c]))

    def uses_fast_path(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` replaces the conv by the exact per-channel scale for this input."""
        weight = self.dwconv.weight
        records_grad = torch.is_grad_enabled() and weight.requires_grad
        if records_grad or not self.centre_only():
            return False
        # a finite sum proves every element finite (an overflowing sum only costs the fast path)
        total = x.sum(dtype=torch.promote_types(x.dtype, torch.float32))
        return bool(torch.isfinite(total))

    def centre_scale(self, x: torch.Tensor) -> torch.Tensor:
        """``x * w_centre + bias`` per channel: the conv when all other taps are zero. ``(B,C,...)`` -> same.

        Under autocast it follows the conv: operands rounded to the autocast dtype, the product and
        sum in float32, the result in the autocast dtype.
        """
        weight, bias = self.dwconv.weight, self.dwconv.bias
        c = weight.shape[-1] // 2
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = weight[:, 0, c, c, c].view(shape)
        shift = bias.view(shape) if bias is not None else None
        if not torch.is_autocast_enabled(x.device.type):
            out = x * scale
            return out + shift if shift is not None else out
        low = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            out = x.to(low).float() * scale.to(low).float()
            if shift is not None:
                out = out + shift.to(low).float()
            return out.to(low)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.centre_scale(x) if self.uses_fast_path(x) else self.dwconv(x)
        return self.act(self.norm(y))


class RepUXNet(UXUNet):
    """RepUX-Net with the official constructor arguments.

    Args:
        ks: depthwise kernel size (21 published).
        a: BFM scale; accepted for compatibility, no effect (training-time only).
        deploy: accepted for compatibility, no effect: this is always the deploy form.
        drop_path_rate, layer_scale_init_value: accepted; the official block uses neither.
        conv_block: accepted; unused, as in the official code.
        Others: as :class:`volseg.models.uxnet.UXNet`.

    Shapes: ``(B, in_chans, D, H, W) -> (B, out_chans, D, H, W)`` logits, D/H/W divisible by 16.
    """

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 13,
        depths: Sequence[int] = (2, 2, 2, 2),
        feat_size: Sequence[int] = (48, 96, 192, 384),
        ks: int = 21,
        a: float = 1,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        hidden_size: int = 768,
        norm_name: str | tuple = "instance",
        conv_block: bool = True,
        res_block: bool = True,
        spatial_dims: int = 3,
        deploy: bool = True,
    ) -> None:
        if ks % 2 != 1:
            raise ValueError(f"ks must be odd, got {ks}")
        encoder = UXEncoder(in_chans, feat_size, depths, lambda channels, _dp: RepUXBlock(channels, ks))
        super().__init__(PREFIX, encoder, in_chans, out_chans, feat_size, hidden_size, norm_name, res_block,
                         spatial_dims)

    def centre_only_blocks(self) -> tuple[int, int]:
        """(blocks whose kernels are centre-only, all blocks): how many take the exact fast path."""
        blocks = [m for m in self.modules() if isinstance(m, RepUXBlock)]
        return sum(b.centre_only() for b in blocks), len(blocks)


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """RepUX-Net kwargs implied by a state dict's shapes (None when it is not a RepUX-Net)."""
    config = scaffold_config(sd, PREFIX)
    dw = first_block_tensor(sd, PREFIX, "dwconv.weight")
    if config is None or dw is None:
        return None
    config["ks"] = int(dw.shape[-1])
    config["deploy"] = True
    return config


def describe_variant(config: Mapping[str, Any]) -> str:
    return (f"{config.get('ks', 21)}^3 depthwise conv + BatchNorm (deploy form), "
            f"{config.get('out_chans')} output channels")


ARCHITECTURES = [
    Architecture(
        name="repuxnet",
        summary="RepUX-Net (MICCAI 2023): 21^3 depthwise-conv encoder (deploy form) + UNETR decoder",
        build=RepUXNet,
        config_from_state_dict=config_from_state_dict,
        describe_variant=describe_variant,
        output_kind="softmax",
        aliases=("rep-ux-net",),
    )
]
