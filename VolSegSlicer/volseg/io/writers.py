"""Writing results on exactly the grid of the input (shape, spacing, origin, direction).

Every writer goes through :func:`~volseg.io.atomic.atomic_output`: nothing is written over an
existing file without ``overwrite=True`` and an interrupted write leaves no partial file.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from volseg.errors import OutputError, output_error
from volseg.io.atomic import atomic_output, atomic_outputs, full_suffix
from volseg.io.outputs import (  # noqa: F401  (re-exported: the writers' rules)
    LABELMAP_SUFFIXES,
    PROBABILITY_SUFFIXES,
    SEGMENTATION_SUFFIXES,
    VOLUME_SUFFIXES,
    check_dicom_reference,
    check_segmentation_output,
    color_table_path,
    segmentation_outputs,
)
from volseg.io.outputs import suffix_in as _suffix_in
from volseg.io.volume import Volume
from volseg.terminology import segment_table, to_slicerio_terminology

#: Columns of Slicer's colour table CSV format (Slicer 5.8+), terminology included.
COLOR_TABLE_COLUMNS = ["LabelValue", "Name", "Color_R", "Color_G", "Color_B", "Color_A"] + [
    f"{part}_{field}"
    for part in ("Category", "Type", "TypeModifier", "Region", "RegionModifier")
    for field in ("CodingScheme", "CodeValue", "CodeMeaning")
]
_TERMINOLOGY_PARTS = ("category", "type", "type_modifier", "region", "region_modifier")

#: gzip level of every file volseg writes. Level 1, not zlib's 9 or ITK's 6: on a noisy 16-class
#: label map of 512x512x100 level 9 spent 4.5 s in zlib (10 s on the H200 machine, most of a run
#: whose network took 0.3 s) and level 1 0.4 s, for files about a third larger.
COMPRESSION_LEVEL = 1


def _itk_image(array: np.ndarray, reference: Volume) -> sitk.Image:
    """A SimpleITK image of ``array`` (I, J, K) on the grid of ``reference``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing([float(v) for v in reference.spacing])
    image.SetOrigin([float(v) for v in reference.origin])
    image.SetDirection([float(v) for v in reference.direction.ravel()])
    return image


def _write_itk(image: sitk.Image, path: Path, shown: Path) -> None:
    """Write ``image`` to ``path`` (a temporary file); errors name ``shown``, the user's file."""
    try:
        sitk.WriteImage(image, str(path), useCompression=True, compressionLevel=COMPRESSION_LEVEL)
    except RuntimeError as error:
        text = str(error)
        if "No space left" in text or "quota" in text.lower():
            raise output_error(OSError(errno.ENOSPC, "No space left on device"), shown) from None
        raise OutputError(f"cannot write {shown}: {text.strip().splitlines()[-1][:300]}") from None


def _checked_labels(labels: np.ndarray, reference: Volume, segments: Sequence[Any]) -> np.ndarray:
    """Validate a label map against its reference grid and labels; return it as uint8/uint16."""
    labels = np.asarray(labels)
    if labels.shape != reference.spatial_shape:
        raise OutputError(f"label map shape {labels.shape} differs from the reference grid {reference.spatial_shape}")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise OutputError(f"label map must hold integers, got {labels.dtype}")
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if low < 0 or high > 65535:
        raise OutputError(f"label values must be within 0..65535, got {low}..{high}")
    known = {int(s.value) for s in segments}
    present = {int(v) for v in np.unique(labels)} - {0}
    unknown = sorted(present - known)
    if unknown:
        raise OutputError(
            f"label value(s) {unknown} in the label map have no label description",
            hint=f"described values: {sorted(known)}",
        )
    return labels.astype(np.uint8 if high < 256 else np.uint16, copy=False)


def _metadata_items(provenance: Mapping[str, Any] | None) -> dict[str, str]:
    """Provenance as flat string fields for file headers (values JSON-encoded unless strings)."""
    items = {}
    for key, value in (provenance or {}).items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        safe_key = re.sub(r"[^A-Za-z0-9_.-]", "_", str(key))
        items[f"VolSeg_{safe_key}"] = text.replace("\r", " ").replace("\n", " ")
    return items


