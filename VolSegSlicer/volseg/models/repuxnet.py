"""RepUX-Net (Lee et al., MICCAI 2023), key-compatible with MASILab/RepUX-Net checkpoints.

The block is a large-kernel depthwise conv followed by BatchNorm and GELU -- no residual,
no MLP, no layer scale (despite the official docstring).

Bayesian frequency re-parameterisation (BFM) is a *training-time* device: the official
``deploy=False`` path multiplies the depthwise weight by a fixed mask on every forward call
(cumulatively, which makes even eval calls non-deterministic) and cannot be built without CUDA.
The official inference script uses ``deploy=True``: the plain conv with the stored weights.
This implementation is always the deploy form; ``a`` and ``deploy`` are accepted so official
configs pass straight in, and do not change inference. The state dict is the same in both modes.
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
    """``GELU(BN(dwconv(x)))`` with a ``ks``^3 depthwise conv.

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)``.
    Keys: ``dwconv.{weight [C,1,ks,ks,ks], bias}``, ``norm.{weight, bias, running_*, num_batches_tracked}``.
    """

    def __init__(self, channels: int, ks: int = 21) -> None:
        super().__init__()
        self.dwconv = nn.Conv3d(channels, channels, ks, padding=ks // 2, groups=channels, bias=True)
        self.norm = nn.BatchNorm3d(channels)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.dwconv(x)))


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
