"""SegFormer3D: golden vectors from the official code, shape-implied configs, non-cubic inputs."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_wrong_state_dict_is_a_clear_error(golden_dir: Path) -> None:
    g = _load(golden_dir / "segformer3d_small.pt")
    with pytest.raises(CheckpointError, match="num_classes|output layer"):
        models.load("segformer3d", g["state_dict"], num_classes=4)
    assert models.get("segformer3d").output_kind == "sigmoid"