def write_color_table(path: str | os.PathLike, segments: Sequence[Any], *, overwrite: bool = False) -> Path:
    """Write a Slicer colour table (CSV, with terminology columns) describing ``segments``."""
    path = Path(path)
    with atomic_output(path, overwrite) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLOR_TABLE_COLUMNS)
            for label in segments:
                terminology = getattr(label, "terminology", None) or {}
                codes = []
                for part in _TERMINOLOGY_PARTS:
                    code = terminology.get(part) or ["", "", ""]
                    codes.extend(str(c).replace('"', "'") for c in code)
                r, g, b = (int(c) for c in label.color)
                name = str(label.name).replace('"', "'")
                writer.writerow([int(label.value), name, r, g, b, 255, *codes])
    return path


def _write_labelmap(path: Path, labels: np.ndarray, reference: Volume, segments, provenance, overwrite: bool) -> Path:
    image = _itk_image(labels, reference)
    if full_suffix(path).lower() in (".nrrd", ".mha"):
        for key, value in _metadata_items(provenance).items():
            image.SetMetaData(key, value)
    table = color_table_path(path)
    # Both temporary files are written first; neither is committed unless both are complete.
    with atomic_outputs([path, table], overwrite) as (tmp_image, tmp_table):
        _write_itk(image, tmp_image, path)
        write_color_table(tmp_table, segments, overwrite=True)
    return path


def _write_seg_nrrd(path: Path, labels: np.ndarray, reference: Volume, segments, provenance, overwrite: bool) -> Path:
    import slicerio

    shape = labels.shape
    full_extent = [0, shape[0] - 1, 0, shape[1] - 1, 0, shape[2] - 1]
    described = {int(s.value): s for s in segments}
    seg_segments = []
    for row in segment_table(segments):
        segment: dict[str, Any] = {
            "id": row["id"],
            "name": " ".join(row["name"].split()),  # no line breaks in a NRRD header
            "nameAutoGenerated": False,
            "color": [round(c, 6) for c in row["color"]],
            "colorAutoGenerated": False,
            "labelValue": row["value"],
            "layer": 0,
            # Full extent: some Slicer versions crop a shared layer to its first segment's extent.
            "extent": full_extent,
            "status": "completed",
        }
        terminology = getattr(described[row["value"]], "terminology", None)
        if terminology:
            segment["terminology"] = to_slicerio_terminology(terminology)
        seg_segments.append(segment)
    segmentation: dict[str, Any] = {
        "voxels": labels,
        "ijkToLPS": reference.ijk_to_lps,
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap", "Closed surface"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": seg_segments,
    }
    segmentation.update(_metadata_items(provenance))
    with atomic_output(path, overwrite) as tmp:
        slicerio.write_segmentation(str(tmp), segmentation, compression_level=COMPRESSION_LEVEL)
    return path


