"""The way back in torch (volseg.postprocessing.export_prediction, volseg.preprocessing.resampling)
against today's exact path (MONAI's float64 SpatialResample, volseg.postprocessing.to_input_grid).

Fidelity: label maps identical on >= 99.99 % of voxels, every differing voxel a near-tie (its
two most probable classes within 1e-3 on the exact path's probabilities); resampled values
within 1e-4 (linear) / 1e-3 (spline) of MONAI's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing

from volseg.cards import Label, load_card
from volseg.postprocessing.export_prediction import (
    UnsupportedResampling,
    export_labelmap,
    labelmap_on_input_grid,
    plan_sizes,
)
from volseg.postprocessing.labels import to_labelmap
from volseg.postprocessing.to_input_grid import invert_to_labelmap
from volseg.preprocessing.card_steps import invert, preprocess
from volseg.preprocessing.resampling import GridResampler, axis_aligned

CARDS = ["uxnet-amos", "uxnet-flare", "deformuxnet-kits", "demo", "mednext-nnunet-kits19-template",
         "segformer3d-brats", "uxnet-feta"]


def _affine(kind: str) -> np.ndarray:
    if kind == "axis":
        return np.diag([0.7, 0.75, 1.25, 1.0])
    if kind == "flipped":  # LPS-stored, as DICOM: flips on the way to RAS
        a = np.diag([-0.7, -0.75, 1.25, 1.0])
        a[:3, 3] = [40.0, 30.0, -20.0]
        return a
    if kind == "anisotropic":
        return np.diag([0.6, 0.9, 3.0, 1.0])
    # oblique: rotated 20 degrees about z and 10 about x
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    rx = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    a = np.eye(4)
    a[:3, :3] = rz @ rx @ np.diag([0.7, 0.75, 1.25])
    a[:3, 3] = [5.0, -3.0, 2.0]
    return a


def _ct(shape, seed: int = 0) -> np.ndarray:
    """A CT-like (1, I, J, K) volume: air, a body ellipse of soft tissue with brighter blobs."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (i / 0.85) ** 2 + (j / 0.7) ** 2 < 1
    vol = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, shape)
    vol += 200.0 * np.exp(-((i - 0.2) ** 2 + (j + 0.1) ** 2 + k ** 2) / 0.05)
    return vol[None].astype(np.float32)


def _probs(shape, channels: int, activation: str, seed: int = 1) -> torch.Tensor:
    """Smooth random class probabilities on the network grid (what a network's blended output looks like)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((1, channels, *[max(2, s // 4) for s in shape]), generator=g) * 4
    logits = torch.nn.functional.interpolate(logits, size=tuple(shape), mode="trilinear", align_corners=False)[0]
    return torch.softmax(logits, 0) if activation == "softmax" else torch.sigmoid(logits)


def _compare(fast: np.ndarray, exact: np.ndarray, probs_exact: torch.Tensor | None) -> None:
    """>= 99.99 % identical, every difference a near-tie. Voxels where every class is below 1e-6 on
    the exact path (outside a foreground crop, the zero padding that MONAI's float64 weights smear
    by ~1e-17) are ties between all classes: the exact path's label there is round-off noise, the
    fast path's must be the background (0); they are not counted among the differences."""
    diff = fast != exact
    if probs_exact is not None:
        empty = (probs_exact.amax(dim=0) < 1e-6).numpy()
        assert not np.any(fast[empty & diff]), "a voxel without probability got a label"
        diff &= ~empty
        if diff.any():
            top2 = torch.topk(probs_exact[:, torch.as_tensor(diff)], 2, dim=0).values
            assert float((top2[0] - top2[1]).max()) <= 1e-3, "a differing voxel is not a near-tie"
    assert diff.mean() <= 1e-4, f"{diff.sum()} of {diff.size} voxels differ"


