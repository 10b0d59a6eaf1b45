"""MONAI's own networks, registered under their MONAI names and argument names.

The constructors are MONAI's (``monai.networks.nets``), so a card's ``config`` is exactly what
one would pass in Python. ``config_from_state_dict`` reads the input and output channel counts
and the few sizes that shapes reveal; other settings come from the card.
"""

from __future__ import annotations

from typing import Any

from monai.networks import nets

from volseg.models.registry import Architecture, StateDict


def _unet_config(sd: StateDict) -> dict[str, Any] | None:
    """MONAI UNet with residual units (``num_res_units >= 1``), strides of 2.

    Encoder level ``d`` lives under ``model`` + ``.1.submodule`` * d + ``.0``; the bottom level
    under ``model`` + ``.1.submodule`` * (n - 1); the last up-sampling layer under ``model.2``.
    """
    first = "model.0.conv.unit0.conv.weight"
    if first not in sd or "model.2.0.conv.weight" not in sd:
        return None
    channels: list[int] = []
    while True:
        depth = len(channels)
        level = "model" + ".1.submodule" * depth + ".0"
        bottom = "model" + ".1.submodule" * depth
        if f"{level}.conv.unit0.conv.weight" in sd and depth > 0 or depth == 0:
            channels.append(int(sd[f"{level}.conv.unit0.conv.weight"].shape[0]))
            continue
        if f"{bottom}.conv.unit0.conv.weight" in sd:
            channels.append(int(sd[f"{bottom}.conv.unit0.conv.weight"].shape[0]))
        break
    units = {k.split(".conv.unit")[1].split(".")[0] for k in sd if k.startswith("model.0.conv.unit")}
    return {
        "spatial_dims": sd[first].ndim - 2,
        "in_channels": int(sd[first].shape[1]),
        "out_channels": int(sd["model.2.0.conv.weight"].shape[1]),  # ConvTranspose: [in, out, ...]
        "channels": channels,
        "strides": [2] * (len(channels) - 1),
        "kernel_size": int(sd[first].shape[-1]),
        "up_kernel_size": int(sd["model.2.0.conv.weight"].shape[-1]),
        "num_res_units": len(units),
    }


def _segresnet_config(sd: StateDict) -> dict[str, Any] | None:
    if "convInit.conv.weight" not in sd or "conv_final.2.conv.weight" not in sd:
        return None
    init = sd["convInit.conv.weight"]
    n_down = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down_layers."))
    blocks_down = []
    for i in range(n_down):
        blocks = {k.split(".")[2] for k in sd if k.startswith(f"down_layers.{i}.") and k.split(".")[2].isdigit()}
        # down layer 0 is [Identity, blocks...]; others [conv stride 2, blocks...]
        blocks_down.append(len(blocks - {"0"}) if i > 0 or f"down_layers.{i}.0.conv.weight" in sd else len(blocks))
    n_up = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("up_layers."))
    blocks_up = [len({k.split(".")[2] for k in sd if k.startswith(f"up_layers.{i}.")}) for i in range(n_up)]
    return {
        "spatial_dims": init.ndim - 2,
        "init_filters": int(init.shape[0]),
        "in_channels": int(init.shape[1]),
        "out_channels": int(sd["conv_final.2.conv.weight"].shape[0]),
        "blocks_down": blocks_down,
        "blocks_up": blocks_up,
    }


ARCHITECTURES = [
    Architecture("swinunetr", "MONAI SwinUNETR (Swin transformer encoder, CNN decoder)", nets.SwinUNETR),
    Architecture("unetr", "MONAI UNETR (ViT encoder, CNN decoder)", nets.UNETR),
    Architecture("segresnet", "MONAI SegResNet (residual encoder-decoder, Auto3DSeg's default)", nets.SegResNet,
                 config_from_state_dict=_segresnet_config,
                 describe_variant=lambda c: f"init_filters {c['init_filters']}, blocks_down {c['blocks_down']}"),
    Architecture("dynunet", "MONAI DynUNet (nnU-Net-style dynamic U-Net)", nets.DynUNet),
    Architecture("unet", "MONAI UNet (residual units)", nets.UNet, config_from_state_dict=_unet_config,
                 describe_variant=lambda c: f"channels {c['channels']}, {c['num_res_units']} residual units"),
]
