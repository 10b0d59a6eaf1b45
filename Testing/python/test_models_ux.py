"""3D UX-Net, RepUX-Net and 3D DeformUX-Net: official checkpoints load exactly.

Golden vectors (``Testing/golden/*_small.pt``) were produced by the official code (see
``../shared/golden/REFERENCE.md``); manifests list every key/shape of the published configs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
import torch.nn.functional as F

from volseg import models
from volseg.errors import CheckpointError
from volseg.models import registry
from volseg.models.deform_conv import DeformConv3d, d3d_offset_view, deform_conv3d
from volseg.models.repuxnet import RepUXBlock, RepUXNet
from volseg.models.uxnet import UXNet

UX_MODULES = {name: registry.BUILTIN_MODULES[name] for name in ("uxnet", "repuxnet", "deformuxnet")}

# golden file -> (architecture, config keys the checkpoint shapes must imply)
GOLDEN = {
    "uxnet_small.pt": ("uxnet", {"kernel_size": 7, "grouped_mlp": True}),
    "repuxnet_small.pt": ("repuxnet", {"ks": 13}),
    "deformuxnet_small.pt": ("deformuxnet", {"offset_kernel_size": 1}),
    "deformuxnet_egg_small.pt": ("deformuxnet", {"offset_kernel_size": 3}),
}

# manifest -> (architecture, kwargs added to the manifest's official kwargs, parameter count)
MANIFESTS = {
    "uxnet_default.json": ("uxnet", {}, 53_006_069),
    "repuxnet_default.json": ("repuxnet", {}, 65_828_368),
    "deformuxnet_source_default.json": ("deformuxnet", {"offset_kernel_size": 1}, 52_668_856),
    "deformuxnet_egg_default.json": ("deformuxnet", {"offset_kernel_size": 3}, 55_701_496),
}

TINY = dict(in_chans=1, out_chans=3, depths=[1, 1, 1, 1], feat_size=[48, 8, 8, 8], hidden_size=8)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def golden(golden_dir: Path):
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = torch.load(golden_dir / name, weights_only=True)
        return cache[name]

    return get


@pytest.fixture
def ux_only(monkeypatch):
    """Restrict ``models.match`` to the UX family so these tests do not depend on other modules."""
    monkeypatch.setattr(registry, "BUILTIN_MODULES", dict(UX_MODULES))


# --- golden vectors ---------------------------------------------------------------------------


@pytest.mark.parametrize("filename", sorted(GOLDEN))
def test_load_without_config_reproduces_official_output(golden, filename):
    name, implied = GOLDEN[filename]
    g = golden(filename)
    config = models.implied_config(name, g["state_dict"])
    assert {k: config[k] for k in implied} == implied
    assert config["out_chans"] == g["config"]["out_chans"]
    assert config["depths"] == g["config"]["depths"] and config["feat_size"] == g["config"]["feat_size"]
    model = models.load(name, g["state_dict"])
    assert not model.training
    with torch.no_grad():
        out = model(g["input"])
    assert out.dtype == torch.float32 and out.shape == g["output"].shape
    assert rel_err(out, g["output"]) < 1e-4


@pytest.mark.parametrize("filename", ["deformuxnet_small.pt", "deformuxnet_egg_small.pt"])
def test_deformuxnet_per_sample_outputs(golden, filename):
    """Batch-1 calls reproduce the official per-sample outputs (source variant: batch-dependent)."""
    g = golden(filename)
    model = models.load("deformuxnet", g["state_dict"])
    with torch.no_grad():
        per_sample = torch.cat([model(g["input"][i : i + 1]) for i in range(g["input"].shape[0])])
    assert rel_err(per_sample, g["output_per_sample_batch1"]) < 1e-4
    batch_vs_single = rel_err(g["output"], g["output_per_sample_batch1"])
    if filename == "deformuxnet_small.pt":
        assert batch_vs_single > 1e-3  # the upstream op leaks offsets across the batch; we reproduce that
    else:
        assert batch_vs_single < 1e-5


@pytest.mark.parametrize("filename", sorted(GOLDEN))
def test_create_with_official_config_loads_strictly(golden, filename):
    name, implied = GOLDEN[filename]
    g = golden(filename)
    extra = {"offset_kernel_size": 1} if g.get("variant") == "source" else {}
    model = models.create(name, **g["config"], **extra)
    model.load_state_dict(g["state_dict"], strict=True)
    assert list(model.state_dict()) == list(g["state_dict"])


@pytest.mark.parametrize("filename", sorted(GOLDEN))
def test_match_names_architecture_and_variant(golden, ux_only, filename):
    name, implied = GOLDEN[filename]
    g = golden(filename)
    found = models.match(g["state_dict"])
    assert [m.name for m in found] == [name]
    assert found[0].n_params == g["n_params"]
    variant = found[0].variant
    if name == "deformuxnet":
        assert ("repository-source" in variant) == (implied["offset_kernel_size"] == 1)
    if name == "uxnet":
        assert variant.startswith("published block")


def test_checkpoint_of_another_family_is_a_clear_error(golden):
    with pytest.raises(CheckpointError, match="does not fit repuxnet"):
        models.load("repuxnet", golden("uxnet_small.pt")["state_dict"])


def test_wrong_shape_is_a_clear_error(golden):
    sd = dict(golden("uxnet_small.pt")["state_dict"])
    sd["decoder1.layer.conv2.conv.weight"] = torch.zeros(48, 48, 1, 1, 1)
    with pytest.raises(CheckpointError, match="wrongly shaped"):
        models.load("uxnet", sd)


# --- published configurations (meta device: no memory for weights) ---------------------------


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_published_config_matches_manifest(golden_dir, manifest):
    name, extra, n_params = MANIFESTS[manifest]
    info = json.loads((golden_dir / "manifests" / manifest).read_text())
    with torch.device("meta"):
        model = models.create(name, **info["config"]["kwargs"], **extra)
    expected = [(e["key"], e["shape"], e["dtype"]) for e in info["state_dict"]]
    found = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert found == expected
    assert sum(p.numel() for p in model.parameters()) == n_params == info["n_params"]
    # and the shapes alone imply the same configuration
    meta_sd = model.state_dict()
    implied = models.implied_config(name, meta_sd)
    for key, value in info["config"]["kwargs"].items():
        if key in implied:
            assert implied[key] == value, key
    if name == "deformuxnet":
        assert implied["offset_kernel_size"] == extra["offset_kernel_size"]


# --- variant switches ----------------------------------------------------------------------------


def test_uxnet_early_block_is_inferred_from_shapes(ux_only):
    torch.manual_seed(0)
    early = UXNet(**TINY, kernel_size=13, grouped_mlp=False).eval()
    sd = early.state_dict()
    assert tuple(sd["uxnet_3d.stages.0.0.dwconv.weight"].shape) == (48, 1, 13, 13, 13)
    assert tuple(sd["uxnet_3d.stages.0.0.pwconv1.weight"].shape) == (192, 48, 1, 1, 1)
    loaded = models.load("uxnet", sd)
    block = loaded.uxnet_3d.stages[0][0]
    assert block.dwconv.kernel_size == (13, 13, 13) and block.pwconv1.groups == 1
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), early(x))
    found = models.match(sd)
    assert [m.name for m in found] == ["uxnet"] and found[0].variant.startswith("early block")
    # a published-block model rejects the early weights with a shape report
    with pytest.raises(CheckpointError, match="wrongly shaped"):
        models.load("uxnet", sd, kernel_size=7, grouped_mlp=True)


def test_repuxnet_kernel_size_from_shapes_and_bfm_args_do_not_change_inference(golden):
    g = golden("repuxnet_small.pt")
    assert models.implied_config("repuxnet", g["state_dict"])["ks"] == 13
    with torch.no_grad():
        ref = models.load("repuxnet", g["state_dict"])(g["input"])
        train_style = models.load("repuxnet", g["state_dict"], deploy=False, a=2.0)
        first, second = train_style(g["input"]), train_style(g["input"])
    # no cumulative BFM rescaling: identical calls give identical outputs equal to deploy form
    assert torch.equal(first, second) and torch.equal(first, ref)


def test_uxnet_decoder_follows_feat_size0():
    """The official code hard-codes 48 input channels for ``out``; here it follows feat_size[0]."""
    model = UXNet(in_chans=1, out_chans=2, depths=[1, 1, 1, 1], feat_size=[8, 8, 8, 8], hidden_size=8).eval()
    assert tuple(model.out.conv.conv.weight.shape) == (2, 8, 1, 1, 1)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


# --- deformable convolution ----------------------------------------------------------------------


def grid_sample_reference(x, offset, weight, bias, padding):
    """Independent formulation: one F.grid_sample(align_corners=True) per kernel point."""
    B, C, D, H, W = x.shape
    k = weight.shape[-1]
    out = torch.zeros(B, C, D + 2 * padding - k + 1, H + 2 * padding - k + 1, W + 2 * padding - k + 1)
    Do, Ho, Wo = out.shape[2:]
    for p in range(k ** 3):
        i, j, l = p // (k * k), (p // k) % k, p % k
        pd = torch.arange(Do).view(1, Do, 1, 1) - padding + i + offset[:, 3 * p]
        ph = torch.arange(Ho).view(1, 1, Ho, 1) - padding + j + offset[:, 3 * p + 1]
        pw = torch.arange(Wo).view(1, 1, 1, Wo) - padding + l + offset[:, 3 * p + 2]
        grid = torch.stack((2 * pw / (W - 1) - 1, 2 * ph / (H - 1) - 1, 2 * pd / (D - 1) - 1), dim=-1)
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out += sampled * weight.reshape(C, -1)[:, p].view(1, C, 1, 1, 1)
    return out + bias.view(1, C, 1, 1, 1)


@pytest.mark.parametrize("k,padding,size", [(3, 1, (6, 7, 8)), (5, 2, (5, 6, 4)), (3, 1, (1, 3, 2))])
def test_deform_conv_zero_offset_equals_conv3d(k, padding, size):
    torch.manual_seed(0)
    x = torch.randn(2, 4, *size)
    weight, bias = torch.randn(4, 1, k, k, k), torch.randn(4)
    offset = torch.zeros(2, 3 * k ** 3, *size)
    expected = F.conv3d(x, weight, bias, padding=padding, groups=4)
    assert torch.allclose(deform_conv3d(x, offset, weight, bias, padding), expected, atol=1e-5)


def test_deform_conv_integer_shift_equals_shifted_conv():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 7, 8)
    weight, bias = torch.randn(3, 1, 3, 3, 3), torch.randn(3)
    offset = torch.zeros(2, 81, 6, 7, 8)
    offset[:, 0::3] = 1.0  # every tap one voxel further along depth
    offset[:, 2::3] = -2.0  # and two voxels back along width
    # output(d, h, w) reads x(d+1+i-1, h+j-1, w-2+l-1): a conv of x padded (3, -1) on W and (0, 2) on D
    shifted = F.conv3d(F.pad(x, (3, -1, 1, 1, 0, 2)), weight, bias, groups=3)
    assert torch.allclose(deform_conv3d(x, offset, weight, bias, 1), shifted, atol=1e-5)


def test_deform_conv_fractional_offsets_match_grid_sample():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 6, 7, 8)
    weight, bias = torch.randn(5, 1, 3, 3, 3), torch.randn(5)
    offset = torch.randn(2, 81, 6, 7, 8) * 2.0  # many taps fall outside the volume
    out = deform_conv3d(x, offset, weight, bias, 1)
    assert torch.allclose(out, grid_sample_reference(x, offset, weight, bias, 1), atol=2e-5)


def test_deform_conv_chunked_equals_unchunked():
    torch.manual_seed(2)
    x = torch.randn(1, 4, 7, 5, 6)
    weight, bias = torch.randn(4, 1, 3, 3, 3), torch.randn(4)
    offset = torch.randn(1, 81, 7, 5, 6)
    full = deform_conv3d(x, offset, weight, bias, 1)
    for chunk in (1, 2, 3, 7, 100):
        assert torch.equal(deform_conv3d(x, offset, weight, bias, 1, chunk_size=chunk), full)


def test_deform_conv_automatic_chunks_follow_the_memory_bound(monkeypatch):
    from volseg.models import deform_conv

    torch.manual_seed(2)
    x, offset = torch.randn(1, 4, 7, 5, 6), torch.randn(1, 81, 7, 5, 6)
    weight = torch.randn(4, 1, 3, 3, 3)
    full = deform_conv3d(x, offset, weight, None, 1, chunk_size=7)
    assert deform_conv._auto_chunk(1, 4, 27, 30, 7) == 7
    monkeypatch.setattr(deform_conv, "DEFAULT_CHUNK_ELEMENTS", 27 * 30 * 28 * 2)  # two slices per chunk
    assert deform_conv._auto_chunk(1, 4, 27, 30, 7) == 2
    assert torch.equal(deform_conv3d(x, offset, weight, None, 1), full)


def test_deform_conv_module_runs_without_gradients_and_starts_as_conv():
    torch.manual_seed(3)
    layer = DeformConv3d(6, offset_kernel_size=3, chunk_size=2)
    x = torch.randn(1, 6, 4, 5, 6)
    with torch.inference_mode():
        out = layer(x)
    assert out.shape == x.shape and not out.requires_grad
    # the offset branch is zero-initialised, so a fresh layer is a depthwise conv
    expected = F.conv3d(x, layer.weight.detach(), layer.bias.detach(), padding=1, groups=6)
    assert torch.allclose(out, expected, atol=1e-5)


def test_deform_conv_half_precision_keeps_float32_positions():
    torch.manual_seed(5)
    x, offset = torch.randn(1, 4, 6, 7, 8), torch.randn(1, 81, 6, 7, 8)
    weight, bias = torch.randn(4, 1, 3, 3, 3), torch.randn(4)
    ref = deform_conv3d(x, offset, weight, bias, 1)
    low = deform_conv3d(x.bfloat16(), offset.bfloat16(), weight.bfloat16(), bias.bfloat16(), 1)
    assert low.dtype == torch.bfloat16 and rel_err(low.float(), ref) < 2e-2


def test_deform_conv_gradients_reach_offsets():
    torch.manual_seed(4)
    x = torch.randn(1, 2, 4, 4, 4, requires_grad=True)
    offset = (torch.rand(1, 81, 4, 4, 4) * 0.8 + 0.1).requires_grad_()
    deform_conv3d(x, offset, torch.randn(2, 1, 3, 3, 3), None, 1).sum().backward()
    assert x.grad.abs().sum() > 0 and offset.grad.abs().sum() > 0


def test_source_offset_layout_reads_like_the_cuda_op():
    B, K3 = 2, 81
    big = torch.arange(B * K3 * 5 * 6 * 7, dtype=torch.float32).view(B, K3, 5, 6, 7)
    view = d3d_offset_view(big, (3, 4, 5))
    assert torch.equal(view, big.reshape(-1)[: B * K3 * 60].view(B, K3, 3, 4, 5))
    # sample 1 reads values the offset conv computed for sample 0 (batch leakage upstream)
    assert view[1].min() < big[1].min()
    same = torch.randn(B, K3, 3, 4, 5)
    assert d3d_offset_view(same, (3, 4, 5)) is same
    # batches above the 64-sample im2col step restart the read at each step's own buffer
    many = torch.randn(128, 3, 3, 3, 3)
    stepped = d3d_offset_view(many, (2, 2, 2))
    assert torch.equal(stepped[64], many[64].reshape(-1)[:24].view(3, 2, 2, 2))
    with pytest.raises(ValueError, match="multiple of 64"):
        d3d_offset_view(torch.randn(65, 3, 3, 3, 3), (2, 2, 2))


@pytest.fixture(scope="module")
def previous_deform_conv(repo_root: Path):
    """The engine's previous implementation, kept in bench/bench_deform_conv.py as the reference."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_deform_conv", repo_root / "bench" / "bench_deform_conv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_deform_conv3d


