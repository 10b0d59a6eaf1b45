"""MedNeXt v1 (Roy et al., MICCAI 2023): a ConvNeXt-style U-Net for nnU-Net.

Written from the paper and the facts in ``../shared/golden/REFERENCE.md`` section 5 (official
repository MIC-DKFZ/MedNeXt). Parameter names match the official state dict (``stem``,
``enc_block_i``, ``down_i``, ``bottleneck``, ``up_i``, ``dec_block_i``, ``out_0..4``,
``dummy_tensor``) so nnU-Net checkpoints load strictly. MONAI-format state dicts
(``enc_stages.i``, ``down_blocks.i``, ...) are renamed by :func:`prepare_state_dict`.

Notes for inference:

* ``checkpoint_style`` is accepted (M and L are published with ``'outside_block'``) but never
  used: gradient checkpointing only saves memory when training, and the math is identical.
* ``dummy_tensor`` exists only for the official gradient checkpointing; it is kept as a
  parameter so official state dicts (and parameter counts) match exactly, and it is unused.
* With ``deep_supervision=True`` the extra heads ``out_1..4`` exist (so official keys load
  strictly), but the forward returns the full-resolution output only, unless ``do_ds`` is set
  True, in which case it returns ``[out_0, out_1, out_2, out_3, out_4]`` (coarser and coarser).

Shapes: B batch, C channels, (D, H, W) spatial; each spatial size must be divisible by 16 and
at least 32 (the bottleneck's per-channel GroupNorm needs more than one voxel).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from volseg.models.registry import Architecture, StateDict

#: Published variants (create_mednext_v1): exp_r, block_counts, checkpoint_style.
MODEL_IDS: dict[str, dict[str, Any]] = {
    "S": {"exp_r": 2, "block_counts": [2] * 9, "checkpoint_style": None},
    "B": {"exp_r": [2, 3, 4, 4, 4, 4, 4, 3, 2], "block_counts": [2] * 9, "checkpoint_style": None},
    "M": {"exp_r": [2, 3, 4, 4, 4, 4, 4, 3, 2], "block_counts": [3, 4, 4, 4, 4, 4, 4, 4, 3],
          "checkpoint_style": "outside_block"},
    "L": {"exp_r": [3, 4, 8, 8, 8, 8, 8, 4, 3], "block_counts": [3, 4, 8, 8, 8, 8, 8, 4, 3],
          "checkpoint_style": "outside_block"},
}


def global_response_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ConvNeXt-V2 GRN on (B, C, *spatial): x + gamma * x * (||x||_spatial / mean_C ||x||) + beta."""
    gx = torch.norm(x, p=2, dim=tuple(range(2, x.ndim)), keepdim=True)
    nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
    return gamma * (x * nx) + beta + x


