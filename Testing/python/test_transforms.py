"""volseg.preprocessing.transforms: PerSliceMinMax, ClipZScore, SwapSpatialAxes (+ MONAI's z-score equivalence)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import NormalizeIntensity

from volseg.preprocessing import card_steps as preprocess
from volseg.preprocessing.transforms import ClipZScore, PerSliceMinMax, SwapSpatialAxes


def _meta(array: np.ndarray, affine: np.ndarray | None = None) -> MetaTensor:
    aff = np.diag([0.9, -0.8, 2.5, 1.0]) if affine is None else affine
    return MetaTensor(torch.as_tensor(array), affine=torch.as_tensor(aff, dtype=torch.float64))


def _sklearn_minmax_columns(x: np.ndarray) -> np.ndarray:
    """scikit-learn MinMaxScaler.fit_transform on x.reshape(-1, x.shape[-1]) (its formula, float64)."""
    cols = x.reshape(-1, x.shape[-1]).astype(np.float64)
    lo, hi = cols.min(axis=0), cols.max(axis=0)
    rng = hi - lo
    rng[rng == 0.0] = 1.0  # sklearn's _handle_zeros_in_scale
    scale = 1.0 / rng
    return (cols * scale - lo * scale).reshape(x.shape)


@pytest.fixture()
def volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 10, 9, 7)) * 300 + 50).astype(np.float32)
    x[0, :, :, 3] = 17.0  # a constant slice along the last axis
    x[1, :, :, 0] = 0.0
    return x


def test_per_slice_minmax_matches_official_formula(volume: np.ndarray) -> None:
    out = PerSliceMinMax(axis=-1)(_meta(volume))
    expected = np.stack([_sklearn_minmax_columns(c) for c in volume])  # per modality, as the official script
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    assert float(out[0, :, :, 3].abs().max()) == 0.0 and float(out[1, :, :, 0].abs().max()) == 0.0  # constant -> 0
    for c in range(2):  # every non-constant slice spans exactly [0, 1]
        for k in range(7):
            s = out[c, :, :, k]
            if (c, k) not in ((0, 3), (1, 0)):
                assert float(s.min()) == 0.0 and float(s.max()) == pytest.approx(1.0)


def test_per_slice_minmax_axis_and_types(volume: np.ndarray) -> None:
    meta = _meta(volume)
    out = PerSliceMinMax(axis=0)(meta)
    moved = np.moveaxis(volume, 1, -1)  # slices along the first spatial axis
    expected = np.moveaxis(np.stack([_sklearn_minmax_columns(c) for c in moved]), -1, 1)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, meta.affine) and out.dtype == torch.float32
    as_numpy = PerSliceMinMax()(volume)
    assert isinstance(as_numpy, np.ndarray)
    assert not hasattr(PerSliceMinMax(), "inverse")  # intensity only: nothing to invert
    with pytest.raises(ValueError, match="axis"):
        PerSliceMinMax(axis=3)(meta)
    with pytest.raises(ValueError, match="channel-first"):
        PerSliceMinMax()(torch.zeros(5))


def test_clip_zscore(volume: np.ndarray) -> None:
    out = ClipZScore(lower=-100, upper=400, mean=101.0, std=76.9)(_meta(volume))
    expected = (np.clip(volume.astype(np.float64), -100, 400) - 101.0) / 76.9
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    per_channel = ClipZScore(lower=[-100, 0], upper=[400, 10], mean=[1.0, 2.0], std=[2.0, 4.0])(volume)
    np.testing.assert_allclose(per_channel[1], (np.clip(volume[1], 0, 10) - 2.0) / 4.0, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        ClipZScore(lower=[0, 0, 0], upper=1, mean=0, std=1)(volume)
    with pytest.raises(ValueError, match="std"):
        ClipZScore(lower=0, upper=1, mean=0, std=0)
    with pytest.raises(ValueError, match="above"):
        ClipZScore(lower=5, upper=1, mean=0, std=1)


def test_monai_normalize_intensity_is_nnunet_mr_zscore(volume: np.ndarray) -> None:
    """Why volseg has no ZScore: MONAI's channel-wise NormalizeIntensity computes nnU-Net's MR z-score."""
    x = np.abs(volume) * (np.random.default_rng(1).random(volume.shape) > 0.3)  # a zero background
    for nonzero in (False, True):
        out = NormalizeIntensity(nonzero=nonzero, channel_wise=True)(torch.as_tensor(x)).numpy()
        for c in range(x.shape[0]):
            mask = x[c] != 0 if nonzero else np.ones_like(x[c], dtype=bool)
            ref = np.zeros_like(x[c], dtype=np.float64)
            vals = x[c][mask].astype(np.float64)
            ref[mask] = (vals - vals.mean()) / (vals.std() + 1e-8)  # nnU-Net v1 (numpy std, ddof 0)
            np.testing.assert_allclose(out[c], ref, atol=1e-4)


def test_swap_spatial_axes_keeps_world_positions(volume: np.ndarray) -> None:
    meta = _meta(volume)
    out = SwapSpatialAxes(axes=(0, 2))(meta)
    assert out.shape == (2, 7, 9, 10)
    np.testing.assert_array_equal(out.numpy(), np.swapaxes(volume, 1, 3))
    i, j, k = 3, 5, 6
    world_before = meta.affine.numpy() @ np.array([i, j, k, 1.0])
    world_after = out.affine.numpy() @ np.array([k, j, i, 1.0])
    np.testing.assert_allclose(world_after, world_before)
    assert out[1, k, j, i] == meta[1, i, j, k]


def test_swap_spatial_axes_inverse_on_network_output(volume: np.ndarray) -> None:
    t = SwapSpatialAxes(axes=(0, 1))
    swapped = t(_meta(volume))
    logits = swapped[:1] * 2.0 + 1.0  # a (C', ...) "network output" on the swapped grid
    back = t.inverse(logits)
    assert back.shape == (1, 10, 9, 7)
    np.testing.assert_allclose(back.numpy(), volume[:1] * 2.0 + 1.0)
    np.testing.assert_allclose(back.affine.numpy(), _meta(volume).affine.numpy())
    with pytest.raises(ValueError):
        SwapSpatialAxes(axes=(1, 1))
    with pytest.raises(ValueError, match="out of range"):
        SwapSpatialAxes(axes=(0, 3))(volume)


def test_card_names_resolve_to_volseg_transforms_and_invert() -> None:
    """Through volseg.preprocessing.card_steps, as a card uses them: Orientation + crop + swap, then back."""
    steps = [{"name": "PerSliceMinMax", "args": {"axis": -1}},
             {"name": "Orientation", "args": {"axcodes": "RAS"}},
             {"name": "CenterSpatialCrop", "args": {"roi_size": [8, 8, 4]}},
             {"name": "SwapSpatialAxes", "args": {"axes": [0, 2]}},
             {"name": "ClipZScore", "args": {"lower": 0.0, "upper": 1.0, "mean": 0.5, "std": 0.25}}]
    assert preprocess.resolve_transform("SwapSpatialAxes") is SwapSpatialAxes
    arr = np.random.default_rng(2).random((1, 12, 10, 6)).astype(np.float32)
    pre = preprocess.preprocess(arr, np.diag([-1.0, -1.0, 2.0, 1.0]), steps)
    assert tuple(pre.image.shape) == (1, 4, 8, 8)
    back = preprocess.invert(pre.image.as_tensor() + 10.0, pre)  # +10: tell crop padding (0) from data
    assert tuple(back.shape) == (1, 12, 10, 6)
    inside = back[0] != 0
    assert int(inside.sum()) == 8 * 8 * 4
    normalised = _sklearn_minmax_columns(arr[0])
    np.testing.assert_allclose(back[0][inside].numpy(), (normalised[inside.numpy()] - 0.5) / 0.25 + 10.0, atol=1e-5)