@pytest.mark.parametrize("k,padding,size,scale", [(3, 1, (6, 7, 8), 2.0), (3, 1, (9, 4, 5), 0.7),
                                                  (5, 2, (5, 6, 4), 3.0), (3, 1, (1, 3, 2), 1.5)])
def test_deform_conv_equals_previous_implementation(previous_deform_conv, k, padding, size, scale):
    """Random fractional offsets, many taps far outside the volume (|offset| up to ~4 * scale voxels)."""
    torch.manual_seed(7)
    x = torch.randn(2, 5, *size)
    weight, bias = torch.randn(5, 1, k, k, k), torch.randn(5)
    offset = torch.randn(2, 3 * k ** 3, *size) * scale
    offset[:, 3:6] = torch.tensor([-1.0, size[1] - 0.5, 0.25]).view(1, 3, 1, 1, 1)  # exactly on / near borders
    expected = previous_deform_conv(x, offset, weight, bias, padding)
    for chunk in (None, 1, 2):
        out = deform_conv3d(x, offset, weight, bias, padding, chunk_size=chunk)
        assert out.shape == expected.shape and torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    # the offsets really reach beyond the volume: kernel point 0's positions, every axis
    for axis in range(3):
        grid = torch.arange(size[axis]).view([-1 if a == axis else 1 for a in range(3)]) - padding
        pos = grid + offset[:, axis]
        assert ((pos <= -1) | (pos >= size[axis])).any() and ((pos > -1) & (pos < size[axis])).any()


