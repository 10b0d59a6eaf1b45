"""From class probabilities to a clean label map."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from volseg.cards import Label

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def to_labelmap(probs: torch.Tensor, labels: Sequence[Label], activation: str, threshold: float = 0.5) -> np.ndarray:
    """(C, I, J, K) probabilities -> (I, J, K) uint16 label map with the card's label values.

    softmax: each voxel takes the label whose channel has the highest probability (channels
    without a label, such as background, give 0). sigmoid: each label is painted where its
    channel exceeds ``threshold``, in card order, later labels on top.
    """
    out = np.zeros(tuple(probs.shape[1:]), dtype=np.uint16)
    if activation == "softmax":
        winner = torch.argmax(probs, dim=0).numpy()
        for lab in labels:
            out[winner == lab.channel] = lab.value
    else:
        p = probs.numpy()
        for lab in labels:
            out[p[lab.channel] > threshold] = lab.value
    return out


def _which(setting: bool | Sequence[int], labels: Sequence[Label]) -> list[int]:
    if setting is True:
        return [lab.value for lab in labels]
    if not setting:
        return []
    return [int(v) for v in setting]


def keep_largest_component(labelmap: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Keep only the largest connected component (26-connectivity) of each label in ``values``."""
    out = labelmap.copy()
    for value in values:
        components, n = ndimage.label(labelmap == value, structure=_CONNECTIVITY_26)
        if n > 1:
            largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
            out[(components != largest) & (components > 0)] = 0
    return out


def fill_holes(labelmap: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Fill enclosed holes of each label in ``values`` (only holes that are background)."""
    out = labelmap.copy()
    for value in values:
        filled = ndimage.binary_fill_holes(labelmap == value)
        out[filled & (labelmap == 0)] = value
    return out


def remove_small_islands(labelmap: np.ndarray, min_voxels: int) -> np.ndarray:
    """Set connected components smaller than ``min_voxels`` (per label) to background."""
    if min_voxels <= 1:
        return labelmap
    out = labelmap.copy()
    for value in np.unique(labelmap):
        if value == 0:
            continue
        components, n = ndimage.label(labelmap == value, structure=_CONNECTIVITY_26)
        sizes = np.bincount(components.ravel())
        small = np.flatnonzero(sizes < min_voxels)
        small = small[small != 0]
        if small.size:
            out[np.isin(components, small)] = 0
    return out


def postprocess(labelmap: np.ndarray, labels: Sequence[Label], spacing: Sequence[float], *,
                keep_largest: bool | Sequence[int] = False, holes: bool | Sequence[int] = False,
                min_island_mm3: float = 0.0) -> np.ndarray:
    """Apply the card's (or the user's) postprocessing switches in a fixed, documented order:
    small islands first, then largest component, then hole filling."""
    voxel_mm3 = float(np.prod(spacing))
    if min_island_mm3 > 0:
        labelmap = remove_small_islands(labelmap, int(np.ceil(min_island_mm3 / voxel_mm3)))
    labelmap = keep_largest_component(labelmap, _which(keep_largest, labels))
    return fill_holes(labelmap, _which(holes, labels))
