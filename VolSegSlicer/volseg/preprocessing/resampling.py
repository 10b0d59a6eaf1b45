"""Resampling one voxel grid onto another in torch, on the device the data is on, in float32.

Both ways through a card's ``Spacing`` use it: the way in (the volume onto the network's
spacing, :mod:`volseg.preprocessing.on_device`) and the way back (class probabilities onto the
input grid, :mod:`volseg.postprocessing.export_prediction`).

A grid mapping is the 4x4 matrix ``M`` taking a destination voxel index to the source voxel
index it samples (``inv(src_affine) @ dst_affine``, voxel centres at integer indices, as MONAI's
``SpatialResample`` with ``align_corners=False``).

* **Axis-aligned** mappings (each destination axis reads one source axis: permutations, flips,
  scale and shift -- what ``Spacing`` and ``Orientation`` produce, also for oblique volumes,
  whose direction ``Spacing`` keeps) are resampled separably: one 1-D interpolation per axis.
  Linear interpolation is two taps per output sample (index + weight, float32); a spline of
  order ``k`` (scipy's ``map_coordinates``, as MONAI uses for integer modes) is one dense
  ``(m, n)`` matrix per axis, built by running scipy itself on the columns of the identity, so
  its prefilter and boundary rules are scipy's exactly, then applied as a float32 matmul.
* **Oblique** mappings use ``grid_sample`` on slabs of the destination with a float32 grid
  (linear only).

Destinations are produced in slabs along their first axis, so a caller bounds the temporaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["AxisMap", "GridResampler", "UnsupportedResampling", "axis_aligned", "axis_matrix", "linear_taps"]

#: An off-diagonal entry of a grid mapping below this (in voxels per voxel) counts as zero.
AXIS_TOL = 1e-6

#: MONAI's torch padding modes and the scipy modes its integer (spline) modes translate them to.
_SCIPY_MODES = {"border": "nearest", "zeros": "grid-constant", "reflection": "reflect"}


class UnsupportedResampling(ValueError):
    """This combination of mode / padding / mapping has no torch fast path (the caller falls back)."""


@dataclass(frozen=True)
class AxisMap:
    """Destination axis ``d`` samples source axis ``source`` at ``scale * index + shift``."""

    source: int
    scale: float
    shift: float

    def coords(self, n_out: int, start: int = 0) -> np.ndarray:
        """Source coordinates (float64) of destination indices ``start .. start + n_out - 1``."""
        return self.scale * np.arange(start, start + n_out, dtype=np.float64) + self.shift


def axis_aligned(mapping: np.ndarray, tol: float = AXIS_TOL) -> list[AxisMap] | None:
    """The per-axis form of a 4x4 (3-D) grid mapping, or None when it is oblique."""
    m = np.asarray(mapping, dtype=np.float64)
    out = []
    used = set()
    for d in range(3):
        column = m[:3, d]
        s = int(np.argmax(np.abs(column)))
        if abs(column[s]) < tol or s in used or np.any(np.abs(np.delete(column, s)) > tol):
            return None
        used.add(s)
        out.append(AxisMap(s, float(column[s]), float(m[s, 3])))
    return out


@dataclass(frozen=True)
class Taps:
    """A 1-D linear interpolation: output ``r`` = ``sum_k weight[r, k] * source[index[r, k]]``."""

    index: torch.Tensor  # (m, 2) int64
    weight: torch.Tensor  # (m, 2) float32


def linear_taps(coords: np.ndarray, n: int, padding: str) -> tuple[np.ndarray, np.ndarray]:
    """Two taps per coordinate, as ``grid_sample`` (``align_corners=False``) computes them.

    Args:
        coords: (m,) source coordinates, float64, voxel centres at integers.
        n: source length.
        padding: ``"border"`` (coordinates clamped to [0, n-1]) or ``"zeros"`` (samples outside
            read 0).

    Returns:
        index (m, 2) int64 and weight (m, 2) float64.
    """
    x = np.asarray(coords, dtype=np.float64)
    if padding == "border":
        x = np.clip(x, 0.0, n - 1.0)
    elif padding != "zeros":
        raise UnsupportedResampling(f"padding {padding!r} has no separable fast path")
    lo = np.floor(x)
    frac = x - lo
    lo = lo.astype(np.int64)
    index = np.stack([lo, lo + 1], axis=1)
    weight = np.stack([1.0 - frac, frac], axis=1)
    outside = (index < 0) | (index > n - 1)
    weight[outside] = 0.0
    index = np.clip(index, 0, n - 1)
    return index, weight


def axis_matrix(coords: np.ndarray, n: int, order: int, mode: str) -> np.ndarray:
    """The (m, n) float64 matrix of scipy's spline interpolation of ``order`` at ``coords``.

    Built column by column from scipy's ``map_coordinates`` on the unit vectors, so every detail
    of its prefilter and boundary handling (``mode``) is scipy's own; entries below 1e-9 of a
    row's largest are dropped (the spline prefilter's response decays by 0.27 per voxel).
    """
    from scipy import ndimage

    x = np.asarray(coords, dtype=np.float64)[None]
    w = np.empty((x.shape[1], n), dtype=np.float64)
    unit = np.zeros(n, dtype=np.float64)
    for j in range(n):
        unit[j] = 1.0
        w[:, j] = ndimage.map_coordinates(unit, x, order=order, mode=mode, prefilter=order > 1)
        unit[j] = 0.0
    w[np.abs(w) < 1e-9 * np.abs(w).max(axis=1, keepdims=True).clip(min=1e-30)] = 0.0
    return w


class _AxisOp:
    """One 1-D resampling of a source axis of length ``n`` onto ``m`` samples (taps or a matrix)."""

    def __init__(self, coords: np.ndarray, n: int, mode: str | int, padding: str, device: torch.device) -> None:
        self.n, self.m = n, len(coords)
        if isinstance(mode, int) and not isinstance(mode, bool) and mode > 1:
            scipy_mode = _SCIPY_MODES.get(padding, padding)
            w = axis_matrix(coords, n, mode, scipy_mode)
            nonzero = w != 0
            any_row = nonzero.any(axis=1)
            self._row_lo = np.where(any_row, nonzero.argmax(axis=1), n)
            self._row_hi = np.where(any_row, n - nonzero[:, ::-1].argmax(axis=1), 0)
            self.matrix = torch.as_tensor(w, dtype=torch.float32, device=device)
            self.index = self.weight = None
            return
        if mode in ("bilinear", 1):
            index, weight = linear_taps(coords, n, padding)
        else:
            raise UnsupportedResampling(f"interpolation mode {mode!r} has no separable fast path")
        self.matrix = None
        self._index_np = index
        self.index = torch.as_tensor(index, device=device)
        self.weight = torch.as_tensor(weight, dtype=torch.float32, device=device)
        # the same interpolation as a (sparse, banded) matrix, for the contiguous last axis, where
        # gathering single floats is slow and a matmul over each block's band is not
        dense = np.zeros((self.m, n), dtype=np.float64)
        np.add.at(dense, (np.repeat(np.arange(self.m), index.shape[1]), index.ravel()), weight.ravel())
        self._row_lo, self._row_hi = index.min(axis=1), index.max(axis=1) + 1
        self.band = torch.as_tensor(dense, dtype=torch.float32, device=device)

    def source_range(self, rows: slice) -> tuple[int, int]:
        """The source indices ``[lo, hi)`` the output rows ``rows`` read."""
        lo, hi = int(self._row_lo[rows].min()), int(self._row_hi[rows].max())
        return (lo, hi) if hi > lo else (0, 1)

    @property
    def linear(self) -> bool:
        return self.matrix is None

    def apply(self, x: torch.Tensor, dim: int, rows: slice | None = None, offset: int = 0) -> torch.Tensor:
        """Resample dimension ``dim`` of ``x`` (which holds source indices ``offset ..``) onto ``rows``."""
        rows = rows or slice(0, self.m)
        if self.matrix is not None:
            return self._banded_matmul(x, dim, rows, offset, self.matrix)
        if dim == x.ndim - 1:
            return self._banded_matmul(x, dim, rows, offset, self.band)
        index = self.index[rows] - offset
        weight = self.weight[rows]
        shape = [1] * x.ndim
        shape[dim] = -1
        lead = (slice(None),) * dim
        out = x[lead + (index[:, 0],)]  # advanced indexing: a block copy, faster than index_select
        out.mul_(weight[:, 0].reshape(shape))
        for k in range(1, index.shape[1]):
            out.addcmul_(x[lead + (index[:, k],)], weight[:, k].reshape(shape))
        return out

    def extremes(self, lmin: torch.Tensor, lmax: torch.Tensor, dim: int, rows: slice | None = None,
                 offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest and largest value over each output sample's taps (every tap, even weight 0)."""
        rows = rows or slice(0, self.m)
        index = self.index[rows] - offset
        lead = (slice(None),) * dim
        lo, hi = lmin[lead + (index[:, 0],)], lmax[lead + (index[:, 0],)]
        for k in range(1, index.shape[1]):
            lo = torch.minimum(lo, lmin[lead + (index[:, k],)])
            hi = torch.maximum(hi, lmax[lead + (index[:, k],)])
        return lo, hi

    def _banded_matmul(self, x: torch.Tensor, dim: int, rows: slice, offset: int, matrix: torch.Tensor,
                       block: int = 64) -> torch.Tensor:
        """``matrix``'s rows ``rows`` times ``x`` along ``dim``, block by block of output rows over
        the columns each block reads (the band), as (batched) matmuls."""
        shape = list(x.shape)
        a, n, b = int(np.prod(shape[:dim])), shape[dim], int(np.prod(shape[dim + 1:]))
        last = b == 1
        xv = x.reshape(a, n) if last else x.reshape(a, n, b)
        pieces = []
        for r0 in range(rows.start, rows.stop, block):
            r1 = min(rows.stop, r0 + block)
            c0, c1 = self.source_range(slice(r0, r1))
            c0, c1 = max(c0 - offset, 0), min(c1 - offset, n)
            w = matrix[r0:r1, offset + c0:offset + c1]
            pieces.append(xv[:, c0:c1] @ w.T if last else torch.matmul(w, xv[:, c0:c1, :]))
        out = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        shape[dim] = rows.stop - rows.start
        return out.reshape(shape)