@pytest.mark.parametrize("card_id", CARDS)
@pytest.mark.parametrize("kind", ["axis", "flipped", "anisotropic", "oblique"])
def test_every_card_matches_the_exact_path(card_id, kind):
    card = load_card(card_id)
    shape = (40, 36, 22) if card_id != "segformer3d-brats" else (30, 28, 26)
    array = np.repeat(_ct(shape), len(card.inputs), axis=0)
    steps = card.preprocessing
    if card_id == "segformer3d-brats":  # its 128^3 centre crop: scaled down to the test volume
        steps = [dict(s, args={"roi_size": [20, 24, 18]}) if s["name"] == "CenterSpatialCrop" else s for s in steps]
    pre = preprocess(array, _affine(kind), steps)
    probs = _probs(pre.image.shape[1:], card.out_channels, card.activation)
    exact = invert_to_labelmap(probs, pre, card.labels, card.activation, card.threshold)
    fast = export_labelmap(probs, pre, card.labels, card.activation, card.threshold)
    assert fast.dtype == np.uint16 and fast.shape == exact.shape == shape
    assert len(np.unique(exact)) > 2  # the comparison means something: several labels present
    _compare(fast, exact, invert(probs, pre) if card.activation == "softmax" else None)
    if card.activation != "softmax":
        assert np.array_equal(fast, exact)


@pytest.mark.parametrize("budget", [40_000, 400_000, 2**30])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_groups_and_slabs_do_not_change_the_result(budget, activation):
    """Small budgets force one class per group and thin slabs; the label map stays the same."""
    labels = [Label(value=10 * c, name=f"c{c}", color=(0, 0, 0), channel=c) for c in range(1, 9)]
    steps = [{"name": "Spacing", "args": {"pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"}},
             {"name": "Orientation", "args": {"axcodes": "RAS"}},
             {"name": "CropForeground", "args": {"margin": 1}}]
    pre = preprocess(_ct((36, 30, 20)), _affine("flipped"), steps)
    channels = 9 if activation == "softmax" else 8
    if activation == "sigmoid":
        labels = [Label(value=10 * (c + 1), name=f"c{c}", color=(0, 0, 0), channel=c) for c in range(8)]
    probs = _probs(pre.image.shape[1:], channels, activation)
    plan = plan_sizes(channels, int(np.prod(pre.image.shape[1:])), pre.input_shape, budget)
    if budget == 40_000:
        assert plan.group == 1 and plan.slab_rows < pre.input_shape[0]
    reference = export_labelmap(probs, pre, labels, activation, budget=2**30)
    got = export_labelmap(probs, pre, labels, activation, budget=budget)
    assert np.array_equal(got, reference)
    exact = invert_to_labelmap(probs, pre, labels, activation)
    _compare(got, exact, invert(probs, pre) if activation == "softmax" else None)


def test_label_values_above_255_and_ties():
    labels = [Label(value=300, name="a", color=(0, 0, 0), channel=1), Label(value=7, name="b", color=(0, 0, 0), channel=2)]
    pre = preprocess(_ct((20, 18, 12)), _affine("axis"),
                     [{"name": "Spacing", "args": {"pixdim": [1.4, 1.5, 2.5], "mode": "bilinear"}}])
    probs = torch.full((3, *pre.image.shape[1:]), 1 / 3)  # every voxel a tie: the first channel wins
    probs[1, :2] += 0.1
    for budget in (10_000, 2**30):
        got = export_labelmap(probs, pre, labels, "softmax", budget=budget)
        exact = invert_to_labelmap(probs, pre, labels, "softmax")
        assert np.array_equal(got, exact)
        assert set(np.unique(got)) == {0, 300}


