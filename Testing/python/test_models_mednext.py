"""MedNeXt v1: golden vectors, published variants (manifests), deep supervision, MONAI state dicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from volseg import models
from volseg.errors import ArchitectureError, CheckpointError
from volseg.models.mednext import config_from_state_dict, prepare_state_dict

VARIANTS = [(mid, k) for mid in "SBML" for k in (3, 5)]
# REFERENCE.md section 5 (14 classes, deep supervision)
N_PARAMS = {("S", 3): 5_564_807, ("S", 5): 5_994_439, ("B", 3): 10_540_199, ("B", 5): 10_969_831,
            ("M", 3): 17_562_855, ("M", 5): 18_274_727, ("L", 3): 61_793_159, ("L", 5): 63_006_791}


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max())


def _outputs(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        y = net(x)
    return list(y) if isinstance(y, (list, tuple)) else [y]


@pytest.mark.parametrize("name", ["mednext_small.pt", "mednext_small_k5.pt"])
def test_golden_reproduced(golden_dir: Path, name: str) -> None:
    g = _load(golden_dir / name)
    refs = g["output"] if isinstance(g["output"], list) else [g["output"]]
    implied = models.load("mednext", g["state_dict"])  # config from the state dict alone
    explicit = models.create("mednext", **g["config"])
    explicit.load_state_dict(g["state_dict"], strict=True)
    explicit.eval()
    for net in (implied, explicit):
        net.do_ds = len(refs) > 1
        ys = _outputs(net, g["input"])
        assert [y.shape for y in ys] == [r.shape for r in refs]
        for y, ref in zip(ys, refs):
            assert _rel_err(y, ref) < 1e-4


def test_deep_supervision_only_on_request(golden_dir: Path) -> None:
    g = _load(golden_dir / "mednext_small.pt")
    net = models.load("mednext", g["state_dict"])
    assert net.deep_supervision and not net.do_ds
    (y,) = _outputs(net, g["input"])  # inference default: the full-resolution output only
    assert _rel_err(y, g["output"][0]) < 1e-4
    net.do_ds = True
    assert [tuple(t.shape[2:]) for t in _outputs(net, g["input"])] == [(32,) * 3, (16,) * 3, (8,) * 3, (4,) * 3, (2,) * 3]


def test_shape_implied_config_equals_official(golden_dir: Path) -> None:
    for name in ("mednext_small.pt", "mednext_small_k5.pt"):
        g = _load(golden_dir / name)
        assert config_from_state_dict(g["state_dict"]) == g["config"]
    assert config_from_state_dict({"segformer_decoder.linear_pred.weight": torch.zeros(3, 8, 1, 1, 1)}) is None


@pytest.mark.parametrize("mid,k", VARIANTS)
def test_published_variant_matches_manifest(golden_dir: Path, mid: str, k: int) -> None:
    man = json.loads((golden_dir / "manifests" / f"mednext_{mid}_k{k}_default.json").read_text())
    kwargs = man["config"]["kwargs"]  # the official factory's names: num_input_channels, model_id, ...
    with torch.device("meta"):
        net = models.create("mednext", **kwargs)
    mine = {key: (list(v.shape), str(v.dtype).removeprefix("torch.")) for key, v in net.state_dict().items()}
    assert mine == {e["key"]: (e["shape"], e["dtype"]) for e in man["state_dict"]}
    assert sum(p.numel() for p in net.parameters()) == man["n_params"] == N_PARAMS[(mid, k)]
    # the variant is recognised back from the weights' shapes alone
    implied = config_from_state_dict(net.state_dict())
    assert models.get("mednext").describe_variant(implied).startswith(f"MedNeXt-{mid} kernel {k}")


def test_checkpoint_style_is_accepted_and_ignored() -> None:
    torch.manual_seed(0)
    kw = {"in_channels": 1, "n_channels": 4, "n_classes": 2, "exp_r": 2, "kernel_size": 3, "block_counts": [1] * 9,
          "do_res": True, "do_res_up_down": True}
    plain = models.create("mednext", **kw).eval()
    ckpt = models.create("mednext", **kw, checkpoint_style="outside_block").eval()
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    assert torch.equal(_outputs(plain, x)[0], _outputs(ckpt, x)[0])
    with pytest.raises(ArchitectureError):
        models.create("mednext", **kw | {"checkpoint_style": "inside_block"})


def test_factory_names_and_errors() -> None:
    with torch.device("meta"):
        net = models.create("mednext", model_id="B", num_input_channels=1, num_classes=14, kernel_size=3,
                            deep_supervision=True)
    assert sum(p.numel() for p in net.parameters()) == N_PARAMS[("B", 3)]
    with pytest.raises(ArchitectureError, match="model_id"):
        models.create("mednext", model_id="XL", num_input_channels=1, num_classes=2)
    with pytest.raises(ArchitectureError):
        models.create("mednext", in_channels=1, n_channels=4, n_classes=2, norm_type="layer")


def test_separate_encoder_decoder_kernels_round_trip() -> None:
    net = models.create("mednext", in_channels=2, n_channels=4, n_classes=3, kernel_size=None,
                        enc_kernel_size=3, dec_kernel_size=5, block_counts=[1] * 9, do_res=True)
    assert net.enc_block_0[0].conv1.weight.shape[-1] == 3 and net.dec_block_0[0].conv1.weight.shape[-1] == 5
    again = models.load("mednext", net.state_dict())
    assert again.bottleneck[0].conv1.weight.shape[-1] == 5


def _perturbed(net: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def test_monai_state_dict_loads_and_matches() -> None:
    """MONAI's create_mednext('S') weights, renamed, give MONAI's outputs (all 5 with deep supervision)."""
    from monai.networks.nets.mednext import create_mednext

    torch.manual_seed(0)
    monai_net = _perturbed(create_mednext("S", spatial_dims=3, in_channels=1, out_channels=3, kernel_size=3,
                                          deep_supervision=True))
    monai_net.train()  # MONAI returns the deep-supervision outputs only in training mode; GroupNorm is mode-free
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    refs = _outputs(monai_net, x)
    assert len(refs) == 5
    sd = monai_net.state_dict()
    assert "enc_stages.0.0.conv1.weight" in sd
    before = dict(sd)
    net = models.load("mednext", sd)
    assert sd.keys() == before.keys()  # the caller's state dict is not modified
    net.do_ds = True
    for y, ref in zip(_outputs(net, x), refs, strict=True):
        assert _rel_err(y, ref) < 1e-5
    assert "MedNeXt-S kernel 3" in models.get("mednext").describe_variant(models.implied_config("mednext", sd))


def test_monai_grn_state_dict_matches() -> None:
    """MONAI's GRN variant has no GRN in its down blocks; zero GRN parameters reproduce it exactly."""
    from monai.networks.nets import MedNeXt as MonaiMedNeXt

    torch.manual_seed(0)
    monai_net = _perturbed(MonaiMedNeXt(init_filters=4, in_channels=1, out_channels=2, encoder_expansion_ratio=2,
                                        decoder_expansion_ratio=2, bottleneck_expansion_ratio=2, kernel_size=3,
                                        use_residual_connection=True, blocks_down=(1, 1, 1, 1), blocks_bottleneck=1,
                                        blocks_up=(1, 1, 1, 1), global_resp_norm=True)).eval()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    net = models.load("mednext", monai_net.state_dict())
    assert net.up_0.grn and not net.down_0.grn and net.down_1.grn
    assert _rel_err(_outputs(net, x)[0], _outputs(monai_net, x)[0]) < 1e-5


