"""What a card's preprocessing will allocate, worked out before any step runs.

A card is data from elsewhere: ``Resize`` to 700³ or ``Spacing`` of 0.4 mm turns a small CT into
gigabytes. :func:`plan_preprocessing` follows the steps on shapes and spacings only -- no
voxel is touched, no transform is built -- and gives, for each step, the grid it produces and
the memory it needs at its peak (its input, its output and the resampling grid or float64
temporaries it uses); :func:`check_preprocessing` refuses the first step that would need more
memory than is available, naming it. The pipeline calls it before ``preprocess()``, and checks
the memory of the whole run on the planned final grid then, so that nothing is allocated for a
grid that will be refused.

The shape rules follow MONAI's documented behaviour of each array transform (rounded up, so
the estimate errs on the large side). A transform not listed keeps the shape (intensity
transforms, flips, crops), which is what the allowlisted transforms that are not listed do.

(C, I, J, K) input of ``channels`` channels; all sizes in bytes of float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from volseg.errors import ResourceError
from volseg.memory import check_allocation

Shape = tuple[int, int, int]

#: Steps that resample through a grid of coordinates (3 float32 per output voxel, plus weights).
_RESAMPLING = {"Spacing", "Affine", "Rotate", "Zoom", "Resize", "Resample", "SpatialResample", "ResampleToMatch",
               "RandAffine", "RandRotate", "RandZoom"}
#: Steps that compute in float64 (two temporaries of 8 bytes per voxel).
_FLOAT64 = {"PerSliceMinMax", "ClipZScore", "NormalizeIntensity", "ScaleIntensityRangePercentiles"}
_AXIS_OF = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}


@dataclass(frozen=True)
class StepPlan:
    """One preprocessing step: the grid it gets and gives, and the bytes it needs at its peak."""

    index: int
    name: str
    shape_in: Shape
    shape_out: Shape
    peak_bytes: int


def _triple(value: Any, current: Sequence[float]) -> list[float]:
    """A per-axis value from a card argument: a number for every axis, or a list (entries that
    are missing or not positive keep ``current``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        values = [float(value)] * 3
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        values = [float(v) for v in value[:3]] + [float(value[-1])] * (3 - min(3, len(value)))
    else:
        return list(current)
    return [v if v > 0 else c for v, c in zip(values, current)]


def _spacing(affine: np.ndarray) -> list[float]:
    return [float(np.linalg.norm(affine[:3, i])) or 1.0 for i in range(3)]


def _orientation_order(affine: np.ndarray, axcodes: Any) -> list[int]:
    """For each output axis of MONAI ``Orientation(axcodes)``, the input axis that lands there."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    world_of_input = [int(w) for w in ornt[:, 0]]
    if not isinstance(axcodes, str) or len(axcodes) != 3 or any(c.upper() not in _AXIS_OF for c in axcodes):
        axcodes = "RAS"
    order = []
    for code in axcodes.upper():
        world = _AXIS_OF[code]
        order.append(world_of_input.index(world) if world in world_of_input else len(order))
    return order if sorted(order) == [0, 1, 2] else [0, 1, 2]


def _step_shape(name: str, args: Mapping[str, Any], shape: Shape, spacing: list[float],
                affine: np.ndarray) -> tuple[Shape, list[float], int]:
    """The grid a step gives (and the spacing then), and the voxels of any larger intermediate."""
    s = list(shape)
    if name == "Spacing":
        target = _triple(args.get("pixdim", spacing), spacing)
        # MONAI spans the centres of the first and last voxel: round((n - 1) * old / new) + 1
        out = [math.ceil(round((n - 1) * sp / t, 6)) + 1 for n, sp, t in zip(s, spacing, target)]
        return tuple(out), target, 0
    if name in ("Resize", "ResizeWithPadOrCrop", "SpatialPad", "CenterSpatialCrop", "SpatialCrop", "Affine"):
        key = {"Resize": "spatial_size", "ResizeWithPadOrCrop": "spatial_size", "SpatialPad": "spatial_size",
               "CenterSpatialCrop": "roi_size", "SpatialCrop": "roi_size", "Affine": "spatial_size"}[name]
        size = args.get(key)
        if name == "Resize" and args.get("size_mode") == "longest" and isinstance(size, (int, float)):
            scale = float(size) / max(s)
            out = [max(1, math.ceil(n * scale)) for n in s]
        else:
            out = [int(v) for v in _triple(size, s)] if size is not None else s
        if name == "SpatialPad":
            out = [max(a, b) for a, b in zip(out, s)]
        if name in ("CenterSpatialCrop", "SpatialCrop"):
            out = [min(a, b) for a, b in zip(out, s)]
        new_spacing = [sp * n / o for sp, n, o in zip(spacing, s, out)] if name == "Resize" else spacing
        return tuple(out), new_spacing, 0
    if name == "Zoom":
        zoom = _triple(args.get("zoom", 1.0), [1.0, 1.0, 1.0])
        zoomed = [max(1, math.ceil(n * z)) for n, z in zip(s, zoom)]
        keep = args.get("keep_size", True)
        return (tuple(s) if keep else tuple(zoomed)), [sp / z for sp, z in zip(spacing, zoom)], int(np.prod(zoomed))
    if name == "DivisiblePad":
        k = [int(v) for v in _triple(args.get("k", 1), [1.0, 1.0, 1.0])]
        return tuple(math.ceil(n / kk) * kk for n, kk in zip(s, k)), spacing, 0
    if name == "BorderPad":
        border = args.get("spatial_border", 0)
        if isinstance(border, (list, tuple)) and len(border) == 6 and all(isinstance(b, int) for b in border):
            return tuple(n + border[2 * i] + border[2 * i + 1] for i, n in enumerate(s)), spacing, 0
        return tuple(n + 2 * int(b) for n, b in zip(s, _triple(border, [0.0] * 3))), spacing, 0
    if name == "CropForeground":
        margin = _triple(args.get("margin", 0), [0.0] * 3)
        k = [max(1, int(v)) for v in _triple(args.get("k_divisible", 1), [1.0] * 3)]
        return tuple(math.ceil((n + 2 * int(m)) / kk) * kk for n, m, kk in zip(s, margin, k)), spacing, 0
    if name == "Rotate" and args.get("keep_size", True) is False:
        diagonal = math.ceil(math.sqrt(sum(n * n for n in s)))
        return (diagonal, diagonal, diagonal), spacing, 0
    if name == "Orientation":
        axcodes = "RAS" if args.get("as_closest_canonical") else args.get("axcodes", "RAS")
        order = _orientation_order(affine, axcodes)
        return tuple(s[i] for i in order), [spacing[i] for i in order], 0
    if name == "SwapSpatialAxes":
        axes = args.get("axes", (0, 2))
        if isinstance(axes, (list, tuple)) and len(axes) == 2 and all(isinstance(a, int) and 0 <= a < 3 for a in axes):
            a, b = axes
            s[a], s[b] = s[b], s[a]
            spacing = list(spacing)
            spacing[a], spacing[b] = spacing[b], spacing[a]
        return tuple(s), spacing, 0
    return tuple(s), spacing, 0


def plan_preprocessing(shape: Sequence[int], ijk_to_ras: np.ndarray, steps: Sequence[Mapping[str, Any]],
                       channels: int = 1) -> list[StepPlan]:
    """Each step's grid and peak memory, for an input of ``channels`` x ``shape`` voxels with
    the voxel-to-RAS matrix ``ijk_to_ras`` (see the module docstring). Nothing is allocated."""
    affine = np.asarray(ijk_to_ras, dtype=float)
    current: Shape = tuple(int(n) for n in shape)  # type: ignore[assignment]
    spacing = _spacing(affine)
    plans = []
    for n, step in enumerate(steps):
        name = str(step.get("name", ""))
        args = step.get("args") or {}
        if not isinstance(args, Mapping):
            args = {}
        out, spacing, intermediate = _step_shape(name, args, current, spacing, affine)
        v_in, v_out = math.prod(current), math.prod(out)
        peak = 4 * channels * (v_in + v_out + intermediate)
        if name in _RESAMPLING:
            peak += 4 * 4 * max(v_out, intermediate)  # the coordinate grid (3 per voxel) and a weight
        if name in _FLOAT64:
            peak += 2 * 8 * channels * v_in
        plans.append(StepPlan(n, name, current, out, peak))
        current = out
    return plans


def planned_shape(shape: Sequence[int], plans: Sequence[StepPlan]) -> Shape:
    """The grid the network will get: the last step's output (``shape`` without steps)."""
    return plans[-1].shape_out if plans else tuple(int(n) for n in shape)  # type: ignore[return-value]


def check_preprocessing(plans: Sequence[StepPlan]) -> None:
    """Refuse, before anything runs, the first step that needs more memory than is available.

    Raises:
        ResourceError: naming the step, its grids and the memory it needs.
    """
    for plan in plans:
        try:
            check_allocation(plan.peak_bytes, f"preprocessing step {plan.index} ({plan.name}, grid {plan.shape_in} -> "
                                              f"{plan.shape_out})")
        except ResourceError as exc:
            raise ResourceError(exc.message, hint="the model card's preprocessing makes this grid from this volume: "
                                "check the card's steps (is it from a source you trust?), or crop the volume") from None
