"""Each built-in card runs its architecture's official inference recipe.

The settings come from each official test script (REFERENCE.md): 3D UX-Net, RepUX-Net and
DeformUX-Net ``test_seg.py`` run MONAI ``sliding_window_inference(roi 96^3, sw_batch_size 4,
overlap 0.5, mode constant)`` and take the softmax of the blended logits; SegFormer3D runs the
same call with a 128^3 ROI and a sigmoid; MedNeXt is evaluated by nnU-Net v1's ``predict_3D``
(patch 128^3, step 0.5, Gaussian, softmax per window, mirroring over all axes). For every
architecture a tiny golden network is then run through :func:`volseg.inference.sliding_window.predict` with
the card's settings (ROI scaled down to the tiny network) and compared with the official recipe
called directly, on an image large enough for overlapping windows. The MedNeXt/nnU-Net recipe is
checked against the official program's own output in ``test_nnunet_inference.py``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from monai.inferers import sliding_window_inference
from volseg import cards, models
from volseg.inference.sliding_window import predict
from volseg.inference.nnunet import ALL_FLIPS

MONAI_RECIPE = {"mode": "constant", "overlap": 0.5, "sw_batch_size": 4, "flips": set(), "activation_per_window": False}
OFFICIAL = {  # architecture -> (ROI, activation, settings), from each official test script
    "uxnet": ((96, 96, 96), "softmax", MONAI_RECIPE),
    "repuxnet": ((96, 96, 96), "softmax", MONAI_RECIPE),
    "deformuxnet": ((96, 96, 96), "softmax", MONAI_RECIPE),
    "segformer3d": ((128, 128, 128), "sigmoid", MONAI_RECIPE),
    "mednext": ((128, 128, 128), "softmax", {"mode": "nnunet", "overlap": 0.5, "sigma_scale": 0.125,
                                             "flips": set(ALL_FLIPS), "activation_per_window": True}),
}


def _builtin_cards(repo_root: Path) -> list[Path]:
    return [p for p in sorted((repo_root / "Resources" / "ModelCards").glob("*.json"))
            if not json.loads(p.read_text()).get("demonstration")]


def test_every_published_architecture_has_a_card(repo_root):
    found = {cards.load_card(p).architecture for p in _builtin_cards(repo_root)}
    assert found == set(OFFICIAL)


@pytest.mark.parametrize("name", ["uxnet-amos", "uxnet-feta", "uxnet-flare", "repuxnet-amos", "deformuxnet-amos",
                                  "deformuxnet-kits", "deformuxnet-pancreas", "deformuxnet-hepatic",
                                  "segformer3d-brats", "mednext-nnunet-kits19-template"])
def test_card_has_official_settings(repo_root, name):
    card = cards.load_card(repo_root / "Resources" / "ModelCards" / f"{name}.json")
    roi, activation, settings = OFFICIAL[card.architecture]
    inf = card.inference
    assert inf.roi_size == roi and card.activation == activation == inf.activation
    for key, value in settings.items():
        got = getattr(inf, key)
        assert (set(got) if key == "flips" else got) == value, key


def _tiny(golden_dir: Path, name: str) -> torch.nn.Module:
    g = torch.load(golden_dir / f"{name}.pt", weights_only=True)
    return models.load(g["family"], g["state_dict"])


def _official_monai(net, image, roi, settings, activation):
    """What the official test scripts run: MONAI's sliding window, then the activation."""
    with torch.no_grad():
        logits = sliding_window_inference(image[None], roi, settings["sw_batch_size"], net,
                                          overlap=settings["overlap"], mode=settings["mode"])
    return (torch.softmax(logits, 1) if activation == "softmax" else torch.sigmoid(logits))[0]


@pytest.mark.parametrize("arch,golden,card_name,in_channels", [
    ("uxnet", "uxnet_small", "uxnet-flare", 1),
    ("repuxnet", "repuxnet_small", "repuxnet-amos", 1),
    ("deformuxnet", "deformuxnet_egg_small", "deformuxnet-amos", 1),
    ("segformer3d", "segformer3d_small", "segformer3d-brats", 4),
])
def test_volseg_equals_official_recipe(repo_root, golden_dir, arch, golden, card_name, in_channels):
    card = cards.load_card(repo_root / "Resources" / "ModelCards" / f"{card_name}.json")
    net = _tiny(golden_dir, golden)
    roi = (32, 32, 32)  # the tiny golden networks; the card's 96^3 / 128^3 scaled down
    options = replace(card.inference, roi_size=roi, out_channels=None)
    image = torch.randn(in_channels, 48, 40, 56, generator=torch.Generator().manual_seed(3))
    ours = predict(net, image, options, torch.device("cpu"))
    _, activation, settings = OFFICIAL[arch]
    official = _official_monai(net, image, roi, settings, activation)
    rel = float((ours - official).abs().max() / official.abs().max())
    assert ours.shape == official.shape and rel <= 1e-5, rel
