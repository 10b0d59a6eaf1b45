"""3D DeformUX-Net (Lee et al., arXiv 2310.00199), key-compatible with MASILab/deform-uxnet.

The block is UX-Net's with the depthwise conv replaced by a depthwise 3x3x3 deformable conv
(``ddc``, pure PyTorch here: :mod:`volseg.models.deform_conv`; upstream it is a CUDA-only
extension). Two upstream versions of the offset branch exist, told apart by
``ddc.conv_offset.weight``:

* ``[81, C, 3, 3, 3]`` -- the compiled extension (``offset_kernel_size=3``): consistent offsets;
  55,701,496 parameters with 16 classes, matching the paper's 55.8M. The default here.
* ``[81, C, 1, 1, 1]`` -- the repository source (``offset_kernel_size=1``, padding 1): the offset
  map is larger than the output and the CUDA op reads it with the output's strides. This is
  reproduced exactly, including its consequence that a sample's output depends on the samples
  before it in the same batch (so sliding-window ``sw_batch_size`` changes results).

No weights are published.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from volseg.models.deform_conv import DeformConv3d
from volseg.models.registry import Architecture
from volseg.models.ux_common import UXBlock, UXEncoder, UXUNet, first_block_tensor, scaffold_config

PREFIX = "deformuxnet_3d"


class DeformUXNet(UXUNet):
    """3D DeformUX-Net with the official constructor arguments.

    Args:
        offset_kernel_size: 3 (compiled extension, default) or 1 (repository source).
        chunk_size: output depth slices per deformable-conv chunk (memory and speed only; None =
            automatic, see :func:`volseg.models.deform_conv.deform_conv3d`).
        conv_block: accepted; unused, as in the official code.
        Others: as :class:`volseg.models.uxnet.UXNet` (the official signature is UX-Net's).

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
        offset_kernel_size: int = 3,
        chunk_size: int | None = None,
    ) -> None:
        if offset_kernel_size not in (1, 3):
            raise ValueError(f"offset_kernel_size must be 1 (repository source) or 3 (compiled), "
                             f"got {offset_kernel_size}")

        def make_block(channels: int, drop_path: float) -> nn.Module:
            ddc = DeformConv3d(channels, 3, padding=1, offset_kernel_size=offset_kernel_size, chunk_size=chunk_size)
            return UXBlock(channels, ddc, "ddc", True, layer_scale_init_value, drop_path)

        encoder = UXEncoder(in_chans, feat_size, depths, make_block, drop_path_rate)
        super().__init__(PREFIX, encoder, in_chans, out_chans, feat_size, hidden_size, norm_name, res_block,
                         spatial_dims)
        #: A sample's output depends on the other samples in its batch (repository-source offsets):
        #: the inference engine then runs sliding windows one at a time (the batch-1 outputs).
        self.batch_dependent = offset_kernel_size == 1


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """DeformUX-Net kwargs implied by a state dict's shapes (None when it is not one)."""
    config = scaffold_config(sd, PREFIX)
    offset_w = first_block_tensor(sd, PREFIX, "ddc.conv_offset.weight")
    if config is None or offset_w is None:
        return None
    config["offset_kernel_size"] = int(offset_w.shape[-1])
    has_gamma = first_block_tensor(sd, PREFIX, "gamma") is not None
    config["layer_scale_init_value"] = 1e-6 if has_gamma else 0.0
    return config


def describe_variant(config: Mapping[str, Any]) -> str:
    if config.get("offset_kernel_size", 3) == 1:
        kind = ("repository-source offset branch (1x1x1, padding 1; offsets read with the CUDA op's "
                "strides, batch-dependent)")
    else:
        kind = "compiled-extension offset branch (3x3x3)"
    return f"{kind}, {config.get('out_chans')} output channels"


ARCHITECTURES = [
    Architecture(
        name="deformuxnet",
        summary="3D DeformUX-Net: depthwise deformable-conv encoder (pure PyTorch) + UNETR decoder",
        build=DeformUXNet,
        config_from_state_dict=config_from_state_dict,
        describe_variant=describe_variant,
        output_kind="softmax",
        aliases=("deform-ux-net",),
    )
]