@pytest.mark.parametrize("mode, tol", [("bilinear", 1e-4), (3, 1e-3)])
@pytest.mark.parametrize("kind", ["axis", "flipped", "anisotropic", "oblique"])
def test_resampler_matches_monai_both_ways(mode, tol, kind):
    """Values (not just labels): forward Spacing and its inverse, against MONAI's float64 resampling."""
    x = MetaTensor(torch.as_tensor(_ct((30, 26, 18)) / 1000.0), affine=torch.as_tensor(_affine(kind)))
    spacing = Spacing(pixdim=[1.5, 1.5, 2.0], mode=mode)
    ref = spacing(x)
    pending = Spacing(pixdim=[1.5, 1.5, 2.0], mode=mode, lazy=True)(x).pending_operations[-1]
    forward = GridResampler(pending["lazy_affine"].numpy(), x.shape[1:], pending["lazy_shape"], mode, "border",
                            torch.device("cpu"))
    assert forward.separable  # Spacing keeps the direction: axis-aligned even for an oblique volume
    got = forward(x.as_tensor(), slab_rows=4)
    scale = float(ref.abs().max())
    assert float((got - ref.as_tensor()).abs().max()) <= tol * scale
    back = spacing.inverse(ref.clone())
    mapping = np.linalg.solve(ref.affine.numpy(), _affine(kind))
    inverse = GridResampler(mapping, ref.shape[1:], x.shape[1:], mode, "border", torch.device("cpu"))
    assert float((inverse(ref.as_tensor(), slab_rows=5) - back.as_tensor()).abs().max()) <= tol * scale


def test_oblique_mapping_uses_grid_sample_like_monai():
    from monai.transforms import SpatialResample

    x = MetaTensor(torch.as_tensor(_ct((24, 22, 16)) / 1000.0), affine=torch.eye(4, dtype=torch.float64))
    dst = torch.as_tensor(_affine("oblique"))
    ref = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float64)(
        x, dst_affine=dst, spatial_size=(20, 18, 14))
    mapping = np.linalg.solve(np.eye(4), dst.numpy())
    r = GridResampler(mapping, x.shape[1:], (20, 18, 14), "bilinear", "border", torch.device("cpu"))
    assert not r.separable and axis_aligned(mapping) is None
    assert float((r(x.as_tensor(), slab_rows=3) - ref.as_tensor()).abs().max()) <= 1e-4 * float(x.abs().max())
    with pytest.raises(UnsupportedResampling):
        GridResampler(mapping, x.shape[1:], (20, 18, 14), 3, "border", torch.device("cpu"))


def test_unsupported_resampling_takes_the_exact_path():
    steps = [{"name": "Spacing", "args": {"pixdim": [1.5, 1.5, 2.0], "mode": "nearest"}}]
    pre = preprocess(_ct((20, 18, 12)), _affine("axis"), steps)
    labels = [Label(value=1, name="a", color=(0, 0, 0), channel=1)]
    probs = _probs(pre.image.shape[1:], 2, "softmax")
    with pytest.raises(UnsupportedResampling):
        export_labelmap(probs, pre, labels, "softmax")
    warned = []
    got, where = labelmap_on_input_grid(probs, pre, labels, "softmax", warn=warned.append)
    assert "exact path" in where
    assert np.array_equal(got, invert_to_labelmap(probs, pre, labels, "softmax"))


