"""Label maps made one class at a time equal those made from all inverted probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from volseg.cards import Label
from volseg.postprocessing.labels import to_labelmap
from volseg.preprocessing.card_steps import invert, preprocess
from volseg.postprocessing.to_input_grid import all_finite, invert_to_labelmap

STEPS = [  # resampling, reorientation, intensity and a crop: every kind of inverse
    {"name": "Spacing", "args": {"pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"}},
    {"name": "Orientation", "args": {"axcodes": "RAS"}},
    {"name": "ScaleIntensityRange", "args": {"a_min": -125, "a_max": 275, "b_min": 0.0, "b_max": 1.0, "clip": True}},
    {"name": "CropForeground", "args": {}},
]


def _labels(n: int, skip: int = 0) -> list[Label]:
    return [Label(v, f"l{v}", (0, 0, 0), v) for v in range(1, n) if v != skip]


@pytest.fixture(scope="module")
def pre():
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 50, size=(1, 30, 26, 14)).astype(np.float32)
    arr[:, 4:26, 3:22, 2:12] += 200  # a foreground box for CropForeground
    affine = np.array([[-0.8, 0, 0, 10], [0, 0.8, 0, -5], [0, 0, 1.0, 3], [0, 0, 0, 1]])
    return preprocess(arr, affine, STEPS)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("slab_bytes,group_bytes", [(2**29, 2**29), ((24 + 12 * 6) * 26 * 14 * 4, 2**29),
                                                     ((24 + 12 * 2) * 26 * 14 * 4, 3 * 4 * 30 * 26 * 14 * 2)])
def test_streamed_equals_all_at_once(pre, activation, slab_bytes, group_bytes):
    """One piece; slabs of 4 planes (the last one 2); slabs and groups of 2 classes."""
    n = 6
    logits = torch.randn(n, *pre.image.shape[1:], generator=torch.Generator().manual_seed(1)) * 3
    probs = torch.softmax(logits, 0) if activation == "softmax" else torch.sigmoid(logits)
    labels = _labels(n, skip=3)  # channel 3 has no label: it wins voxels but paints 0
    expected = to_labelmap(invert(probs, pre), labels, activation, 0.5)
    got = invert_to_labelmap(probs, pre, labels, activation, 0.5, slab_bytes=slab_bytes, group_bytes=group_bytes)
    assert got.dtype == np.uint16 and got.shape == pre.input_shape
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(got)) > 3


@pytest.mark.parametrize("group_bytes", [2**29, 10])
def test_ties_keep_the_first_channel_as_argmax(pre, group_bytes):
    probs = torch.full((4, *pre.image.shape[1:]), 0.25)
    got = invert_to_labelmap(probs, pre, _labels(4), "softmax", group_bytes=group_bytes)
    assert not got.any()  # channel 0 (background) wins every tie, as torch.argmax's first maximum


def test_all_finite():
    x = torch.zeros(3, 4, 4, 4)
    assert all_finite(x)
    x[2, 1, 1, 1] = float("nan")
    assert not all_finite(x)


def test_without_resampling_inverts_whole_channels():
    arr = np.random.default_rng(2).normal(0, 1, size=(1, 12, 10, 8)).astype(np.float32)
    pre = preprocess(arr, np.eye(4), [{"name": "Orientation", "args": {"axcodes": "LPS"}}])
    probs = torch.softmax(torch.randn(3, *pre.image.shape[1:], generator=torch.Generator().manual_seed(4)), 0)
    expected = to_labelmap(invert(probs, pre), _labels(3), "softmax")
    np.testing.assert_array_equal(invert_to_labelmap(probs, pre, _labels(3), "softmax", group_bytes=10), expected)


def test_invert_is_repeatable(pre):
    probs = torch.rand(2, *pre.image.shape[1:])
    torch.testing.assert_close(invert(probs, pre), invert(probs, pre), rtol=0, atol=0)
