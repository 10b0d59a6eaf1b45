"""From probabilities to a clean label map."""

from __future__ import annotations

import numpy as np
import torch

from volseg.cards import Label
from volseg.postprocessing.labels import fill_holes, keep_largest_component, postprocess, remove_small_islands, to_labelmap

A = Label(1, "a", (255, 0, 0), 1)
B = Label(2, "b", (0, 255, 0), 2)


def test_softmax_argmax_maps_channels_to_card_values():
    labels = [Label(5, "five", (1, 1, 1), 1), Label(9, "nine", (2, 2, 2), 2)]
    probs = torch.zeros(3, 2, 2, 2)
    probs[0, 0], probs[1, 1, 0], probs[2, 1, 1] = 1, 1, 1
    out = to_labelmap(probs, labels, "softmax")
    assert out.dtype == np.uint16
    assert (out[0] == 0).all() and (out[1, 0] == 5).all() and (out[1, 1] == 9).all()


def test_sigmoid_labels_are_painted_in_card_order():
    # BraTS-style nested regions: WT (channel 1) painted first, then TC (0), then ET (2) on top.
    labels = [Label(1, "edema", (1, 1, 1), 1), Label(2, "core", (2, 2, 2), 0), Label(3, "enhancing", (3, 3, 3), 2)]
    probs = torch.zeros(3, 1, 1, 4)
    probs[1, ..., :3] = 0.9  # whole tumour
    probs[0, ..., :2] = 0.8  # tumour core
    probs[2, ..., :1] = 0.7  # enhancing
    assert to_labelmap(probs, labels, "sigmoid", 0.5)[0, 0].tolist() == [3, 2, 1, 0]


def scene() -> np.ndarray:
    m = np.zeros((20, 20, 20), np.uint16)
    m[2:8, 2:8, 2:8] = 1
    m[4, 4, 4] = 0  # a hole
    m[12:14, 12:14, 12:14] = 1  # a second, smaller component
    m[15:19, 1:5, 1:5] = 2
    m[0, 19, 19] = 2  # a one-voxel island of label 2
    return m


def test_keep_largest_component_only_touches_chosen_labels():
    out = keep_largest_component(scene(), [1])
    assert (out[12:14, 12:14, 12:14] == 0).all()
    assert out[0, 19, 19] == 2 and (out[2:8, 2:8, 2:8] == 1).sum() == 215


def test_fill_holes_fills_only_background():
    out = fill_holes(scene(), [1])
    assert out[4, 4, 4] == 1
    assert (out == 2).sum() == (scene() == 2).sum()


def test_remove_small_islands():
    out = remove_small_islands(scene(), 9)
    assert out[0, 19, 19] == 0 and (out[12:14, 12:14, 12:14] == 0).all()
    assert (out[15:19, 1:5, 1:5] == 2).all()


def test_postprocess_uses_physical_volume():
    m = scene()
    # 2 mm isotropic voxels: the 8-voxel component is 64 mm^3, the 1-voxel island 8 mm^3.
    out = postprocess(m, [A, B], (2.0, 2.0, 2.0), min_island_mm3=10.0)
    assert out[0, 19, 19] == 0 and (out[12:14, 12:14, 12:14] == 1).all()
    out = postprocess(m, [A, B], (2.0, 2.0, 2.0), keep_largest=True, holes=True)
    assert out[4, 4, 4] == 1 and out[0, 19, 19] == 0 and (out[12:14, 12:14, 12:14] == 0).all()
    untouched = postprocess(m, [A, B], (1, 1, 1))
    np.testing.assert_array_equal(untouched, m)