def test_monai_b_style_weights_load_with_their_down_ratios() -> None:
    """MONAI's down blocks use stage i's expansion ratio (official: stage i+1's). The shapes show it,
    the implied config carries ``down_exp_r``, and the outputs equal MONAI's."""
    from monai.networks.nets import MedNeXt as MonaiMedNeXt
    from monai.networks.nets.mednext import create_mednext

    with torch.device("meta"):
        real_b = create_mednext("B", spatial_dims=3, in_channels=1, out_channels=3, kernel_size=3).state_dict()
    found = models.match(real_b)
    assert [m.name for m in found] == ["mednext"]
    assert found[0].config["down_exp_r"] == [2, 3, 4, 4]
    assert "MedNeXt-B kernel 3" in found[0].variant and "MONAI-style" in found[0].variant
    with pytest.raises(CheckpointError, match="wrongly shaped. It fits mednext") as err:  # the official rule does not
        models.load("mednext", real_b, down_exp_r=None)
    assert "other settings (down_exp_r)" in err.value.hint and '"down_exp_r": [2, 3, 4, 4]' in err.value.hint

    torch.manual_seed(0)  # a small MONAI net with B's ratios, run for real
    monai_net = _perturbed(MonaiMedNeXt(init_filters=4, in_channels=1, out_channels=2,
                                        encoder_expansion_ratio=(2, 3, 4, 4), decoder_expansion_ratio=(4, 4, 3, 2),
                                        bottleneck_expansion_ratio=4, kernel_size=3, use_residual_connection=True,
                                        blocks_down=(1, 1, 1, 1), blocks_bottleneck=1, blocks_up=(1, 1, 1, 1))).eval()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    net = models.load("mednext", monai_net.state_dict())
    assert _rel_err(_outputs(net, x)[0], _outputs(monai_net, x)[0]) < 1e-5


