"""From probabilities on the network's grid to the label map on the input grid, one class at a time.

Mapping all class probabilities back to the input grid at once needs ``classes x voxels x 4``
bytes: 13.4 GB for a 512x512x800 CT and a 16-class card, before the label map is taken. When
the probabilities themselves are not wanted, only the label map is: this module inverts the
preprocessing for one class at a time and keeps a running winner, so the input-grid memory is a
few bytes per voxel whatever the number of classes.

The result equals ``to_labelmap(invert(probs, pre), ...)`` exactly: resampling acts on each
channel separately, so a channel inverted alone gives the same numbers, and the running
comparison keeps the first of equal maxima as ``argmax`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from volseg.cards import Label
from volseg.preprocess import Preprocessed, invert

__all__ = ["all_finite", "invert_to_labelmap"]


def all_finite(probs: torch.Tensor) -> bool:
    """True when no value is NaN or infinite (checked per channel, without a full-size mask)."""
    return all(bool(torch.isfinite(probs[c]).all()) for c in range(probs.shape[0]))


def invert_to_labelmap(probs: torch.Tensor, pre: Preprocessed, labels: Sequence[Label], activation: str,
                       threshold: float = 0.5) -> np.ndarray:
    """(C, I', J', K') probabilities on the preprocessed grid -> (I, J, K) uint16 label map on the input grid.

    Args:
        probs: the network's blended probabilities (any float dtype).
        pre: the preprocessing to invert (:func:`volseg.preprocess.preprocess`).
        labels: the card's labels (value, channel).
        activation: ``"softmax"`` (each voxel takes the label of its most probable channel;
            channels without a label, such as background, give 0) or ``"sigmoid"`` (each label
            painted where its channel exceeds ``threshold``, in card order, later on top).
        threshold: the sigmoid threshold.

    Returns:
        The label map, as :func:`volseg.postprocess.to_labelmap` of the inverted probabilities.
    """
    out = np.zeros(pre.input_shape, dtype=np.uint16)
    if activation != "softmax":
        for lab in labels:
            channel = invert(probs[lab.channel:lab.channel + 1], pre)[0]
            out[(channel > threshold).numpy()] = lab.value
        return out
    n = probs.shape[0]
    best = invert(probs[0:1], pre)[0]
    winner = torch.zeros(pre.input_shape, dtype=torch.uint8 if n <= 256 else torch.int32)
    for c in range(1, n):
        channel = invert(probs[c:c + 1], pre)[0]
        better = channel > best
        winner[better] = c
        torch.maximum(best, channel, out=best)
        del channel, better
    del best
    w = winner.numpy()
    for lab in labels:
        out[w == lab.channel] = lab.value
    return out
