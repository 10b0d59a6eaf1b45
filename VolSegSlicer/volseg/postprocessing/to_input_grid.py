"""From probabilities on the network's grid to the label map on the input grid, in slabs or one class at a time.

Mapping all class probabilities back to the input grid at once needs ``classes x voxels x 4``
bytes and more for the resampling (measured: about 210 bytes per input voxel for a 16-class
card, 43 GB for a 512x512x800 CT). When the probabilities themselves are not wanted, only the
label map is, and it can be made piecewise. The classes are undone in groups (each group's
share of the network grid at most :data:`GROUP_BYTES`); when the first preprocessing step is a
resampling (``Spacing``), every other step is undone on the network's grid and the resampling --
MONAI's resampler needs about 24 + 12 x classes bytes per output voxel (a float64 sampling grid
and output) -- in slabs of the input grid (:data:`SLAB_BYTES` of temporaries). A running maximum
and winner (5 bytes per input voxel) carry the argmax from group to group; a sigmoid card's
labels are painted group by group in card order.

The result equals ``to_labelmap(invert(probs, pre), ...)``: resampling acts on each channel
separately, and the running comparison keeps the first of equal maxima as ``argmax`` does.
Slabs resample with the destination affine shifted to each slab, which moves sampling positions
by float64 rounding (about 1e-13 voxel): in the tests and the benchmark the label maps are
identical.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing, SpatialResample
from monai.utils import TraceKeys, get_torch_dtype_from_string

from volseg.cards import Label
from volseg.preprocessing.card_steps import Preprocessed, invert, invert_partial

__all__ = ["all_finite", "invert_to_labelmap"]

#: Bytes of resampling temporaries allowed per slab (MONAI's resampler: a float64 sampling grid,
#: 24 bytes per voxel, and about 12 bytes per channel and voxel for its float64 output and the cast).
SLAB_BYTES = 512 * 2**20


def all_finite(probs: torch.Tensor) -> bool:
    """True when no value is NaN or infinite (checked per channel, without a full-size mask)."""
    return all(bool(torch.isfinite(probs[c]).all()) for c in range(probs.shape[0]))


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


#: Largest share of the network grid, in bytes, undone at once (a group of classes, and its copies).
GROUP_BYTES = 512 * 2**20


def _pieces(probs: torch.Tensor, pre: Preprocessed, channels: Sequence[int],
            slab_bytes: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """(slab of the input grid along axis 0, values of ``channels`` there), covering the input grid."""
    part = probs[list(channels)]
    if pre.transforms and isinstance(pre.transforms[0], Spacing):
        yield from _resample_slabs(invert_partial(part, pre, keep_first=1), slab_bytes)
    else:
        yield slice(0, pre.input_shape[0]), invert(part, pre)


def _groups(channels: Sequence[int], probs: torch.Tensor, pre: Preprocessed, group_bytes: int) -> list[list[int]]:
    """Consecutive groups of ``channels``, each small enough to undo at once (float32 plus two copies)."""
    per_channel = 3 * 4 * max(int(np.prod(probs.shape[1:])), int(np.prod(pre.input_shape)))
    size = max(1, group_bytes // per_channel)
    return [list(channels[i:i + size]) for i in range(0, len(channels), size)]


def invert_to_labelmap(probs: torch.Tensor, pre: Preprocessed, labels: Sequence[Label], activation: str,
                       threshold: float = 0.5, slab_bytes: int = SLAB_BYTES,
                       group_bytes: int = GROUP_BYTES) -> np.ndarray:
    """(C, I', J', K') probabilities on the preprocessed grid -> (I, J, K) uint16 label map on the input grid.

    Classes are undone in groups (``group_bytes``), each group's resampling in slabs
    (``slab_bytes``); a running maximum and winner (5 bytes per input voxel) carry the argmax
    across groups.

    Args:
        probs: the network's blended probabilities (any float dtype).
        pre: the preprocessing to undo (:func:`volseg.preprocessing.card_steps.preprocess`).
        labels: the card's labels (value, channel).
        activation: ``"softmax"`` (each voxel takes the label of its most probable channel;
            channels without a label, such as background, give 0) or ``"sigmoid"`` (each label
            painted where its channel exceeds ``threshold``, in card order, later on top).
        threshold: the sigmoid threshold.
        slab_bytes: resampling temporaries allowed at once (sets the slab thickness).
        group_bytes: network-grid bytes undone at once (sets the number of classes per group).

    Returns:
        The label map, as :func:`volseg.postprocessing.labels.to_labelmap` of the inverted probabilities.
    """
    out = np.zeros(pre.input_shape, dtype=np.uint16)
    if activation != "softmax":
        ordered = list(labels)
        for group in _groups(range(len(ordered)), probs, pre, group_bytes):  # card order: later labels on top
            for slab, values in _pieces(probs, pre, [ordered[i].channel for i in group], slab_bytes):
                view = out[slab]
                for k, i in enumerate(group):
                    view[(values[k] > threshold).numpy()] = ordered[i].value
        return out
    best = torch.empty(pre.input_shape, dtype=torch.float32)
    winner = torch.zeros(pre.input_shape, dtype=torch.uint8 if probs.shape[0] <= 256 else torch.int32)
    first = True
    for group in _groups(range(probs.shape[0]), probs, pre, group_bytes):
        for slab, values in _pieces(probs, pre, group, slab_bytes):
            index = torch.argmax(values, dim=0, keepdim=True)  # the first maximum, as argmax over all classes
            top = torch.gather(values, 0, index)[0]
            index = index[0] + group[0]
            if first:
                best[slab], winner[slab] = top, index.to(winner.dtype)
            else:
                better = top > best[slab]  # strict: an earlier class keeps a tie
                winner[slab][better] = index[better].to(winner.dtype)
                torch.maximum(best[slab], top, out=best[slab])
            del values, index, top
        first = False
    del best
    w = winner.numpy()
    for lab in labels:
        out[w == lab.channel] = lab.value
    return out