def test_match_names_mednext(golden_dir: Path) -> None:
    for name in ("mednext_small.pt", "mednext_small_k5.pt"):
        g = _load(golden_dir / name)
        found = models.match(g["state_dict"])
        assert [m.name for m in found] == ["mednext"]
        assert found[0].n_params == g["n_params"]


def test_noncubic_input(golden_dir: Path) -> None:
    g = _load(golden_dir / "mednext_small_k5.pt")
    net = models.load("mednext", g["state_dict"])
    (y,) = _outputs(net, torch.randn(1, 1, 32, 48, 64))
    assert y.shape == (1, 3, 32, 48, 64)


def test_template_card_builds_published_variant(repo_root: Path) -> None:
    from volseg import cards
    from volseg.preprocessing import card_steps as preprocess

    card = cards.load_card(repo_root / "Resources" / "ModelCards" / "mednext-nnunet-kits19-template.json")
    assert card.architecture == "mednext" and card.activation == "softmax" and card.out_channels == 3
    with torch.device("meta"):
        net = models.create(card.architecture, **card.config)
    assert net.deep_supervision and not net.do_ds
    assert models.get("mednext").describe_variant(config_from_state_dict(net.state_dict())).startswith(
        "MedNeXt-B kernel 3, 3 classes")
    inf = card.inference
    assert (inf.mode, inf.sigma_scale, inf.overlap, inf.activation_per_window) == ("nnunet", 0.125, 0.5, True)
    assert len(inf.flips) == 7 and inf.roi_size == (128, 128, 128)
    # nnU-Net recipe on a small anisotropic CT-like volume: 1 mm spline, clip + z-score, (z, y, x) order
    arr = np.random.default_rng(0).normal(0, 200, size=(1, 20, 18, 6)).astype(np.float32)
    pre = preprocess.preprocess(arr, np.diag([1.5, 1.5, 3.0, 1.0]), card.preprocessing)
    resampled_only = preprocess.preprocess(arr, np.diag([1.5, 1.5, 3.0, 1.0]), card.preprocessing[:1]).image
    assert tuple(pre.image.shape[1:]) == tuple(resampled_only.shape[1:])[::-1]  # (z, y, x) order at 1 mm
    assert pre.image.shape[1] == 16  # z: 6 slices of 3 mm
    assert float(pre.image.min()) >= (-79 - 101) / 76.9 - 1e-4 and float(pre.image.max()) <= (304 - 101) / 76.9 + 1e-4
    assert tuple(preprocess.invert(pre.image.as_tensor(), pre).shape) == (1, 20, 18, 6)


def test_nnunet_model_checkpoint_and_missing_dummy_tensor(golden_dir: Path, tmp_path: Path) -> None:
    """An nnU-Net v1 ``.model`` file (weights under 'state_dict'), also without ``dummy_tensor``."""
    from volseg.checkpoints.reading import read_checkpoint

    g = _load(golden_dir / "mednext_small_k5.pt")
    path = tmp_path / "model_final_checkpoint.model"
    torch.save({"epoch": 1000, "state_dict": g["state_dict"], "optimizer_state_dict": {},
                "lr_scheduler_state_dict": None, "plot_stuff": ([1.0], [0.9], [0.5], [0.6]),
                "best_stuff": (0, 1.0, 0.0, 0.0)}, path)
    sd = read_checkpoint(path).state_dict
    assert "dummy_tensor" in sd
    without = {k: v for k, v in sd.items() if k != "dummy_tensor"}
    for weights in (sd, without):
        net = models.load("mednext", weights)
        assert _rel_err(_outputs(net, g["input"])[0], g["output"]) < 1e-4
    assert "dummy_tensor" not in without  # the caller's dict is left alone
    assert list(prepare_state_dict({"foo": torch.zeros(1)})) == ["foo"]  # not MedNeXt: untouched