class GridResampler:
    """Resample (C, *src_shape) float tensors onto slabs of a (C, *dst_shape) grid.

    Args:
        mapping: 4x4 destination-index -> source-index matrix.
        src_shape, dst_shape: the two spatial shapes.
        mode: ``"bilinear"`` or an integer spline order (as MONAI's ``mode``; ``"nearest"`` has
            no fast path: its ties at half voxels depend on the grid's rounding).
        padding: MONAI's padding mode (``"border"``, ``"zeros"``; for splines also scipy's names).
        device: where the interpolation tables live (the data's device).

    Raises:
        UnsupportedResampling: for a combination without a fast path (oblique splines, reflection).
    """

    def __init__(self, mapping: np.ndarray, src_shape: Sequence[int], dst_shape: Sequence[int],
                 mode: str | int, padding: str, device: torch.device) -> None:
        self.mapping = np.asarray(mapping, dtype=np.float64)
        self.src_shape, self.dst_shape = tuple(int(s) for s in src_shape), tuple(int(s) for s in dst_shape)
        self.mode, self.padding, self.device = mode, padding, device
        self.axes = axis_aligned(self.mapping)
        if self.axes is None:
            if mode not in ("bilinear", 1) or padding not in ("border", "zeros", "reflection"):
                raise UnsupportedResampling(f"oblique resampling with mode {mode!r} has no torch fast path")
            self.ops = None
            return
        self.ops = [_AxisOp(a.coords(self.dst_shape[d]), self.src_shape[a.source], mode, padding, device)
                    for d, a in enumerate(self.axes)]

    @property
    def separable(self) -> bool:
        return self.axes is not None

    def bytes_per_slab_voxel(self, channels: int) -> int:
        """Temporaries per destination voxel of a slab (a bound, for sizing slabs)."""
        return channels * 4 * (4 if self.separable else 2) + (0 if self.separable else 12)

    def slab(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """(C, *src_shape) -> (C, rows, dst_shape[1], dst_shape[2]), float32, on ``x``'s device."""
        if x.dtype != torch.float32:
            x = x.float()
        if not self.separable:
            return self._oblique(x, rows)
        first = self.axes[0]
        lo, hi = self.ops[0].source_range(rows)
        part = x.narrow(1 + first.source, lo, hi - lo)
        # the other two destination axes first, cheaper one (fewer output samples per input) first
        rest = sorted((1, 2), key=lambda d: self.ops[d].m / max(1, self.ops[d].n))
        for d in rest:
            part = self.ops[d].apply(part, 1 + self.axes[d].source)
        part = self.ops[0].apply(part, 1 + first.source, rows, offset=lo)
        order = [0] + [1 + a.source for a in self.axes]
        return part if order == [0, 1, 2, 3] else part.permute(order).contiguous()

    @property
    def convex(self) -> bool:
        """Each destination value is a convex combination of its source cell's 2x2x2 values
        (separable linear interpolation with border padding): a class that wins at every corner
        of the cell wins there too."""
        return self.separable and self.padding == "border" and all(op.linear for op in self.ops)

    def cell_extremes(self, labels: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(*src_shape) integer ``labels`` -> their smallest and largest over the source cell of each
        destination voxel in ``rows``: two (rows, d1, d2) tensors (only for :attr:`convex` mappings)."""
        first = self.axes[0]
        lo, hi = self.ops[0].source_range(rows)
        lmin = lmax = labels.narrow(first.source, lo, hi - lo)
        for d in (1, 2):
            lmin, lmax = self.ops[d].extremes(lmin, lmax, self.axes[d].source)
        lmin, lmax = self.ops[0].extremes(lmin, lmax, first.source, rows, offset=lo)
        order = [a.source for a in self.axes]
        if order != [0, 1, 2]:
            lmin, lmax = lmin.permute(order), lmax.permute(order)
        return lmin, lmax

    def point_values(self, values_last: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """(*src_shape, C) channels-last values -> (N, C): the interpolated values at ``points``
        (N, 3) destination indices (trilinear from the 2x2x2 cell; only for :attr:`convex` mappings).
        Channels last, so each corner is one contiguous row to gather."""
        src = self.src_shape
        strides = (src[1] * src[2], src[2], 1)
        n = points.shape[0]
        flat = torch.zeros((n, 1, 1, 1), dtype=torch.int64, device=points.device)
        weight = torch.ones((n, 1, 1, 1), dtype=torch.float32, device=points.device)
        for d, a in enumerate(self.axes):
            shape = [-1, 1, 1, 1]
            shape[1 + d] = 2
            flat = flat + (self.ops[d].index[points[:, d]] * strides[a.source]).reshape(shape)
            weight = weight * self.ops[d].weight[points[:, d]].reshape(shape)
        channels = values_last.shape[-1]
        corners = values_last.reshape(-1, channels)[flat.reshape(-1)].reshape(n, 8, channels)
        return torch.bmm(weight.reshape(n, 1, 8), corners)[:, 0]

    def _oblique(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        n_rows = rows.stop - rows.start
        _, d1, d2 = self.dst_shape
        dev = x.device
        m = torch.as_tensor(self.mapping, dtype=torch.float64, device=dev)
        i = torch.arange(rows.start, rows.stop, dtype=torch.float64, device=dev)
        j = torch.arange(d1, dtype=torch.float64, device=dev)
        k = torch.arange(d2, dtype=torch.float64, device=dev)
        grid = torch.empty((n_rows, d1, d2, 3), dtype=torch.float32, device=dev)
        for out_axis, src_axis in enumerate((2, 1, 0)):  # grid_sample wants (x=W=K, y=H=J, z=D=I)
            coord = (m[src_axis, 0] * i[:, None, None] + m[src_axis, 1] * j[None, :, None]
                     + m[src_axis, 2] * k[None, None, :] + m[src_axis, 3])
            n = self.src_shape[src_axis]
            grid[..., out_axis] = ((2.0 * coord + 1.0) / n - 1.0).float()
        out = torch.nn.functional.grid_sample(x[None], grid[None], mode="bilinear", padding_mode=self.padding,
                                              align_corners=False)
        return out[0]

    def __call__(self, x: torch.Tensor, slab_rows: int | None = None) -> torch.Tensor:
        """The whole destination grid, made slab by slab (``slab_rows`` rows at a time)."""
        n0 = self.dst_shape[0]
        step = slab_rows or n0
        out = torch.empty((x.shape[0], *self.dst_shape), dtype=torch.float32, device=x.device)
        for start in range(0, n0, step):
            rows = slice(start, min(n0, start + step))
            out[:, rows] = self.slab(x, rows)
        return out