def test_deform_conv_chunks_are_cache_sized_on_cpu_only():
    from volseg.models import deform_conv

    per_slice = 27 * 48 * 48 * (48 + 24)  # published ROI 96, first stage
    assert deform_conv._auto_chunk(1, 48, 27, 48 * 48, 48) == max(1, deform_conv.CACHE_CHUNK_ELEMENTS // per_slice)
    assert deform_conv._auto_chunk(1, 48, 27, 48 * 48, 48, "cuda") == deform_conv.DEFAULT_CHUNK_ELEMENTS // per_slice
    assert deform_conv.CACHE_CHUNK_ELEMENTS < deform_conv.DEFAULT_CHUNK_ELEMENTS


def test_deform_conv_nan_offsets_give_nan_not_a_crash(previous_deform_conv):
    torch.manual_seed(8)
    x, weight = torch.randn(1, 3, 4, 4, 4), torch.randn(3, 1, 3, 3, 3)
    offset = torch.zeros(1, 81, 4, 4, 4)
    offset[0, 0, 1, 2, 3] = float("nan")
    out = deform_conv3d(x, offset, weight, None, 1)
    ref = previous_deform_conv(x, offset, weight, None, 1)
    assert torch.isnan(out[0, :, 1, 2, 3]).all() and torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.allclose(out.nan_to_num(), ref.nan_to_num(), atol=1e-5)


# --- RepUX-Net centre-only fast path ------------------------------------------------------------


def centre_only(sd: dict) -> dict:
    """A copy of ``sd`` with every off-centre tap of the large depthwise kernels set to zero."""
    out = dict(sd)
    for key, value in sd.items():
        if key.endswith("dwconv.weight"):
            c = value.shape[-1] // 2
            zeroed = torch.zeros_like(value)
            zeroed[:, :, c, c, c] = value[:, :, c, c, c]
            out[key] = zeroed
    return out


def test_repuxnet_centre_only_kernels_take_an_exact_fast_path(golden, monkeypatch):
    g = golden("repuxnet_small.pt")
    sd = centre_only(g["state_dict"])
    model = models.load("repuxnet", sd)
    assert model.centre_only_blocks() == (4, 4)
    blocks = [m for m in model.modules() if isinstance(m, RepUXBlock)]
    with torch.no_grad():
        assert all(b.uses_fast_path(g["input"]) for b in blocks[:1])
        fast = model(g["input"])
        monkeypatch.setattr(RepUXBlock, "uses_fast_path", lambda self, x: False)
        full = model(g["input"])
    assert torch.equal(fast, full)
    assert list(model.state_dict()) == list(g["state_dict"])  # no key added or removed


def test_repuxnet_fast_path_is_never_taken_for_real_kernels(golden, monkeypatch):
    g = golden("repuxnet_small.pt")
    model = models.load("repuxnet", g["state_dict"])
    assert model.centre_only_blocks() == (0, 4)

    def forbidden(self, x):
        raise AssertionError("fast path taken")

    monkeypatch.setattr(RepUXBlock, "centre_scale", forbidden)
    with torch.no_grad():
        assert rel_err(model(g["input"]), g["output"]) < 1e-4
    # one tiny off-centre tap (a subnormal) is enough to keep the full conv
    block = RepUXBlock(4, ks=5).eval()
    with torch.no_grad():
        block.dwconv.weight.zero_()
        block.dwconv.weight[:, :, 2, 2, 2] = 1.5
        assert block.centre_only()
        block.dwconv.weight[3, 0, 0, 4, 1] = 1e-40
    assert not block.centre_only()


def test_repux_block_fast_path_conditions():
    torch.manual_seed(9)
    block = RepUXBlock(3, ks=5).eval()
    with torch.no_grad():
        block.dwconv.weight.zero_()
        block.dwconv.weight[:, 0, 2, 2, 2] = torch.randn(3)
    x = torch.randn(2, 3, 6, 5, 4)
    with torch.no_grad():
        assert block.uses_fast_path(x)
        assert torch.equal(block.centre_scale(x), block.dwconv(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # follows the conv's autocast rounding and dtype
            fast, conv = block.centre_scale(x), block.dwconv(x)
        assert fast.dtype == conv.dtype == torch.bfloat16 and torch.equal(fast, conv)
        # non-finite input: the conv spreads NaN through its zero taps; so does the block
        bad = x.clone()
        bad[0, 1, 3, 2, 1] = float("inf")
        assert not block.uses_fast_path(bad)
        assert torch.isnan(block(bad)[0, 1, 2, 2, 1])
    # recording weight gradients: the full conv (its weight gradient has off-centre terms)
    assert not block.uses_fast_path(x)
    block(x).sum().backward()
    assert block.dwconv.weight.grad[:, :, 0, 0, 0].abs().sum() > 0
    # the check follows later edits of the weights
    with torch.no_grad():
        block.dwconv.weight[0, 0, 1, 2, 2] = 0.5
        assert not block.uses_fast_path(x)
    with torch.device("meta"):
        assert not RepUXNet(**TINY, ks=5).centre_only_blocks()[0]


def test_benchmarks_run_tiny_and_check_their_results(repo_root):
    """bench_deform_conv and bench_repux run against the current engine and report exact results."""
    import importlib.util

    def load(name):
        folder = str(repo_root / "bench")
        sys.path.insert(0, folder)  # the benchmarks import their shared ``common`` helpers
        try:
            spec = importlib.util.spec_from_file_location(name, repo_root / "bench" / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(folder)
        return module

    with torch.no_grad():
        rows = load("bench_deform_conv").stage_rows(8, 4, torch.device("cpu"), repeats=1)
    assert rows[0]["method"] == "F.conv3d (baseline)" and rows[1]["method"] == "previous (reference)"
    assert all(r["diff"] < 1e-5 and r["zero_diff"] < 1e-5 for r in rows)
    tables, all_equal = load("bench_repux").run(16, 5, network=False, device=torch.device("cpu"), repeats=1, warmup=0)
    assert all_equal and len(tables) == 4 and "centre-only, fast path" in tables[0] and "| yes |" in tables[0]


# --- model cards ---------------------------------------------------------------------------------

CARDS = ["uxnet-flare", "uxnet-amos", "uxnet-feta", "repuxnet-amos", "deformuxnet-amos",
         "deformuxnet-kits", "deformuxnet-pancreas", "deformuxnet-hepatic"]


@pytest.fixture(scope="module")
def card_schema(repo_root: Path) -> dict:
    return json.loads((repo_root / "VolSegSlicer" / "volseg" / "schema" / "model_card.schema.json").read_text())


def load_card(repo_root: Path, card_id: str) -> dict:
    return json.loads((repo_root / "Resources" / "ModelCards" / f"{card_id}.json").read_text())


@pytest.mark.parametrize("card_id", CARDS)
def test_card_is_valid_and_consistent(repo_root, card_schema, card_id):
    import monai.transforms

    card = load_card(repo_root, card_id)
    jsonschema.validate(card, card_schema)
    assert card["id"] == card_id
    arch = card["architecture"]
    with torch.device("meta"):
        model = models.create(arch["name"], **arch["config"])
    out_chans = model.out.conv.conv.weight.shape[0]
    labels = card["labels"]
    assert [lab["value"] for lab in labels] == list(range(1, out_chans))
    colors = [tuple(lab["color"]) for lab in labels]
    assert len(set(colors)) == len(colors)
    for lab in labels:
        if "terminology" in lab:
            assert lab["terminology"]["category"][0] == "SCT" and lab["terminology"]["type"][0] == "SCT"
    for step in card["preprocessing"]:
        getattr(monai.transforms, step["name"])(**step.get("args", {}))
    names = [s["name"] for s in card["preprocessing"]]
    assert names[-3:] == ["Orientation", "ScaleIntensityRange", "CropForeground"]
    assert card["inference"]["roi_size"] == [96, 96, 96] and card["output"]["activation"] == "softmax"
    assert card["checkpoint"]["published_at"]


def test_flare_card_uses_challenge_label_order(repo_root):
    card = load_card(repo_root, "uxnet-flare")
    assert [lab["name"].lower() for lab in card["labels"]] == ["liver", "kidney", "spleen", "pancreas"]
    assert [lab["terminology"]["type"][1] for lab in card["labels"]] == ["10200004", "64033007", "78961009",
                                                                         "15776009"]
    assert "dataset_FLARE.json" in card["description"]
    spacing, orientation = card["preprocessing"][0], card["preprocessing"][1]
    assert spacing == {"name": "Spacing", "args": {"pixdim": [1.0, 1.0, 1.2], "mode": "bilinear"}}
    assert orientation == {"name": "Orientation", "args": {"axcodes": "RAS"}}
    assert card["preprocessing"][2]["args"] == {"a_min": -125, "a_max": 275, "b_min": 0.0, "b_max": 1.0,
                                                "clip": True}


@pytest.mark.parametrize("card_id,pixdim,a_range", [
    ("uxnet-amos", [1.5, 1.5, 2.0], (-125, 275)),
    ("repuxnet-amos", [1.5, 1.5, 2.0], (-125, 275)),
    ("deformuxnet-amos", [1.5, 1.5, 2.0], (-125, 275)),
    ("deformuxnet-hepatic", [1.0, 1.0, 1.2], (0, 230)),
    ("deformuxnet-kits", None, (-125, 275)),
    ("deformuxnet-pancreas", None, (-125, 275)),
    ("uxnet-feta", None, (0, 1000)),
])
def test_card_preprocessing_follows_official_training_code(repo_root, card_id, pixdim, a_range):
    steps = {s["name"]: s.get("args", {}) for s in load_card(repo_root, card_id)["preprocessing"]}
    assert steps.get("Spacing", {}).get("pixdim") == pixdim
    scale = steps["ScaleIntensityRange"]
    assert (scale["a_min"], scale["a_max"], scale["b_min"], scale["b_max"], scale["clip"]) == (*a_range, 0.0, 1.0, True)


def test_amos_cards_share_the_15_organ_label_set(repo_root):
    names = [[lab["name"] for lab in load_card(repo_root, c)["labels"]]
             for c in ("uxnet-amos", "repuxnet-amos", "deformuxnet-amos")]
    assert names[0] == names[1] == names[2] and len(names[0]) == 15
    assert names[0][0].lower() == "spleen" and names[0][5].lower() == "liver"


def test_card_config_leaves_block_variants_to_the_checkpoint(repo_root):
    """The pipeline calls ``models.load(arch, sd, **card_config)``: a variant switch in the card would
    override what the checkpoint's shapes say (e.g. the early 13^3 UX-Net block)."""
    for card_id in CARDS:
        config = load_card(repo_root, card_id)["architecture"]["config"]
        assert not {"kernel_size", "grouped_mlp", "offset_kernel_size"} & set(config), card_id


def test_flare_card_preprocessing_runs_on_a_real_ct_and_inverts(repo_root, ct_path):
    import numpy as np

    from volseg.io.readers import read_volume
    from volseg.preprocessing.card_steps import invert, preprocess

    volume = read_volume(ct_path)
    array = volume.array if volume.array.ndim == 4 else volume.array[None]
    pre = preprocess(array, volume.ijk_to_ras, load_card(repo_root, "uxnet-flare")["preprocessing"])
    affine = np.asarray(pre.image.affine)[:3, :3]
    assert np.allclose(np.abs(np.diag(affine)), [1.0, 1.0, 1.2], atol=1e-4)
    assert np.all(np.diag(affine) > 0)  # RAS after Orientation
    assert 0.0 <= float(pre.image.min()) and float(pre.image.max()) <= 1.0
    back = invert(pre.image.as_tensor().clone(), pre)
    assert tuple(back.shape[1:]) == tuple(array.shape[1:])
