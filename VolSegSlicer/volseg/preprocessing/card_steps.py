"""Preprocessing from a model card, and its inversion onto the input grid.

A card lists transforms by name (``volseg.preprocessing.transforms`` first, then ``monai.transforms``) with
their keyword arguments. They run in order on a MONAI ``MetaTensor`` of shape (C, I, J, K)
whose affine maps voxel indices to RAS millimetres. Spatial transforms are inverted afterwards
on the network output, newest first: MONAI's invertible transforms through the operations they
recorded on the tensor, volseg's through their own ``inverse``.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, Transform

from volseg.errors import InputError, ModelCardError

_SEARCH_MODULES = ("volseg.preprocessing.transforms", "monai.transforms")
#: Only transforms that change the image may come from a card: spatial, intensity and crop/pad
#: transforms. Cards are data users download; transforms that read or write files (SaveImage,
#: LoadImage) or run arbitrary callables (Lambda) are refused, as pickled code in checkpoints is.
_ALLOWED_MONAI_MODULES = (
    "monai.transforms.spatial.array",
    "monai.transforms.intensity.array",
    "monai.transforms.croppad.array",
)


def _allowed(cls: type) -> bool:
    return cls.__module__.startswith("volseg.preprocessing.transforms") or cls.__module__ in _ALLOWED_MONAI_MODULES


def resolve_transform(name: str) -> type:
    """The transform class a card's ``name`` refers to (spatial, intensity or crop/pad only)."""
    for module_name in _SEARCH_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, name, None)
        if isinstance(cls, type) and issubclass(cls, Transform):
            if not _allowed(cls):
                raise ModelCardError(
                    f"preprocessing transform {name!r} is not allowed in a model card",
                    hint="cards may use spatial, intensity and crop/pad transforms only; "
                    "transforms that read or write files or run code are refused",
                )
            return cls
    raise ModelCardError(
        f"unknown preprocessing transform {name!r}",
        hint="use a MONAI array transform (e.g. Spacing, Orientation, ScaleIntensityRange, CropForeground) "
        "or a volseg transform (PerSliceMinMax, ClipZScore, SwapSpatialAxes)",
    )


def build_transforms(steps: Sequence[Mapping[str, Any]]) -> list[Transform]:
    """Instantiate the card's preprocessing steps, with a clear error for bad arguments."""
    transforms = []
    for n, step in enumerate(steps):
        cls = resolve_transform(step["name"])
        args = dict(step.get("args", {}))
        try:
            with warnings.catch_warnings():  # MONAI's deprecation notices about its own defaults are not the user's concern
                warnings.simplefilter("ignore", FutureWarning)
                transforms.append(cls(**args))
        except (TypeError, ValueError) as exc:
            raise ModelCardError(
                f"preprocessing step {n} ({step['name']}) has invalid arguments {args}: {exc}",
                hint=f"check the arguments of {cls.__module__}.{cls.__name__}",
            ) from None
    return transforms


@dataclass
class Preprocessed:
    """The network input and what is needed to map the output back."""

    image: MetaTensor  # (C, I', J', K')
    transforms: list[Transform]
    input_shape: tuple[int, int, int]


def to_metatensor(array: np.ndarray, ijk_to_ras: np.ndarray) -> MetaTensor:
    """Wrap a (C, I, J, K) array as a MetaTensor with its ijk->RAS affine."""
    return MetaTensor(torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32)),
                      affine=torch.as_tensor(ijk_to_ras, dtype=torch.float64), meta={"space": "RAS"})


