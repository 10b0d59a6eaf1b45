"""Pieces shared by the MASILab UX family: 3D UX-Net, RepUX-Net and 3D DeformUX-Net.

The three networks share one layout (facts from the official repositories, see
``Testing/golden/manifests``):

* an encoder (attribute ``uxnet_3d`` / ``repuxnet_3d`` / ``deformuxnet_3d``) made of a stride-2
  7^3 stem, three ``[LayerNorm -> Conv3d(k2, s2)]`` downsampling layers and four stages of
  blocks; each stage output passes through a channels-first LayerNorm (``norm0..norm3``);
* a UNETR-style decoder made of MONAI blocks (``encoder1..5``, ``decoder5..1``, ``out``).

Only the block differs between families, so :class:`UXEncoder` takes a block factory and
:class:`UXUNet` takes the encoder and the attribute name under which the official code stores it
(which fixes the state-dict key prefix).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

#: ``(channels, drop_path) -> block``; a stage is ``depths[i]`` such blocks in a Sequential.
BlockFactory = Callable[[int, float], nn.Module]


class LayerNormChannelsFirst(nn.Module):
    """LayerNorm over the channel axis of a channels-first tensor.

    Args:
        channels: number of channels C.
        eps: added to the variance (the official code uses 1e-6).

    Shapes: ``(B, C, *spatial) -> (B, C, *spatial)``. Keys: ``weight [C]``, ``bias [C]``.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.weight.view(shape) * x + self.bias.view(shape)


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (training only; identity in eval or at rate 0).

    Shapes: ``(B, ...) -> (B, ...)``.
    """

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class UXBlock(nn.Module):
    """ConvNeXt-style block of 3D UX-Net and DeformUX-Net.

    ``x + gamma * pwconv2(GELU(pwconv1(LN(mixer(x)))))`` where ``mixer`` is the spatial
    operator (a depthwise conv for UX-Net, a deformable conv for DeformUX-Net), stored under
    ``mixer_name`` (``dwconv`` / ``ddc``) so the keys match the official checkpoints.

    Args:
        channels: C.
        mixer: spatial operator, ``(B, C, D, H, W) -> (B, C, D, H, W)``.
        mixer_name: attribute name of the mixer.
        grouped_mlp: True: ``pwconv1`` is ``Conv3d(C, 4C, 1, groups=C)`` and ``pwconv2``
            ``Conv3d(4C, C, 1, groups=C)`` (published UX-Net, DeformUX-Net); False: dense 1x1
            convs (UX-Net before commit 696f643).
        layer_scale_init_value: initial ``gamma``; ``<= 0`` means no ``gamma``.
        drop_path: stochastic depth rate.

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        mixer: nn.Module,
        mixer_name: str = "dwconv",
        grouped_mlp: bool = True,
        layer_scale_init_value: float = 1e-6,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.mixer_name = mixer_name
        setattr(self, mixer_name, mixer)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        groups = channels if grouped_mlp else 1
        self.pwconv1 = nn.Conv3d(channels, 4 * channels, kernel_size=1, groups=groups)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv3d(4 * channels, channels, kernel_size=1, groups=groups)
        if layer_scale_init_value > 0:
            self.gamma = nn.Parameter(torch.full((channels,), float(layer_scale_init_value)))
        else:
            self.gamma = None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = getattr(self, self.mixer_name)(x)
        y = self.norm(y.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1, 1)
        return x + self.drop_path(y)


