"""SegFormer3D: golden vectors from the official code, shape-implied configs, non-cubic inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from volseg import models
from volseg.errors import ArchitectureError, CheckpointError
from volseg.models.segformer3d import SegFormer3D, config_from_state_dict

# golden file -> attention scale of the official code that produced it
SMALL = {"segformer3d_small.pt": "num_heads", "segformer3d_head_small.pt": "head_dim"}
DEFAULT = {"segformer3d_default.pt": "num_heads", "segformer3d_head_default.pt": "head_dim"}


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max())


def _check_golden(path: Path, scale: str) -> None:
    g = _load(path)
    implied = models.load("segformer3d", g["state_dict"], attn_scale=scale)  # config from shapes only
    explicit = models.create("segformer3d", **g["config"], attn_scale=scale)
    explicit.load_state_dict(g["state_dict"], strict=True)
    explicit.eval()
    with torch.no_grad():
        for net in (implied, explicit):
            # 1e-5 (not only the 1e-4 asked for): the small files' two attention scales differ by ~5e-5
            assert _rel_err(net(g["input"]), g["output"]) < 1e-5


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_golden_reproduced(golden_dir: Path, name: str) -> None:
    _check_golden(golden_dir / name, SMALL[name])


@pytest.mark.parametrize("name", sorted(DEFAULT))
def test_default_golden_reproduced(shared_golden_dir: Path, name: str) -> None:
    _check_golden(shared_golden_dir / name, DEFAULT[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_attention_scale_matters_small(golden_dir: Path, name: str) -> None:
    """The other attention scale misses each small golden by far more than our error (< 1e-5)."""
    g = _load(golden_dir / name)
    other = "head_dim" if SMALL[name] == "num_heads" else "num_heads"
    wrong = models.load("segformer3d", g["state_dict"], attn_scale=other)
    with torch.no_grad():
        assert _rel_err(wrong(g["input"]), g["output"]) > 2e-5


def test_attention_scale_matters_default(shared_golden_dir: Path) -> None:
    """On the published config the scales differ grossly (REFERENCE: max abs diff 0.32)."""
    g = _load(shared_golden_dir / "segformer3d_default.pt")
    wrong = models.load("segformer3d", g["state_dict"], attn_scale="head_dim")
    with torch.no_grad():
        assert _rel_err(wrong(g["input"]), g["output"]) > 1e-3
    with pytest.raises(ArchitectureError):
        models.create("segformer3d", attn_scale="sqrt2")


def test_shape_implied_config_equals_official(golden_dir: Path) -> None:
    g = _load(golden_dir / "segformer3d_small.pt")
    assert config_from_state_dict(g["state_dict"]) == g["config"]
    assert config_from_state_dict({"stem.weight": torch.zeros(1)}) is None


def test_num_heads_rule_keeps_published_heads() -> None:
    """Heads are invisible in the weights: published (1,2,5,8) when divisible, else head_dim 32."""
    with torch.device("meta"):
        sd = SegFormer3D(embed_dims=[24, 48, 96, 128], num_heads=[1, 2, 4, 4], decoder_head_embedding_dim=16).state_dict()
    assert config_from_state_dict(sd)["num_heads"] == [1, 1, 3, 4]  # 48 % 2 == 0 but 96 % 5 != 0 -> head_dim 32


def test_noncubic_input(golden_dir: Path) -> None:
    """Any (D, H, W) runs and returns the input size; a cube inside it sees the same token math."""
    g = _load(golden_dir / "segformer3d_small.pt")
    net = models.load("segformer3d", g["state_dict"])
    x = torch.randn(1, 4, 32, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x)
        assert y.shape == (1, 3, 32, 64, 96)
        assert torch.isfinite(y).all()
        odd = net(torch.randn(1, 4, 36, 40, 44))  # not multiples of 32: output still on the input grid
    assert odd.shape == (1, 3, 36, 40, 44)


def test_noncubic_grid_is_carried_not_guessed() -> None:
    """With sr=1 and depth 0 the encoder is conv + norms only: a non-cubic volume equals its parts."""
    torch.manual_seed(0)
    net = SegFormer3D(embed_dims=[8, 8, 8, 8], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], sr_ratios=[1, 1, 1, 1],
                      decoder_head_embedding_dim=8).eval()
    x = torch.randn(1, 4, 32, 32, 64)
    with torch.no_grad():
        whole = net.segformer_encoder(x)
        # the token order is D-major; a wrong (d, h, w) would scramble the stage outputs' shapes
        assert [tuple(t.shape[2:]) for t in whole] == [(8, 8, 16), (4, 4, 8), (2, 2, 4), (1, 1, 2)]
        # a depthwise conv on the wrongly shaped grid would differ: compare the first DWConv by hand
        block = net.segformer_encoder.tf_block1[0]
        tokens, grid = net.segformer_encoder.embed_1(x)
        h = block.mlp.fc1(block.norm2(tokens))
        vol = h.transpose(1, 2).reshape(1, -1, *grid)
        expected = block.mlp.dwconv.bn(block.mlp.dwconv.dwconv(vol)).flatten(2).transpose(1, 2)
        assert torch.allclose(block.mlp.dwconv(h, grid), expected)


def test_noncubic_axis_permutation_equivariance(golden_dir: Path) -> None:
    """Permuting the input's axes and every conv kernel's axes permutes the output: with a wrong
    (d, h, w) bookkeeping on a non-cubic input this fails (attention is order-free, the rest local)."""
    g = _load(golden_dir / "segformer3d_small.pt")
    perm = (2, 0, 1)
    dims = (0, 1, *(2 + p for p in perm))
    permuted = {k: (v.permute(dims).contiguous() if v.ndim == 5 else v) for k, v in g["state_dict"].items()}
    net, net_p = models.load("segformer3d", g["state_dict"]), models.load("segformer3d", permuted)
    x = torch.randn(1, 4, 32, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y, y_p = net(x), net_p(x.permute(dims))
    assert y_p.shape == (1, 3, 96, 32, 64)
    assert _rel_err(y_p, y.permute(dims)) < 1e-4


def test_manifest_keys_shapes_and_count(golden_dir: Path) -> None:
    man = json.loads((golden_dir / "manifests" / "segformer3d_default.json").read_text())
    with torch.device("meta"):
        net = models.create("segformer3d", **man["config"]["kwargs"])
    mine = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in net.state_dict().items()}
    assert mine == {e["key"]: (e["shape"], e["dtype"]) for e in man["state_dict"]}
    assert sum(p.numel() for p in net.parameters()) == man["n_params"] == 4_525_251
    defaults = models.create("segformer3d")  # constructor defaults are the released config
    assert sum(p.numel() for p in defaults.parameters()) == 4_525_251


def test_match_names_segformer3d(golden_dir: Path) -> None:
    g = _load(golden_dir / "segformer3d_small.pt")
    found = models.match(g["state_dict"])
    assert [m.name for m in found] == ["segformer3d"]
    assert found[0].n_params == g["n_params"]
    assert "[8, 16, 40, 64]" in found[0].variant


def test_inspect_says_what_the_weights_cannot_show(golden_dir: Path) -> None:
    """No guessed heads or activation presented as facts: they are listed as not in the weights."""
    from volseg.checkpoints.reading import describe, unwrap

    g = _load(golden_dir / "segformer3d_small.pt")
    (found,) = describe(unwrap(g["state_dict"]))["matches"]
    assert "(assumed)" not in found["variant"] and "sigmoid" not in found["variant"]
    assert "3 output channels" in found["variant"]
    assert "num_heads" not in found["config"] and found["config"]["embed_dims"] == [8, 16, 40, 64]
    hidden = found["not_in_weights"]
    assert {"num_heads", "attn_scale", "patch_stride", "activation"} <= set(hidden)
    assert "does not guess" in hidden["num_heads"] and "softmax or sigmoid" in hidden["activation"]


def test_wrong_state_dict_is_a_clear_error(golden_dir: Path) -> None:
    g = _load(golden_dir / "segformer3d_small.pt")
    with pytest.raises(CheckpointError, match="num_classes|output layer"):
        models.load("segformer3d", g["state_dict"], num_classes=4)
    assert models.get("segformer3d").output_kind == "sigmoid"


# --------------------------------------------------------------------------- model card

CARD = "segformer3d-brats.json"


def _card_raw(repo_root: Path) -> dict:
    return json.loads((repo_root / "Resources" / "ModelCards" / CARD).read_text())


def test_card_is_valid_and_paints_msd_labels(repo_root: Path) -> None:
    from volseg import cards
    from volseg.postprocessing.labels import to_labelmap

    card = cards.load_card(repo_root / "Resources" / "ModelCards" / CARD)
    assert card.architecture == "segformer3d" and card.activation == "sigmoid" and card.threshold == 0.5
    assert [i.name for i in card.inputs] == ["FLAIR", "T1w", "T1gd", "T2w"]
    assert [(lab.value, lab.channel) for lab in card.labels] == [(1, 1), (2, 0), (3, 2)]  # WT, TC, ET painted in order
    # channels [TC, WT, ET]: edema only (WT), core without enhancement (TC, WT), enhancing (all three)
    probs = torch.tensor([[0.1, 0.9, 0.9, 0.2], [0.2, 0.9, 0.95, 0.9], [0.0, 0.1, 0.8, 0.3]]).reshape(3, 4, 1, 1)
    labelmap = to_labelmap(probs, card.labels, card.activation, card.threshold)
    assert labelmap.reshape(-1).tolist() == [0, 2, 3, 1]
    net = models.create(card.architecture, **card.config)
    assert net.attn_scale == "num_heads" and sum(p.numel() for p in net.parameters()) == 4_525_251
    assert card.inference.roi_size == (128, 128, 128) and card.inference.sw_batch_size == 4


@pytest.mark.parametrize("name,expected", [
    ("BraTS2021_00000_flair.nii.gz", "FLAIR"), ("BRATS_001_0000.nii.gz", "FLAIR"), ("BraTS-GLI-00000-000-t2f.nii.gz", "FLAIR"),
    ("BraTS2021_00000_t1.nii.gz", "T1w"), ("BRATS_001_0001.nii.gz", "T1w"), ("BraTS-GLI-00000-000-t1n.nii.gz", "T1w"),
    ("BraTS2021_00000_t1ce.nii.gz", "T1gd"), ("BRATS_001_0002.nii.gz", "T1gd"), ("BraTS-GLI-00000-000-t1c.nii.gz", "T1gd"),
    ("BraTS2021_00000_t2.nii.gz", "T2w"), ("BRATS_001_0003.nii.gz", "T2w"), ("BraTS-GLI-00000-000-t2w.nii.gz", "T2w"),
])
def test_card_name_hints_pick_one_input(repo_root: Path, name: str, expected: str) -> None:
    import re

    hits = [i["name"] for i in _card_raw(repo_root)["inputs"] if re.search(i["name_hint"], name, re.IGNORECASE)]
    assert hits == [expected]


def test_card_preprocessing_reproduces_official_pipeline(repo_root: Path) -> None:
    """Card steps on a 240x240x155 BraTS-shaped volume == the official script's arrays, and invert back."""
    from volseg.preprocessing import card_steps as preprocess

    rng = np.random.default_rng(0)
    raw = (rng.random((1, 240, 240, 155)) * 1000).astype(np.float32)
    raw[:, :, :, :5] = 0.0  # empty slices
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    # official: MinMaxScaler on x.reshape(-1, x.shape[-1]) per modality (float64), Orientation RAS
    # (flips the two L/P axes here), crop [56:184, 56:184, 13:141], swapaxes(1, 3)
    cols = raw.astype(np.float64).reshape(1, -1, 155)
    lo, hi = cols.min(axis=1, keepdims=True), cols.max(axis=1, keepdims=True)
    span = np.where(hi - lo == 0, 1.0, hi - lo)
    official = ((cols - lo) / span).reshape(raw.shape)
    official = np.flip(official, axis=(1, 2))[:, 56:184, 56:184, 13:141].swapaxes(1, 3)
    pre = preprocess.preprocess(raw, lps, _card_raw(repo_root)["preprocessing"])
    assert tuple(pre.image.shape) == (1, 128, 128, 128)
    np.testing.assert_allclose(pre.image.numpy(), official, atol=1e-6)
    back = preprocess.invert(pre.image[:1].as_tensor() + 1.0, pre)
    assert tuple(back.shape) == (1, 240, 240, 155)
    assert float(back[0, :56].abs().max()) == 0.0  # outside the crop: nothing