def preprocess(array: np.ndarray, ijk_to_ras: np.ndarray, steps: Sequence[Mapping[str, Any]],
               device: torch.device | None = None) -> Preprocessed:
    """Apply the card's steps to a (C, I, J, K) array.

    ``device`` None: MONAI's exact path on the CPU (float64 resampling). A device (``cuda``, or
    ``cpu`` for the same fast path there): the volume goes there once and every step runs there,
    ``Spacing`` as float32 separable resampling (:mod:`volseg.preprocessing.on_device`).
    """
    transforms = build_transforms(steps)
    if device is None:
        image = to_metatensor(array, ijk_to_ras)
    else:
        from volseg.preprocessing.on_device import run_step, to_device

        image = to_device(array, ijk_to_ras, device)
    for t in transforms:
        try:
            image = t(image) if device is None else run_step(t, image)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise ModelCardError(f"preprocessing step {type(t).__name__} failed on this volume: {exc}") from None
        if min(image.shape[1:]) == 0:
            raise InputError(
                f"preprocessing step {type(t).__name__} left nothing of the volume (grid {tuple(image.shape[1:])})",
                hint="for example CropForeground found no foreground: check that the input is the modality "
                "and intensity range the model expects",
            )
    if not isinstance(image, MetaTensor):  # a transform returned a plain tensor: keep the affine chain usable
        image = MetaTensor(torch.as_tensor(image))
    return Preprocessed(image.float(), transforms, tuple(array.shape[1:]))


def invert_partial(output: torch.Tensor, pre: Preprocessed, keep_first: int = 0,
                   device: torch.device | None = None) -> MetaTensor:
    """Undo every preprocessing step but the first ``keep_first`` (newest first) on a copy of the
    recorded operations; the result still carries the kept steps' records. Runs on ``device``
    (default: the CPU), where MONAI's inverses (crop -> pad, orientation -> flips) work alike."""
    out = MetaTensor(output.float().to(device or torch.device("cpu")))
    out.copy_meta_from(pre.image, copy_attr=True)
    out.applied_operations = copy.deepcopy(pre.image.applied_operations)
    for t in reversed(pre.transforms[keep_first:]):
        if isinstance(t, InvertibleTransform) or hasattr(t, "inverse"):
            out = t.inverse(out)
    return out


def invert(output: torch.Tensor, pre: Preprocessed) -> torch.Tensor:
    """Map a network output (C', I', J', K') on the preprocessed grid back to the input grid.

    Repeatable: MONAI's inverses consume the operations recorded on the tensor, so each call
    works on its own copy of them and ``pre`` can be inverted again (one class at a time, say).
    """
    result = torch.as_tensor(invert_partial(output, pre)).float()
    if tuple(result.shape[1:]) != pre.input_shape:
        raise RuntimeError(f"inverting the preprocessing gave shape {tuple(result.shape[1:])}, expected {pre.input_shape}")
    return result


def invert_labels_nearest(labelmap: np.ndarray | torch.Tensor, pre: Preprocessed) -> np.ndarray:
    """Map an (I', J', K') label map on the preprocessed grid back to the input grid with
    nearest-neighbour interpolation, as MONAI's ``Invertd(nearest_interp=True)`` does: every
    recorded operation's interpolation mode becomes ``"nearest"`` (and ``align_corners`` unset,
    :func:`monai.transforms.utils.convert_applied_interp_mode`), then the steps are undone newest
    first. Returns the (I, J, K) label map, uint16."""
    from monai.transforms.utils import convert_applied_interp_mode

    values = torch.as_tensor(np.asarray(labelmap), dtype=torch.float32)[None]
    out = MetaTensor(values)
    out.copy_meta_from(pre.image, copy_attr=True)
    out.applied_operations = convert_applied_interp_mode(copy.deepcopy(pre.image.applied_operations),
                                                         mode="nearest", align_corners=None)
    for t in reversed(pre.transforms):
        if isinstance(t, InvertibleTransform) or hasattr(t, "inverse"):
            out = t.inverse(out)
    result = torch.as_tensor(out)[0]
    if tuple(result.shape) != pre.input_shape:
        raise RuntimeError(f"inverting the preprocessing gave shape {tuple(result.shape)}, expected {pre.input_shape}")
    return torch.round(result).numpy().astype(np.uint16)