class MedNeXtBlock(nn.Module):
    """Depthwise conv k -> GroupNorm(C groups) -> 1x1 (C -> rC) -> GELU -> [GRN] -> 1x1 (rC -> C_out) [+ x].

    (B, C_in, *S) -> (B, C_out, *S).
    """

    def __init__(self, in_channels: int, out_channels: int, exp_r: int = 4, kernel_size: int = 7,
                 do_res: bool = True, norm_type: str = "group", dim: str = "3d", grn: bool = False,
                 conv1: nn.Module | None = None) -> None:
        super().__init__()
        if norm_type != "group":
            raise ValueError(f"norm_type {norm_type!r} is not supported (every published MedNeXt uses 'group')")
        conv = _conv(dim)
        self.do_res = do_res
        self.conv1 = conv1 if conv1 is not None else conv(
            in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels)
        self.norm = nn.GroupNorm(num_groups=in_channels, num_channels=in_channels)
        self.conv2 = conv(in_channels, exp_r * in_channels, kernel_size=1)
        self.conv3 = conv(exp_r * in_channels, out_channels, kernel_size=1)
        self.grn = grn
        if grn:
            shape = (1, exp_r * in_channels) + (1,) * _n_spatial(dim)
            self.grn_beta = nn.Parameter(torch.zeros(shape))
            self.grn_gamma = nn.Parameter(torch.zeros(shape))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(self.norm(self.conv1(x))))
        if self.grn:
            y = global_response_norm(y, self.grn_gamma, self.grn_beta)
        return self.conv3(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        return x + y if self.do_res else y


class MedNeXtDownBlock(MedNeXtBlock):
    """Block with a stride-2 depthwise conv; residual through a stride-2 1x1 conv.

    (B, C_in, *S) -> (B, C_out, *S/2).
    """

    def __init__(self, in_channels: int, out_channels: int, exp_r: int = 4, kernel_size: int = 7,
                 do_res: bool = False, norm_type: str = "group", dim: str = "3d", grn: bool = False) -> None:
        conv = _conv(dim)
        conv1 = conv(in_channels, in_channels, kernel_size, stride=2, padding=kernel_size // 2, groups=in_channels)
        super().__init__(in_channels, out_channels, exp_r, kernel_size, False, norm_type, dim, grn, conv1=conv1)
        self.resample_do_res = do_res
        if do_res:
            self.res_conv = conv(in_channels, out_channels, kernel_size=1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        return y + self.res_conv(x) if self.resample_do_res else y


class MedNeXtUpBlock(MedNeXtBlock):
    """Block with a stride-2 depthwise transposed conv (size 2S-1, then padded at the start to 2S).

    (B, C_in, *S) -> (B, C_out, *2S).
    """

    def __init__(self, in_channels: int, out_channels: int, exp_r: int = 4, kernel_size: int = 7,
                 do_res: bool = False, norm_type: str = "group", dim: str = "3d", grn: bool = False) -> None:
        tconv = _conv_transpose(dim)
        conv1 = tconv(in_channels, in_channels, kernel_size, stride=2, padding=kernel_size // 2, groups=in_channels)
        super().__init__(in_channels, out_channels, exp_r, kernel_size, False, norm_type, dim, grn, conv1=conv1)
        self.resample_do_res = do_res
        self._pad = (1, 0) * _n_spatial(dim)
        if do_res:
            self.res_conv = tconv(in_channels, out_channels, kernel_size=1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(self.branch(x), self._pad)
        if self.resample_do_res:
            y = y + F.pad(self.res_conv(x), self._pad)
        return y


class OutBlock(nn.Module):
    """1x1 transposed conv (weights [C_in, n_classes, 1, 1, 1], as official). (B, C, *S) -> (B, K, *S)."""

    def __init__(self, in_channels: int, n_classes: int, dim: str = "3d") -> None:
        super().__init__()
        self.conv_out = _conv_transpose(dim)(in_channels, n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(x)


def _n_spatial(dim: str) -> int:
    if dim not in ("2d", "3d"):
        raise ValueError(f"dim must be '2d' or '3d', not {dim!r}")
    return int(dim[0])


def _conv(dim: str) -> type[nn.Module]:
    return nn.Conv3d if _n_spatial(dim) == 3 else nn.Conv2d


def _conv_transpose(dim: str) -> type[nn.Module]:
    return nn.ConvTranspose3d if _n_spatial(dim) == 3 else nn.ConvTranspose2d


def _per_stage(value: int | Sequence[int], name: str) -> list[int]:
    values = [int(value)] * 9 if isinstance(value, int) else [int(v) for v in value]
    if len(values) != 9:
        raise ValueError(f"{name} must be an int or 9 values (4 encoder stages, bottleneck, 4 decoder stages)")
    return values


class MedNeXt(nn.Module):
    """MedNeXt v1 with the official constructor (``nnunet_mednext ... MedNextV1.MedNeXt``).

    Args:
        in_channels: input channels.
        n_channels: channels of the first stage C (doubled at each of the 4 down steps).
        n_classes: output channels (softmax classes).
        exp_r: expansion ratio, one int or 9 values (stages 0-3, bottleneck, decoder 3-0).
        kernel_size: depthwise kernel size of every block; as officially, when it is not None it
            overrides ``enc_kernel_size`` and ``dec_kernel_size``.
        enc_kernel_size, dec_kernel_size: separate kernels for enc_block_0-down_3 /
            bottleneck-dec_block_0 (used when ``kernel_size=None``).
        deep_supervision: build the extra heads ``out_1..4``; see :attr:`do_ds`.
        do_res: residuals in the plain blocks; do_res_up_down: in the down/up blocks.
        checkpoint_style: accepted for compatibility, ignored (no gradient checkpointing).
        block_counts: blocks per stage (9 values).
        norm_type: only ``'group'`` (every published variant).
        dim: ``'3d'`` (or ``'2d'``).
        grn: ConvNeXt-V2 global response normalisation in every block except ``down_0``
            (the official code does not pass it there).
        down_exp_r: volseg extension, not an official argument. The expansion ratios of
            ``down_0..3`` (4 values). ``None`` (default) is the official rule: ``down_i`` uses
            ``exp_r[i + 1]``. MONAI's port uses ``exp_r[i]`` instead, so MONAI-trained B/M/L
            weights need ``down_exp_r=exp_r[:4]``; :func:`config_from_state_dict` reads it from
            the shapes.

    (B, in_channels, D, H, W) -> (B, n_classes, D, H, W) logits, or the list of 5 deep
    supervision outputs when :attr:`do_ds` is True.
    """

    def __init__(
        self,
        in_channels: int,
        n_channels: int,
        n_classes: int,
        exp_r: int | Sequence[int] = 4,
        kernel_size: int | None = 7,
        enc_kernel_size: int | None = None,
        dec_kernel_size: int | None = None,
        deep_supervision: bool = False,
        do_res: bool = False,
        do_res_up_down: bool = False,
        checkpoint_style: str | None = None,
        block_counts: Sequence[int] = (2,) * 9,
        norm_type: str = "group",
        dim: str = "3d",
        grn: bool = False,
        down_exp_r: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if checkpoint_style not in (None, "outside_block"):
            raise ValueError(f"checkpoint_style must be None or 'outside_block', not {checkpoint_style!r}")
        if kernel_size is not None:  # as official: kernel_size overrides enc/dec_kernel_size
            enc_kernel_size = dec_kernel_size = kernel_size
        if enc_kernel_size is None or dec_kernel_size is None:
            raise ValueError("give kernel_size, or kernel_size=None with enc_kernel_size and dec_kernel_size")
        enc_k, dec_k = enc_kernel_size, dec_kernel_size
        exp = _per_stage(exp_r, "exp_r")
        counts = _per_stage(block_counts, "block_counts")
        down_exp = [int(e) for e in down_exp_r] if down_exp_r is not None else exp[1:5]
        if len(down_exp) != 4:
            raise ValueError(f"down_exp_r must have 4 values (down_0..3), got {list(down_exp)}")
        self.deep_supervision = deep_supervision
        #: Return all five deep-supervision outputs (needs ``deep_supervision=True``).
        self.do_ds = False
        self.checkpoint_style = checkpoint_style  # recorded only; inference never checkpoints
        c = n_channels
        common = {"norm_type": norm_type, "dim": dim}

        def stage(channels: int, i: int, k: int) -> nn.Sequential:
            return nn.Sequential(*[MedNeXtBlock(channels, channels, exp[i], k, do_res, grn=grn, **common)
                                   for _ in range(counts[i])])

        self.stem = _conv(dim)(in_channels, c, kernel_size=1)
        for i in range(4):
            self.add_module(f"enc_block_{i}", stage(c * 2**i, i, enc_k))
            self.add_module(f"down_{i}", MedNeXtDownBlock(
                c * 2**i, c * 2 ** (i + 1), down_exp[i], enc_k, do_res_up_down, grn=grn and i > 0, **common))
        self.bottleneck = stage(c * 16, 4, dec_k)
        for i in (3, 2, 1, 0):
            j = 8 - i  # decoder stage index into exp_r / block_counts
            self.add_module(f"up_{i}", MedNeXtUpBlock(
                c * 2 ** (i + 1), c * 2**i, exp[j], dec_k, do_res_up_down, grn=grn, **common))
            self.add_module(f"dec_block_{i}", stage(c * 2**i, j, dec_k))
        self.out_0 = OutBlock(c, n_classes, dim)
        # Official: a parameter used only to make gradient checkpointing work. Unused here.
        self.dummy_tensor = nn.Parameter(torch.tensor([1.0]), requires_grad=True)
        if deep_supervision:
            for i in range(1, 5):
                self.add_module(f"out_{i}", OutBlock(c * 2**i, n_classes, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        ds = self.do_ds and self.deep_supervision
        x = self.stem(x)
        skips = []
        for i in range(4):
            x = getattr(self, f"enc_block_{i}")(x)
            skips.append(x)
            x = getattr(self, f"down_{i}")(x)
        x = self.bottleneck(x)
        extra = [self.out_4(x)] if ds else []
        for i in (3, 2, 1, 0):
            x = getattr(self, f"dec_block_{i}")(skips[i] + getattr(self, f"up_{i}")(x))
            if ds and i > 0:
                extra.insert(0, getattr(self, f"out_{i}")(x))
        x = self.out_0(x)
        return [x, *extra] if ds else x


def build(
    in_channels: int | None = None,
    n_channels: int | None = None,
    n_classes: int | None = None,
    exp_r: int | Sequence[int] | None = None,
    kernel_size: int | None = None,
    enc_kernel_size: int | None = None,
    dec_kernel_size: int | None = None,
    deep_supervision: bool = False,
    do_res: bool | None = None,
    do_res_up_down: bool | None = None,
    checkpoint_style: str | None = None,
    block_counts: Sequence[int] | None = None,
    norm_type: str = "group",
    dim: str = "3d",
    grn: bool = False,
    down_exp_r: Sequence[int] | None = None,
    *,
    model_id: str | None = None,
    num_input_channels: int | None = None,
    num_classes: int | None = None,
) -> MedNeXt:
    """Build MedNeXt from the class's arguments or from the official factory's.

    ``build(model_id="B", num_input_channels=1, num_classes=14, kernel_size=3,
    deep_supervision=True)`` gives the published variant (``create_mednext_v1``): 32 channels,
    residual blocks and resampling, exp_r / block_counts from the model id. Class arguments
    given together with ``model_id`` override the variant's values.
    """
    if num_input_channels is not None:
        if in_channels is not None and in_channels != num_input_channels:
            raise ValueError("in_channels and num_input_channels disagree")
        in_channels = num_input_channels
    if num_classes is not None:
        if n_classes is not None and n_classes != num_classes:
            raise ValueError("n_classes and num_classes disagree")
        n_classes = num_classes
    if in_channels is None or n_classes is None:
        raise ValueError("give in_channels (num_input_channels) and n_classes (num_classes)")
    preset: dict[str, Any] = {"exp_r": 4, "block_counts": [2] * 9, "n_channels": None, "kernel_size": 7,
                              "do_res": False, "do_res_up_down": False}
    if model_id is not None:
        key = str(model_id).upper()
        if key not in MODEL_IDS:
            raise ValueError(f"model_id must be one of {sorted(MODEL_IDS)}, not {model_id!r}")
        preset.update(MODEL_IDS[key], n_channels=32, kernel_size=3, do_res=True, do_res_up_down=True)
    given = {"exp_r": exp_r, "block_counts": block_counts, "n_channels": n_channels, "kernel_size": kernel_size,
             "do_res": do_res, "do_res_up_down": do_res_up_down}
    args = {k: (v if v is not None else preset[k]) for k, v in given.items()}
    if kernel_size is None and enc_kernel_size is not None and dec_kernel_size is not None:
        args["kernel_size"] = None  # separate encoder / decoder kernels
    if args["n_channels"] is None:
        raise ValueError("give n_channels (or a model_id)")
    return MedNeXt(in_channels=in_channels, n_classes=n_classes, enc_kernel_size=enc_kernel_size,
                   dec_kernel_size=dec_kernel_size, deep_supervision=deep_supervision,
                   checkpoint_style=checkpoint_style if checkpoint_style is not None else preset.get("checkpoint_style"),
                   norm_type=norm_type, dim=dim, grn=grn, down_exp_r=down_exp_r, **args)


# --------------------------------------------------------------------------- state dicts

_MONAI_RULES = [
    (re.compile(r"^enc_stages\.(\d)\."), lambda m: f"enc_block_{m.group(1)}."),
    (re.compile(r"^down_blocks\.(\d)\."), lambda m: f"down_{m.group(1)}."),
    (re.compile(r"^up_blocks\.(\d)\."), lambda m: f"up_{3 - int(m.group(1))}."),
    (re.compile(r"^dec_stages\.(\d)\."), lambda m: f"dec_block_{3 - int(m.group(1))}."),
    (re.compile(r"^out_blocks\.(\d)\."), lambda m: f"out_{4 - int(m.group(1))}."),
]


def _is_monai_format(sd: StateDict) -> bool:
    return any(k.startswith("enc_stages.") for k in sd) and "out_0.conv_out.weight" in sd


def _is_official_format(sd: StateDict) -> bool:
    return "stem.weight" in sd and "down_0.conv1.weight" in sd and "out_0.conv_out.weight" in sd


def prepare_state_dict(sd: StateDict) -> dict[str, torch.Tensor]:
    """Official keys from an official or MONAI ``MedNeXt`` state dict; others pass unchanged.

    MONAI -> official: ``enc_stages.i`` -> ``enc_block_i``, ``down_blocks.i`` -> ``down_i``,
    ``up_blocks.i`` -> ``up_{3-i}``, ``dec_stages.i`` -> ``dec_block_{3-i}``, the deep-supervision
    heads ``out_blocks.k`` -> ``out_{4-k}`` (``out_0`` keeps its name), ``global_resp_*`` ->
    ``grn_*``. The GRN parameters of ``down_1..3`` (absent in MONAI, whose down blocks skip GRN)
    are added as zeros: GRN with gamma = beta = 0 is the identity, so MONAI's function is kept.
    MONAI's B/M/L down blocks have other expansion ratios than the official ones; the implied
    config then carries ``down_exp_r`` so they load and run exactly as in MONAI.

    ``dummy_tensor`` (absent in MONAI, and in official state dicts saved without it) is added
    as 1: the official network uses it only for gradient checkpointing, volseg never.
    """
    if _is_monai_format(sd):
        out: dict[str, torch.Tensor] = {}
        for key, value in sd.items():
            new = key
            for pattern, repl in _MONAI_RULES:
                new = pattern.sub(repl, new, count=1)
            out[new.replace("global_resp_beta", "grn_beta").replace("global_resp_gamma", "grn_gamma")] = value
        if any(k.endswith("grn_gamma") for k in out):
            for i in (1, 2, 3):
                w = out.get(f"down_{i}.conv2.weight")
                if w is not None and f"down_{i}.grn_gamma" not in out:
                    shape = (1, w.shape[0]) + (1,) * (w.ndim - 2)
                    out[f"down_{i}.grn_gamma"] = torch.zeros(shape, dtype=w.dtype, device=w.device)
                    out[f"down_{i}.grn_beta"] = torch.zeros(shape, dtype=w.dtype, device=w.device)
    else:
        out = dict(sd)
    if _is_official_format(out) and "dummy_tensor" not in out:
        stem = out["stem.weight"]
        out["dummy_tensor"] = torch.ones(1, dtype=stem.dtype, device=stem.device)
    return out


def _stage_count(sd: StateDict, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.conv1\.weight$")
    return len({m.group(1) for k in sd if (m := pattern.match(k))})


def config_from_state_dict(sd: StateDict) -> dict[str, Any] | None:
    """Constructor kwargs implied by an official (or renamed MONAI) MedNeXt state dict."""
    stem, out0 = sd.get("stem.weight"), sd.get("out_0.conv_out.weight")
    if stem is None or out0 is None or "down_0.conv1.weight" not in sd or stem.ndim not in (4, 5):
        return None
    c = int(stem.shape[0])
    stages = [f"enc_block_{i}" for i in range(4)] + ["bottleneck"] + [f"dec_block_{i}" for i in (3, 2, 1, 0)]
    block_counts = [_stage_count(sd, s) for s in stages]
    exp_r = []
    for i, name in enumerate(stages):
        w = sd.get(f"{name}.0.conv2.weight")
        width = c * 2 ** (i if i <= 4 else 8 - i)
        exp_r.append(int(w.shape[0]) // width if w is not None else 4)
    down_exp = []
    for i in range(4):
        w = sd.get(f"down_{i}.conv2.weight")
        down_exp.append(int(w.shape[0]) // (c * 2**i) if w is not None else exp_r[i + 1])
    enc_w, dec_w = sd.get("enc_block_0.0.conv1.weight"), sd.get("dec_block_0.0.conv1.weight")
    enc_k = int((enc_w if enc_w is not None else sd["down_0.conv1.weight"]).shape[-1])
    dec_w = dec_w if dec_w is not None else sd.get("up_0.conv1.weight")
    dec_k = int(dec_w.shape[-1]) if dec_w is not None else enc_k
    config: dict[str, Any] = {
        "in_channels": int(stem.shape[1]),
        "n_channels": c,
        "n_classes": int(out0.shape[1]),
        "exp_r": exp_r[0] if len(set(exp_r)) == 1 else exp_r,
        "kernel_size": enc_k,
        "deep_supervision": "out_1.conv_out.weight" in sd,
        "do_res": True,  # invisible in the weights; every published variant uses residual blocks
        "do_res_up_down": "down_0.res_conv.weight" in sd,
        "checkpoint_style": None,  # training-only; never used for inference
        "block_counts": block_counts,
        "norm_type": "group",
        "dim": "3d" if stem.ndim == 5 else "2d",
        "grn": any(k.endswith("grn_gamma") for k in sd),
    }
    if down_exp != exp_r[1:5]:  # MONAI's rule (down_i uses stage i's ratio), or any other
        config["down_exp_r"] = down_exp
    if dec_k != enc_k:
        config.update(kernel_size=None, enc_kernel_size=enc_k, dec_kernel_size=dec_k)
    return config


def describe_variant(config: dict[str, Any]) -> str:
    """Name the published variant (S/B/M/L, kernel) when the config is one, else summarise it."""
    exp = config.get("exp_r")
    exp_list = [exp] * 9 if isinstance(exp, int) else list(exp or [])
    k = config.get("kernel_size") or f"{config.get('enc_kernel_size')}/{config.get('dec_kernel_size')}"
    extras = ", deep supervision heads" if config.get("deep_supervision") else ""
    if config.get("down_exp_r") is not None:
        extras += f", MONAI-style down blocks (down_exp_r {list(config['down_exp_r'])})"
    for mid, preset in MODEL_IDS.items():
        pe = preset["exp_r"]
        if (config.get("n_channels") == 32 and exp_list == ([pe] * 9 if isinstance(pe, int) else pe)
                and list(config.get("block_counts", [])) == preset["block_counts"]):
            return f"MedNeXt-{mid} kernel {k}, {config.get('n_classes')} classes{extras}"
    return (f"MedNeXt {config.get('n_channels')} channels, kernel {k}, exp_r {exp}, "
            f"blocks {list(config.get('block_counts', []))}, {config.get('n_classes')} classes{extras}")


ARCHITECTURES = [
    Architecture(
        name="mednext",
        summary="MedNeXt v1 (MICCAI 2023): ConvNeXt U-Net trained with nnU-Net (S/B/M/L, kernel 3 or 5)",
        build=build,
        config_from_state_dict=config_from_state_dict,
        describe_variant=describe_variant,
        prepare_state_dict=prepare_state_dict,
        output_kind="softmax",
        aliases=("mednextv1",),
    )
]
