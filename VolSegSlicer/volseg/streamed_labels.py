"""From probabilities on the network's grid to the label map on the input grid, one class at a time.

Mapping all class probabilities back to the input grid at once needs ``classes x voxels x 4``
bytes and more for the resampling (measured: about 210 bytes per input voxel for a 16-class
card, 43 GB for a 512x512x800 CT). When the probabilities themselves are not wanted, only the
label map is: this module undoes the preprocessing for one class at a time and keeps a running
winner. When the first preprocessing step is a resampling (``Spacing``), its inverse -- MONAI's
resampler needs about 57 bytes per output voxel (a float64 sampling grid) -- is further done in
slabs of the input grid, so the input-grid memory is a few bytes per voxel whatever the number
of classes.

The result equals ``to_labelmap(invert(probs, pre), ...)``: resampling acts on each channel
separately, and the running comparison keeps the first of equal maxima as ``argmax`` does.
Slabs resample with the destination affine shifted to each slab, which moves sampling
positions by float64 rounding (about 1e-13 voxel): in tests and benchmarks the label maps are
identical.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample, Spacing
from monai.utils import TraceKeys, get_torch_dtype_from_string

from volseg.cards import Label
from volseg.preprocess import Preprocessed, invert, invert_partial

__all__ = ["all_finite", "invert_to_labelmap"]

#: Input-grid voxels resampled at once (with ~57 bytes of temporaries per voxel: about 0.5 GB).
SLAB_VOXELS = 8 * 2**20


def all_finite(probs: torch.Tensor) -> bool:
    """True when no value is NaN or infinite (checked per channel, without a full-size mask)."""
    return all(bool(torch.isfinite(probs[c]).all()) for c in range(probs.shape[0]))


class _ChannelInverter:
    """Maps one channel back to the input grid, slab by slab along the first axis when the first
    preprocessing step is a ``Spacing`` resampling, else at once through :func:`invert`."""

    def __init__(self, pre: Preprocessed, slab_voxels: int = SLAB_VOXELS) -> None:
        self.pre = pre
        self.slabbed = bool(pre.transforms) and isinstance(pre.transforms[0], Spacing)
        plane = int(np.prod(pre.input_shape[1:]))
        self.thickness = max(1, slab_voxels // max(1, plane))

    def slabs(self) -> list[slice]:
        n = self.pre.input_shape[0]
        if not self.slabbed:
            return [slice(0, n)]
        return [slice(a, min(n, a + self.thickness)) for a in range(0, n, self.thickness)]

    def __call__(self, channel: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield (slab along axis 0, the channel's values there) covering the input grid."""
        if not self.slabbed:
            yield slice(0, self.pre.input_shape[0]), invert(channel, self.pre)[0]
            return
        img = invert_partial(channel, self.pre, keep_first=1)  # everything but the resampling undone
        record = img.applied_operations[-1]
        extra = dict(record[TraceKeys.EXTRA_INFO])
        extra["dtype"] = get_torch_dtype_from_string(extra["dtype"])
        if extra.get("align_corners") == TraceKeys.NONE:
            extra["align_corners"] = False
        dst = torch.as_tensor(extra.pop("src_affine"), dtype=torch.float64)
        size = list(record[TraceKeys.ORIG_SIZE])
        resampler = SpatialResample()
        for slab in self.slabs():
            shift = torch.eye(4, dtype=torch.float64)
            shift[0, 3] = slab.start
            with resampler.trace_transform(False):
                out = resampler(img, dst_affine=dst @ shift, spatial_size=[slab.stop - slab.start, *size[1:]], **extra)
            yield slab, torch.as_tensor(out)[0].float()


def invert_to_labelmap(probs: torch.Tensor, pre: Preprocessed, labels: Sequence[Label], activation: str,
                       threshold: float = 0.5, slab_voxels: int = SLAB_VOXELS) -> np.ndarray:
    """(C, I', J', K') probabilities on the preprocessed grid -> (I, J, K) uint16 label map on the input grid.

    Args:
        probs: the network's blended probabilities (any float dtype).
        pre: the preprocessing to undo (:func:`volseg.preprocess.preprocess`).
        labels: the card's labels (value, channel).
        activation: ``"softmax"`` (each voxel takes the label of its most probable channel;
            channels without a label, such as background, give 0) or ``"sigmoid"`` (each label
            painted where its channel exceeds ``threshold``, in card order, later on top).
        threshold: the sigmoid threshold.
        slab_voxels: input-grid voxels resampled at once (bounds the resampling temporaries).

    Returns:
        The label map, as :func:`volseg.postprocess.to_labelmap` of the inverted probabilities.
    """
    inverter = _ChannelInverter(pre, slab_voxels)
    out = np.zeros(pre.input_shape, dtype=np.uint16)
    if activation != "softmax":
        for lab in labels:
            for slab, values in inverter(probs[lab.channel:lab.channel + 1]):
                out[slab][(values > threshold).numpy()] = lab.value
        return out
    n = probs.shape[0]
    best = torch.empty(pre.input_shape, dtype=torch.float32)
    winner = torch.zeros(pre.input_shape, dtype=torch.uint8 if n <= 256 else torch.int32)
    for c in range(n):
        for slab, values in inverter(probs[c:c + 1]):
            if c == 0:
                best[slab] = values
                continue
            better = values > best[slab]
            winner[slab][better] = c
            torch.maximum(best[slab], values, out=best[slab])
            del values, better
    del best
    w = winner.numpy()
    for lab in labels:
        out[w == lab.channel] = lab.value
    return out
