"""3D UX-Net (Lee et al., ICLR 2023), key-compatible with MASILab/3DUX-Net checkpoints.

Two block variants exist in the official history, and the published FeTA/FLARE weights were
posted four days after the switch, so the variant is read from the checkpoint's shapes:

* published (commit 696f643 onwards): 7^3 depthwise conv, *grouped* 1x1 MLP
  (``pwconv1.weight [4C, 1, 1, 1, 1]``);
* early: 13^3 depthwise conv, *dense* 1x1 MLP (``pwconv1.weight [4C, C, 1, 1, 1]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from volseg.models.registry import Architecture
from volseg.models.ux_common import UXBlock, UXEncoder, UXUNet, first_block_tensor, scaffold_config

PREFIX = "uxnet_3d"


class UXNet(UXUNet):
    """3D UX-Net with the official constructor arguments.

    Args:
        in_chans, out_chans, depths, feat_size, drop_path_rate, layer_scale_init_value,
            hidden_size, norm_name, res_block, spatial_dims: as ``UXNET`` in the official repo.
        conv_block: accepted for compatibility; unused (as in the official code).
        kernel_size: depthwise kernel of every block (7 published, 13 early).
        grouped_mlp: grouped 1x1 MLP (published) or dense (early).

    Shapes: ``(B, in_chans, D, H, W) -> (B, out_chans, D, H, W)`` logits, D/H/W divisible by 16.
    """

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 13,
        depths: Sequence[int] = (2, 2, 2, 2),
        feat_size: Sequence[int] = (48, 96, 192, 384),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        hidden_size: int = 768,
        norm_name: str | tuple = "instance",
        conv_block: bool = True,
        res_block: bool = True,
        spatial_dims: int = 3,
        kernel_size: int = 7,
        grouped_mlp: bool = True,
    ) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")

        def make_block(channels: int, drop_path: float) -> nn.Module:
            dwconv = nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
            return UXBlock(channels, dwconv, "dwconv", grouped_mlp, layer_scale_init_value, drop_path)

        encoder = UXEncoder(in_chans, feat_size, depths, make_block, drop_path_rate)
        super().__init__(PREFIX, encoder, in_chans, out_chans, feat_size, hidden_size, norm_name, res_block,
                         spatial_dims)


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """UX-Net kwargs implied by a state dict's shapes (None when it is not a UX-Net)."""
    config = scaffold_config(sd, PREFIX)
    dw = first_block_tensor(sd, PREFIX, "dwconv.weight")
    pw1 = first_block_tensor(sd, PREFIX, "pwconv1.weight")
    if config is None or dw is None or pw1 is None:
        return None
    config["kernel_size"] = int(dw.shape[-1])
    config["grouped_mlp"] = int(pw1.shape[1]) == 1
    has_gamma = first_block_tensor(sd, PREFIX, "gamma") is not None
    config["layer_scale_init_value"] = 1e-6 if has_gamma else 0.0
    return config


def describe_variant(config: Mapping[str, Any]) -> str:
    k = config.get("kernel_size", 7)
    mlp = "grouped" if config.get("grouped_mlp", True) else "dense"
    era = "published block" if (k, mlp) == (7, "grouped") else (
        "early block (before commit 696f643)" if (k, mlp) == (13, "dense") else "custom block")
    return f"{era}: {k}^3 depthwise conv + {mlp} 1x1 MLP, {config.get('out_chans')} output channels"


ARCHITECTURES = [
    Architecture(
        name="uxnet",
        summary="3D UX-Net (ICLR 2023): large-kernel depthwise ConvNeXt encoder + UNETR decoder",
        build=UXNet,
        config_from_state_dict=config_from_state_dict,
        describe_variant=describe_variant,
        output_kind="softmax",
        aliases=("3duxnet", "ux-net"),
    )
]
