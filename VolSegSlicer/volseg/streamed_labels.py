"""From probabilities on the network's grid to the label map on the input grid, in slabs or one class at a time.

Mapping all class probabilities back to the input grid at once needs ``classes x voxels x 4``
bytes and more for the resampling (measured: about 210 bytes per input voxel for a 16-class
card, 43 GB for a 512x512x800 CT). When the probabilities themselves are not wanted, only the
label map is, and it can be made piecewise:

- When the first preprocessing step is a resampling (``Spacing``), every other step is undone
  on the network's grid (all classes), then the resampling is undone in slabs of the input grid
  (all classes of a slab in one call, so the sampling grid is computed once per slab) and each
  slab's labels are taken at once: the input grid holds only the label map.
- Otherwise (crops, pads, flips only) the classes are mapped back one at a time, keeping a
  running maximum and winner: a few bytes per input voxel whatever the number of classes.

The result equals ``to_labelmap(invert(probs, pre), ...)``: resampling acts on each channel
separately, and the running comparison keeps the first of equal maxima as ``argmax`` does.
Slabs resample with the destination affine shifted to each slab, which moves sampling positions
by float64 rounding (about 1e-13 voxel): in the tests and the benchmark the label maps are
identical.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample, Spacing
from monai.utils import TraceKeys, get_torch_dtype_from_string

from volseg.cards import Label
from volseg.preprocess import Preprocessed, invert, invert_partial

__all__ = ["all_finite", "invert_to_labelmap"]

#: Bytes of resampling temporaries allowed per slab (MONAI's resampler: a float64 sampling grid,
#: 24 bytes per voxel, and about 12 bytes per channel and voxel for its float64 output and the cast).
SLAB_BYTES = 512 * 2**20


def all_finite(probs: torch.Tensor) -> bool:
    """True when no value is NaN or infinite (checked per channel, without a full-size mask)."""
    return all(bool(torch.isfinite(probs[c]).all()) for c in range(probs.shape[0]))


def _labels_from(values: torch.Tensor, labels: Sequence[Label], activation: str, threshold: float,
                 out: np.ndarray) -> None:
    """Paint ``out`` (a view of the label map) from (C, ...) inverted values, as ``to_labelmap``."""
    if activation == "softmax":
        winner = torch.argmax(values, dim=0).numpy()
        for lab in labels:
            out[winner == lab.channel] = lab.value
    else:
        for lab in labels:
            out[(values[lab.channel] > threshold).numpy()] = lab.value


def _resample_slabs(partial: MetaTensor, slab_bytes: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Undo the kept ``Spacing`` on ``partial`` (C, ...) slab by slab along the input grid's first axis."""
    record = partial.applied_operations[-1]
    extra = dict(record[TraceKeys.EXTRA_INFO])
    extra["dtype"] = get_torch_dtype_from_string(extra["dtype"])
    if extra.get("align_corners") == TraceKeys.NONE:
        extra["align_corners"] = False
    dst = torch.as_tensor(extra.pop("src_affine"), dtype=torch.float64)
    size = list(record[TraceKeys.ORIG_SIZE])
    per_voxel = 24 + 12 * partial.shape[0]
    thickness = max(1, slab_bytes // (per_voxel * int(np.prod(size[1:]))))
    resampler = SpatialResample()
    for start in range(0, size[0], thickness):
        slab = slice(start, min(size[0], start + thickness))
        shift = torch.eye(4, dtype=torch.float64)
        shift[0, 3] = start
        with resampler.trace_transform(False):
            out = resampler(partial, dst_affine=dst @ shift, spatial_size=[slab.stop - slab.start, *size[1:]], **extra)
        yield slab, torch.as_tensor(out).float()


def invert_to_labelmap(probs: torch.Tensor, pre: Preprocessed, labels: Sequence[Label], activation: str,
                       threshold: float = 0.5, slab_bytes: int = SLAB_BYTES) -> np.ndarray:
    """(C, I', J', K') probabilities on the preprocessed grid -> (I, J, K) uint16 label map on the input grid.

    Args:
        probs: the network's blended probabilities (any float dtype).
        pre: the preprocessing to undo (:func:`volseg.preprocess.preprocess`).
        labels: the card's labels (value, channel).
        activation: ``"softmax"`` (each voxel takes the label of its most probable channel;
            channels without a label, such as background, give 0) or ``"sigmoid"`` (each label
            painted where its channel exceeds ``threshold``, in card order, later on top).
        threshold: the sigmoid threshold.
        slab_bytes: resampling temporaries allowed at once (sets the slab thickness).

    Returns:
        The label map, as :func:`volseg.postprocess.to_labelmap` of the inverted probabilities.
    """
    out = np.zeros(pre.input_shape, dtype=np.uint16)
    if pre.transforms and isinstance(pre.transforms[0], Spacing):
        partial = invert_partial(probs, pre, keep_first=1)  # all but the resampling, on the network's grid
        for slab, values in _resample_slabs(partial, slab_bytes):
            _labels_from(values, labels, activation, threshold, out[slab])
        return out
    # no resampling to undo (crops, pads, flips): one class at a time with a running winner
    if activation != "softmax":
        for lab in labels:
            _labels_from(invert(probs[lab.channel:lab.channel + 1], pre), [replace(lab, channel=0)], activation,
                         threshold, out)
        return out
    best = invert(probs[0:1], pre)[0]
    winner = torch.zeros(pre.input_shape, dtype=torch.uint8 if probs.shape[0] <= 256 else torch.int32)
    for c in range(1, probs.shape[0]):
        values = invert(probs[c:c + 1], pre)[0]
        better = values > best
        winner[better] = c
        torch.maximum(best, values, out=best)
        del values, better
    del best
    w = winner.numpy()
    for lab in labels:
        out[w == lab.channel] = lab.value
    return out