class UXEncoder(nn.Module):
    """Stem + 3 downsamplings + 4 stages; returns the four normalised stage outputs.

    Args:
        in_chans: input channels.
        feat_size: channels of the four stages.
        depths: blocks per stage.
        make_block: ``(channels, drop_path) -> block``.
        drop_path_rate: stochastic depth, increasing linearly from 0 over all blocks.

    Shapes: ``(B, in_chans, D, H, W)`` -> list of ``(B, feat_size[i], D/2^(i+1), ...)``.
    Keys: ``downsample_layers.{0-3}.{0,1}.*``, ``stages.{s}.{b}.*``, ``norm{0-3}.*``.
    """

    def __init__(
        self,
        in_chans: int,
        feat_size: Sequence[int],
        depths: Sequence[int],
        make_block: BlockFactory,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(feat_size) != 4 or len(depths) != 4:
            raise ValueError(f"feat_size and depths need 4 entries, got {list(feat_size)} and {list(depths)}")
        stem = nn.Sequential(
            nn.Conv3d(in_chans, feat_size[0], kernel_size=7, stride=2, padding=3),
            LayerNormChannelsFirst(feat_size[0]),
        )
        downs = [
            nn.Sequential(
                LayerNormChannelsFirst(feat_size[i]),
                nn.Conv3d(feat_size[i], feat_size[i + 1], kernel_size=2, stride=2),
            )
            for i in range(3)
        ]
        self.downsample_layers = nn.ModuleList([stem, *downs])
        total = sum(depths)
        rates = [float(drop_path_rate) * i / max(1, total - 1) for i in range(total)]
        stages, start = [], 0
        for channels, depth in zip(feat_size, depths):
            stages.append(nn.Sequential(*(make_block(channels, rates[start + j]) for j in range(depth))))
            start += depth
        self.stages = nn.ModuleList(stages)
        for i, channels in enumerate(feat_size):
            self.add_module(f"norm{i}", LayerNormChannelsFirst(channels))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
            outs.append(getattr(self, f"norm{i}")(x))
        return outs


class UXUNet(nn.Module):
    """A UX-family encoder under a UNETR-style MONAI decoder.

    Args:
        encoder_name: attribute holding the encoder (``uxnet_3d``, ``repuxnet_3d``, ...).
        encoder: a :class:`UXEncoder` (or any module returning four feature maps).
        in_chans, out_chans, feat_size, hidden_size, norm_name, res_block, spatial_dims: as in
            the official constructors. The official code hard-codes the output block's input
            channels to 48; here ``decoder1`` and ``out`` use ``feat_size[0]``, which gives the
            same keys and shapes whenever ``feat_size[0] == 48`` (all published models).

    Shapes: ``(B, in_chans, D, H, W) -> (B, out_chans, D, H, W)`` logits; D, H, W divisible by 16.
    """

    def __init__(
        self,
        encoder_name: str,
        encoder: nn.Module,
        in_chans: int,
        out_chans: int,
        feat_size: Sequence[int],
        hidden_size: int = 768,
        norm_name: str | tuple = "instance",
        res_block: bool = True,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"only spatial_dims=3 is supported, got {spatial_dims}")
        self.encoder_name = encoder_name
        setattr(self, encoder_name, encoder)
        f = list(feat_size)
        sd = spatial_dims

        def basic(cin: int, cout: int, res: bool) -> nn.Module:
            return UnetrBasicBlock(sd, cin, cout, kernel_size=3, stride=1, norm_name=norm_name, res_block=res)

        def up(cin: int, cout: int) -> nn.Module:
            return UnetrUpBlock(sd, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name,
                                res_block=True)

        self.encoder1 = basic(in_chans, f[0], res_block)
        self.encoder2 = basic(f[0], f[1], res_block)
        self.encoder3 = basic(f[1], f[2], res_block)
        self.encoder4 = basic(f[2], f[3], res_block)
        self.encoder5 = basic(f[3], hidden_size, res_block)
        self.decoder5 = up(hidden_size, f[3])
        self.decoder4 = up(f[3], f[2])
        self.decoder3 = up(f[2], f[1])
        self.decoder2 = up(f[1], f[0])
        self.decoder1 = basic(f[0], f[0], True)
        self.out = UnetOutBlock(sd, f[0], out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = getattr(self, self.encoder_name)(x)
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(outs[0])
        enc3 = self.encoder3(outs[1])
        enc4 = self.encoder4(outs[2])
        hidden = self.encoder5(outs[3])
        y = self.decoder5(hidden, enc4)
        y = self.decoder4(y, enc3)
        y = self.decoder3(y, enc2)
        y = self.decoder2(y, enc1)
        return self.out(self.decoder1(y))


# --- reading the constructor arguments back from a state dict ------------------------------


def scaffold_config(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any] | None:
    """Constructor kwargs common to the family, read from ``sd``'s shapes, or None if absent.

    ``prefix`` is the encoder attribute (``"uxnet_3d"``...). Reads ``in_chans``, ``out_chans``,
    ``feat_size``, ``depths``, ``hidden_size`` and ``res_block``.
    """
    stem = sd.get(f"{prefix}.downsample_layers.0.0.weight")
    out = sd.get("out.conv.conv.weight")
    hidden = sd.get("encoder5.layer.conv1.conv.weight")
    if stem is None or out is None or hidden is None or stem.dim() != 5:
        return None
    feat = [int(stem.shape[0])]
    for i in (1, 2, 3):
        w = sd.get(f"{prefix}.downsample_layers.{i}.1.weight")
        if w is None:
            return None
        feat.append(int(w.shape[0]))
    pattern = re.compile(rf"^{re.escape(prefix)}\.stages\.(\d)\.(\d+)\.")
    blocks: list[set[int]] = [set(), set(), set(), set()]
    for key in sd:
        m = pattern.match(key)
        if m and int(m.group(1)) < 4:
            blocks[int(m.group(1))].add(int(m.group(2)))
    return {
        "in_chans": int(stem.shape[1]),
        "out_chans": int(out.shape[0]),
        "depths": [len(b) for b in blocks],
        "feat_size": feat,
        "hidden_size": int(hidden.shape[0]),
        "res_block": _res_block(sd),
        "spatial_dims": 3,
    }


def _res_block(sd: Mapping[str, torch.Tensor]) -> bool:
    """MONAI's residual block has a 1x1 ``conv3`` wherever channels change; the plain one never."""
    for i in range(1, 6):
        w = sd.get(f"encoder{i}.layer.conv1.conv.weight")
        if w is not None and w.shape[0] != w.shape[1]:
            return f"encoder{i}.layer.conv3.conv.weight" in sd
    return True


def first_block_tensor(sd: Mapping[str, torch.Tensor], prefix: str, name: str) -> torch.Tensor | None:
    """The tensor ``name`` of the first block of the first non-empty stage (None if absent)."""
    for s in range(4):
        t = sd.get(f"{prefix}.stages.{s}.0.{name}")
        if t is not None:
            return t
    return None