def write_segmentation(
    path: str | os.PathLike,
    labels: np.ndarray,
    reference: Volume,
    segments: Sequence[Any],
    *,
    overwrite: bool = False,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a label map on the grid of ``reference``; the extension chooses the format.

    - ``.seg.nrrd``: Slicer segmentation (slicerio), one segment per entry of ``segments`` with
      its name, colour and terminology; provenance in ``VolSeg_*`` header fields.
    - ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``: label map (uint8, or uint16 when a value
      exceeds 255) plus a Slicer colour table ``<stem>.csv`` with names, colours, terminology.
    - ``.dcm``: DICOM SEG referencing the source series (only for a DICOM-series reference).

    Args:
        path: output file.
        labels: (I, J, K) integer label map, 0 = background.
        reference: the input volume whose grid the labels are on.
        segments: label descriptions (``value``, ``name``, ``color``, ``terminology``).
        overwrite: replace existing files.
        provenance: run metadata (model, versions, ...).

    Returns:
        ``path``.

    Raises:
        OutputError: unknown extension, existing file without ``overwrite``, unwritable
            folder, label map not matching the grid or the labels, DICOM SEG without DICOM input.
    """
    path = Path(path)
    suffix = _suffix_in(path, SEGMENTATION_SUFFIXES, "a segmentation")
    segments = list(segments)
    labels = _checked_labels(labels, reference, segments)
    if suffix == ".seg.nrrd":
        return _write_seg_nrrd(path, labels, reference, segments, provenance, overwrite)
    if suffix == ".dcm":
        from volseg.io.dicom_seg import write_dicom_seg

        check_dicom_reference(reference)
        if not segments:
            raise OutputError("a DICOM SEG needs at least one label description")
        with atomic_output(path, overwrite) as tmp:
            write_dicom_seg(tmp, labels, reference, segments, provenance)
        return path
    return _write_labelmap(path, labels, reference, segments, provenance, overwrite)


def write_probabilities(
    path: str | os.PathLike, probs: np.ndarray, reference: Volume, *, overwrite: bool = False,
    channel_names: Sequence[str] | None = None,
) -> Path:
    """Write per-class probabilities (C, I, J, K) as a 4D float32 image, channels last.

    NIfTI (``.nii``, ``.nii.gz``; affine = the reference's ijk->RAS, sform and qform) or NRRD
    (``.nrrd``; a ``list`` axis after the three spatial ``domain`` axes).

    ``channel_names`` (one per channel, e.g. :meth:`volseg.cards.ModelCard.channel_names`) are
    stored in the file: NRRD key/value fields ``VolSeg_channel_names`` (a JSON list) and
    ``VolSeg_channel<N>_name``; in NIfTI a JSON header extension (code 6, "comment")
    ``{"volseg_channel_names": [...]}``, the intent name ``probabilities`` and the names in
    ``descrip`` as far as its 80 characters go.
    """
    path = Path(path)
    suffix = _suffix_in(path, PROBABILITY_SUFFIXES, "probabilities")
    probs = np.asarray(probs)
    if probs.ndim != 4 or tuple(probs.shape[1:]) != reference.spatial_shape:
        raise OutputError(
            f"probabilities must be (C, I, J, K) with (I, J, K) = {reference.spatial_shape}, got {probs.shape}"
        )
    names = [str(n) for n in channel_names] if channel_names is not None else None
    if names is not None and len(names) != probs.shape[0]:
        raise OutputError(f"{len(names)} channel names for {probs.shape[0]} probability channels")
    data = np.ascontiguousarray(np.moveaxis(probs.astype(np.float32, copy=False), 0, -1))
    with atomic_output(path, overwrite) as tmp:
        if suffix == ".nrrd":
            import nrrd

            directions = np.vstack([(reference.direction * reference.spacing).T, np.full(3, np.nan)])
            header = {
                "type": "float",
                "space": "left-posterior-superior",
                "space directions": directions,
                "space origin": reference.origin,
                "kinds": ["domain", "domain", "domain", "list"],
                "encoding": "gzip",
            }
            if names is not None:
                header["VolSeg_channel_names"] = json.dumps(names)
                header.update({f"VolSeg_channel{n}_name": " ".join(name.split()) for n, name in enumerate(names)})
            nrrd.write(str(tmp), data, header, index_order="F", compression_level=COMPRESSION_LEVEL)
        else:
            import nibabel as nib

            affine = reference.ijk_to_ras
            image = nib.Nifti1Image(data, affine)
            image.header.set_xyzt_units("mm")
            image.header.set_sform(affine, code="scanner")
            image.header.set_qform(affine, code="scanner")
            if names is not None:
                image.header.extensions.append(
                    nib.nifti1.Nifti1Extension("comment", json.dumps({"volseg_channel_names": names}).encode()))
                image.header["intent_name"] = b"probabilities"
                image.header["descrip"] = ("channels: " + ", ".join(names)).encode("ascii", "replace")[:79]
            nib.save(image, str(tmp))
    return path


def write_volume(path: str | os.PathLike, vol: Volume, *, overwrite: bool = False) -> Path:
    """Write a scalar volume ((I, J, K) or (1, I, J, K)) on its own grid (NIfTI, NRRD or MHA)."""
    path = Path(path)
    _suffix_in(path, VOLUME_SUFFIXES, "a volume")
    array = vol.array
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise OutputError(
                f"write_volume writes one channel; got {array.shape[0]} channels", hint="write each channel separately"
            )
        array = array[0]
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = _itk_image(array, vol)
    with atomic_output(path, overwrite) as tmp:
        _write_itk(image, tmp, path)
    return path
