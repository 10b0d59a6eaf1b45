"""volseg's own preprocessing transforms, for pipelines MONAI has no array transform for.

Model cards name transforms; ``volseg.preprocessing.card_steps`` looks a name up here first, then in
``monai.transforms``. Every transform takes a channel-first (C, I, J, K) tensor -- normally a
MONAI ``MetaTensor`` whose affine maps voxel indices to RAS -- and returns the same type with
its metadata kept. Spatial transforms also provide ``inverse(data)``, which maps a network
output (C', ...) on the transformed grid back.

* :class:`PerSliceMinMax` -- SegFormer3D's BraTS normalisation (each slice along one axis
  min-max scaled on its own, as ``sklearn.preprocessing.MinMaxScaler`` on
  ``x.reshape(-1, x.shape[-1])``).
* :class:`ClipZScore` -- nnU-Net's CT normalisation with dataset statistics.
* :class:`SwapSpatialAxes` -- swap two spatial axes (SegFormer3D's ``swapaxes(1, 3)``; nnU-Net's
  SimpleITK (z, y, x) array order).

For nnU-Net's per-image MR z-score use MONAI's
``NormalizeIntensity(nonzero=..., channel_wise=True)``: it computes the same mean and
population standard deviation per channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Transform
from monai.utils.type_conversion import convert_to_dst_type

__all__ = ["ClipZScore", "PerSliceMinMax", "SwapSpatialAxes"]


def _as_tensor(data: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A plain tensor view of ``data`` (no MetaTensor bookkeeping)."""
    if isinstance(data, MetaTensor):
        return data.as_tensor()
    return torch.as_tensor(data)


def _check_channel_first(t: torch.Tensor, name: str) -> None:
    if t.ndim < 2:
        raise ValueError(f"{name} expects a channel-first array (C, spatial...), got shape {tuple(t.shape)}")


class PerSliceMinMax(Transform):
    """Min-max normalise every slice along ``axis`` independently, per channel, to [0, 1].

    This is SegFormer3D's BraTS preprocessing: the official script applies scikit-learn's
    ``MinMaxScaler`` to ``x.reshape(-1, x.shape[-1])`` for each modality, i.e. each slice
    along the *last raw array axis* is scaled by its own minimum and maximum. Constant
    slices (e.g. empty ones) become 0, as in scikit-learn. Computed in float64.

    Args:
        axis: spatial axis of the slices, counted on the spatial axes (``-1`` = the last raw
            array axis, K). Apply this before any reorientation to match the official order.

    (C, I, J, K) -> (C, I, J, K), same type and dtype.
    """

    def __init__(self, axis: int = -1) -> None:
        self.axis = int(axis)

    def __call__(self, data: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        x = _as_tensor(data)
        _check_channel_first(x, "PerSliceMinMax")
        n_spatial = x.ndim - 1
        if not -n_spatial <= self.axis < n_spatial:
            raise ValueError(f"axis {self.axis} is out of range for {n_spatial} spatial axes")
        dim = 1 + (self.axis % n_spatial)
        x64 = x.to(torch.float64)
        reduce = tuple(d for d in range(1, x.ndim) if d != dim)  # every spatial axis but the slice axis
        lo = x64.amin(dim=reduce, keepdim=True)
        span = x64.amax(dim=reduce, keepdim=True) - lo
        span = torch.where(span == 0, torch.ones_like(span), span)
        out = ((x64 - lo) / span).to(x.dtype if x.is_floating_point() else torch.float32)
        return convert_to_dst_type(out, data, dtype=out.dtype)[0]


class ClipZScore(Transform):
    """nnU-Net CT normalisation: clip to [lower, upper], then (x - mean) / std.

    nnU-Net computes the four numbers once per dataset over foreground voxels (the 0.5 and
    99.5 percentiles, mean and standard deviation) and stores them in its plans file
    (``dataset_properties['intensityproperties'][channel]``: ``percentile_00_5``,
    ``percentile_99_5``, ``mean``, ``sd``). Each argument may be a number (every channel) or
    one value per channel.

    (C, I, J, K) -> (C, I, J, K) float32, same type.
    """

    def __init__(self, lower: float | Sequence[float], upper: float | Sequence[float],
                 mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        self.lower, self.upper, self.mean, self.std = (
            self._values(v, n) for v, n in ((lower, "lower"), (upper, "upper"), (mean, "mean"), (std, "std")))
        if np.any(self.std <= 0):
            raise ValueError(f"std must be > 0, got {self.std.tolist()}")
        if np.any(self.lower > self.upper):
            raise ValueError(f"lower {self.lower.tolist()} is above upper {self.upper.tolist()}")

    @staticmethod
    def _values(value: float | Sequence[float], name: str) -> np.ndarray:
        arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
        if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be a finite number or a list of numbers, got {value!r}")
        return arr

    def _per_channel(self, values: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        if values.size not in (1, x.shape[0]):
            raise ValueError(f"ClipZScore has {values.size} values per statistic but the image has {x.shape[0]} channels")
        return torch.as_tensor(values, dtype=torch.float64, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))

    def __call__(self, data: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        x = _as_tensor(data)
        _check_channel_first(x, "ClipZScore")
        lo, hi, mean, std = (self._per_channel(v, x) for v in (self.lower, self.upper, self.mean, self.std))
        x64 = torch.minimum(torch.maximum(x.to(torch.float64), lo), hi)
        out = ((x64 - mean) / std).to(torch.float32)
        return convert_to_dst_type(out, data, dtype=torch.float32)[0]


class SwapSpatialAxes(Transform):
    """Swap two spatial axes; the affine is updated so voxels keep their RAS positions.

    SegFormer3D's BraTS pipeline ends with ``swapaxes(1, 3)`` on (C, x, y, z) after RAS
    orientation, so the network sees (C, z, y, x): ``SwapSpatialAxes(axes=(0, 2))`` after
    ``Orientation("RAS")`` reproduces it. ``inverse`` swaps a network output back.

    Args:
        axes: the two spatial axes (0-based, channel not counted).

    (C, A, B, D) -> (C, D, B, A) for ``axes=(0, 2)``.
    """

    def __init__(self, axes: Sequence[int] = (0, 2)) -> None:
        axes = tuple(int(a) for a in axes)
        if len(axes) != 2 or axes[0] == axes[1] or min(axes) < 0:
            raise ValueError(f"axes must be two different non-negative spatial axes, got {axes}")
        self.axes = axes

    def _swap(self, data: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        x = _as_tensor(data)
        _check_channel_first(x, "SwapSpatialAxes")
        a, b = self.axes
        if max(a, b) >= x.ndim - 1:
            raise ValueError(f"axes {self.axes} are out of range for {x.ndim - 1} spatial axes")
        out = convert_to_dst_type(x.transpose(a + 1, b + 1).contiguous(), data)[0]
        if isinstance(data, MetaTensor):
            # voxel (.., i_a, .., i_b, ..) moved to (.., i_b, .., i_a, ..): swap the affine's columns.
            affine = data.affine.clone()
            affine[:, [a, b]] = affine[:, [b, a]]
            out.affine = affine
        return out

    def __call__(self, data: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        return self._swap(data)

    def inverse(self, data: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Swap the same axes of a (C', ...) network output back (a swap is its own inverse)."""
        return self._swap(data)