def test_out_of_memory_steps_down_then_cpu(monkeypatch):
    """On a GPU: OOM -> smaller groups, then the CPU; each step a warning, never a wrong label map."""
    import volseg.postprocessing.export_prediction as ep

    pre = preprocess(_ct((20, 18, 12)), _affine("axis"),
                     [{"name": "Spacing", "args": {"pixdim": [1.4, 1.5, 2.5], "mode": "bilinear"}}])
    labels = [Label(value=1, name="a", color=(0, 0, 0), channel=1), Label(value=2, name="b", color=(0, 0, 0), channel=2)]
    probs = _probs(pre.image.shape[1:], 3, "softmax")
    real = ep.export_labelmap
    calls = []

    def flaky(*args, device=None, **kwargs):
        calls.append(device.type)
        if device.type != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*args, device=device, **kwargs)

    monkeypatch.setattr(ep, "export_labelmap", flaky)
    monkeypatch.setattr(ep, "_budget", lambda device: 2**30)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    warned = []
    got, where = ep.labelmap_on_input_grid(probs, pre, labels, "softmax", device=torch.device("meta"),
                                           warn=warned.append)
    assert calls == ["meta", "meta", "meta", "cpu"]
    assert len(warned) == 3 and "on the CPU" in where
    assert np.array_equal(got, to_labelmap(invert(probs, pre), labels, "softmax"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("card_id", ["uxnet-amos", "mednext-nnunet-kits19-template", "demo"])
def test_cuda_way_back_matches_the_exact_path(card_id):
    card = load_card(card_id)
    pre = preprocess(np.repeat(_ct((48, 44, 26)), len(card.inputs), 0), _affine("flipped"), card.preprocessing)
    probs = _probs(pre.image.shape[1:], card.out_channels, card.activation)
    exact = invert_to_labelmap(probs, pre, card.labels, card.activation)
    fast = export_labelmap(probs.cuda(), pre, card.labels, card.activation)
    _compare(fast, exact, invert(probs, pre))


@pytest.mark.parametrize("card_id", ["uxnet-amos", "mednext-nnunet-kits19-template", "demo"])
@pytest.mark.parametrize("budget", [30_000, 2**30])
def test_probabilities_on_the_input_grid_match_monai(card_id, budget):
    """``--probabilities``: every class on the input grid, within 1e-4 (linear) / 1e-3 (spline) of MONAI."""
    from volseg.postprocessing.export_prediction import probabilities_on_input_grid

    card = load_card(card_id)
    pre = preprocess(_ct((36, 30, 20)), _affine("flipped"), card.preprocessing)
    probs = _probs(pre.image.shape[1:], card.out_channels, card.activation)
    exact = invert(probs, pre)
    got = probabilities_on_input_grid(probs, pre, budget=budget)
    assert got.shape == exact.shape and got.device.type == "cpu"
    tol = 1e-3 if card_id.startswith("mednext") else 1e-4
    assert float((got - exact).abs().max()) <= tol


# ---------------------------------------------------------------- memory of the way back


def _amos_grids(slices: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(network grid, input grid) of uxnet-amos's preprocessing for a 512 x 512 x ``slices`` CT at
    0.7 x 0.7 x 1.25 mm (the planner's figures: nothing allocated)."""
    from volseg.preprocessing.planning import plan_preprocessing, planned_shape

    shape = (512, 512, slices)
    plans = plan_preprocessing(shape, np.diag([0.7, 0.7, 1.25, 1.0]), load_card("uxnet-amos").preprocessing, 1)
    return tuple(planned_shape(shape, plans)), shape


def test_way_back_plans_within_7_gb_for_16_classes_on_512x512x800():
    """Issue 15's target: a 16-class 512x512x800 CT's way back fits a GPU that gives the run 7 GB
    (the probabilities included), with groups and slabs that fit the budget they were sized from."""
    from volseg.postprocessing.export_prediction import GPU_BUDGET, way_back_gpu_bytes

    network, shape = _amos_grids(800)
    assert network == (240, 240, 501)  # Spacing 1.5 x 1.5 x 2 mm; no crop assumed
    est = way_back_gpu_bytes(16, network, shape, free=7 * 10**9)
    assert est.total <= 7 * 10**9 and est.budget <= GPU_BUDGET
    assert est.probabilities == 16 * 4 * int(np.prod(network))
    n_net, row = int(np.prod(network)), shape[1] * shape[2]
    assert 1 <= est.plan.group < 16 and 12 * est.plan.group * n_net <= est.budget // 2
    assert 1 <= est.plan.slab_rows < shape[0] and 16 * est.plan.group * est.plan.slab_rows * row <= est.budget // 2
    # a larger device: the budget stops at GPU_BUDGET; a smaller one: smaller pieces
    assert way_back_gpu_bytes(16, network, shape, free=80 * 10**9).budget == GPU_BUDGET
    small = way_back_gpu_bytes(16, network, shape, free=4 * 10**9)
    assert small.plan.group < est.plan.group and small.budget < est.budget


_MEASURE = r"""
import ctypes, json, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from test_export_prediction import _affine, _ct, _probs
from volseg.cards import Label
from volseg.postprocessing.export_prediction import export_labelmap, way_back_gpu_bytes
from volseg.preprocessing.card_steps import preprocess
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 64 * 1024); libc.mallopt(-1, 64 * 1024)  # every large block mmap'ed and returned: RSS = live
torch.set_num_threads(1)
steps = [{"name": "Spacing", "args": {"pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"}},
         {"name": "Orientation", "args": {"axcodes": "RAS"}}]
pre = preprocess(_ct((160, 160, 64)), _affine("flipped"), steps)
labels = [Label(value=c, name=f"c{c}", color=(0, 0, 0), channel=c) for c in range(1, 16)]
probs = _probs(pre.image.shape[1:], 16, "softmax")
if sys.argv[2] == "noisy":  # boundaries everywhere: the slab-by-slab strategy
    probs = torch.softmax(torch.log(probs) + 3 * torch.randn(probs.shape, generator=torch.Generator().manual_seed(0)), 0)
n_net = int(np.prod(pre.image.shape[1:]))
est = way_back_gpu_bytes(16, pre.image.shape[1:], pre.input_shape, free=17 * 4 * n_net + 2 * 48 * 2**20)
libc.malloc_trim(0)
rss = lambda key: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
open("/proc/self/clear_refs", "w").write("5")
base = rss("VmRSS:")
out = export_labelmap(probs, pre, labels, "softmax", device=torch.device("cpu"), budget=est.budget)
grown = rss("VmHWM:") - base
print(json.dumps({"grown": grown, "bound": est.temporaries + est.labelmap + 2 * out.size,
                  "group": est.plan.group, "budget": est.budget}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the kernel's peak RSS (Linux)")
@pytest.mark.parametrize("probabilities", ["smooth", "noisy"])
def test_way_back_memory_stays_within_its_plan(probabilities):
    """The plan is a bound on what the code allocates: the way back's peak RSS growth on the CPU
    (the same tensors it makes on a GPU, plus the host's uint16 copy of the label map) with the
    budget ``way_back_gpu_bytes`` gives stays within its temporaries and label map. Measured in a
    child process whose allocator returns freed blocks, with the kernel's high-water mark."""
    import json
    import subprocess
    import sys

    here = str(Path(__file__).resolve().parent)
    run = subprocess.run([sys.executable, "-c", _MEASURE, here, probabilities], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["group"] < 16  # the budget made the plan split the classes
    assert 0 < got["grown"] <= got["bound"], got


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("probabilities", ["smooth", "noisy"])
def test_cuda_way_back_memory_stays_within_its_plan(probabilities):
    """On a GPU: the way back's peak allocation (``max_memory_allocated``) with the budget
    ``way_back_gpu_bytes`` plans stays within the plan's temporaries and label map."""
    from volseg.postprocessing.export_prediction import way_back_gpu_bytes

    steps = [{"name": "Spacing", "args": {"pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"}},
             {"name": "Orientation", "args": {"axcodes": "RAS"}}]
    pre = preprocess(_ct((160, 160, 64)), _affine("flipped"), steps)
    labels = [Label(value=c, name=f"c{c}", color=(0, 0, 0), channel=c) for c in range(1, 16)]
    probs = _probs(pre.image.shape[1:], 16, "softmax")
    if probabilities == "noisy":
        probs = torch.softmax(torch.log(probs) + 3 * torch.randn(probs.shape, generator=torch.Generator().manual_seed(0)), 0)
    n_net = int(np.prod(pre.image.shape[1:]))
    est = way_back_gpu_bytes(16, pre.image.shape[1:], pre.input_shape, free=17 * 4 * n_net + 2 * 48 * 2**20)
    device = torch.device("cuda")
    probs = probs.to(device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = export_labelmap(probs, pre, labels, "softmax", device=device, budget=est.budget)
    grown = torch.cuda.max_memory_allocated() - base
    assert est.plan.group < 16 and 0 < grown <= est.temporaries + est.labelmap, (grown, est)
    reference = export_labelmap(probs.cpu(), pre, labels, "softmax", device=torch.device("cpu"), budget=est.budget)
    assert np.mean(got != reference) <= 1e-4
