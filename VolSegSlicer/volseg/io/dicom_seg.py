"""Writing a label map as a DICOM Segmentation (SEG) object that references its source series.

Built with highdicom: one SEG segment per model label, coded with the label's terminology
(category, type, type modifier, anatomic region and modifier), the algorithm named from the
run's provenance, and frames aligned one to one with the source DICOM slices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volseg.errors import OutputError
from volseg.io.volume import Volume

#: Used when a label has no terminology: DICOM SEG requires a category and a type.
DEFAULT_TERMINOLOGY = {
    "category": ["SCT", "85756007", "Tissue"],
    "type": ["SCT", "85756007", "Tissue"],
}


def _concept(code: Sequence[str]):
    from highdicom.sr import CodedConcept

    scheme, value, meaning = (str(part) for part in code)
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def algorithm_name_and_version(provenance: Mapping[str, Any] | None) -> tuple[str, str]:
    """The algorithm name and version recorded in a SEG, taken from the run's provenance.

    Looks for ``algorithm_name`` / ``model_name`` / ``model`` / ``model_id`` and
    ``algorithm_version`` / ``model_version`` / ``volseg_version`` / ``version`` in that order.
    """
    provenance = provenance or {}

    def first(*keys: str, default: str) -> str:
        for key in keys:
            if provenance.get(key):
                return str(provenance[key])[:64]
        return default

    name = first("algorithm_name", "model_name", "model", "model_id", default="VolSeg")
    version = first("algorithm_version", "model_version", "volseg_version", "version", default=_volseg_version())
    return name, version


def _volseg_version() -> str:
    try:
        from importlib.metadata import version

        return version("volseg")
    except Exception:
        return "unknown"


def _segment_description(number: int, label: Any, algorithm: Any):
    import highdicom as hd

    terminology = getattr(label, "terminology", None) or DEFAULT_TERMINOLOGY
    segment_type = _concept(terminology["type"])
    if terminology.get("type_modifier"):
        segment_type.SegmentedPropertyTypeModifierCodeSequence = [_concept(terminology["type_modifier"])]
    regions = None
    if terminology.get("region"):
        region = _concept(terminology["region"])
        if terminology.get("region_modifier"):
            region.AnatomicRegionModifierSequence = [_concept(terminology["region_modifier"])]
        regions = [region]
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=str(label.name)[:64],
        segmented_property_category=_concept(terminology["category"]),
        segmented_property_type=segment_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=regions,
    )
    try:
        r, g, b = (int(c) for c in label.color)
        description.RecommendedDisplayCIELabValue = list(hd.color.CIELabColor.from_rgb(r, g, b).value)
    except (AttributeError, ValueError, TypeError):
        pass  # older highdicom without colour helpers: the colour is optional in DICOM SEG
    return description


def write_dicom_seg(
    path: str | Path,
    labels: np.ndarray,
    reference: Volume,
    segments: Sequence[Any],
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``labels`` (I, J, K) on the grid of a DICOM-series ``reference`` as a DICOM SEG file.

    Args:
        path: file to write (the caller handles atomicity and overwrite checks).
        labels: (I, J, K) integer label map; values are the ``value`` of ``segments``.
        reference: the volume read from the DICOM series (``reference.source.dicom_files``).
        segments: labels with ``value``, ``name``, ``color`` and ``terminology`` attributes.
        provenance: run metadata; the algorithm name/version come from it.

    Raises:
        OutputError: the reference is not a DICOM series, its files cannot be read, or the
            label map does not match the series.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    source = reference.source
    if source is None or not source.dicom_files:
        raise OutputError(
            "a DICOM SEG output needs a DICOM series as input",
            hint="read the input from a DICOM folder, or write .seg.nrrd / .nii.gz instead",
        )
    try:
        datasets = [pydicom.dcmread(str(f)) for f in source.dicom_files]
    except Exception as error:
        raise OutputError(f"cannot re-read the source DICOM files for the SEG: {error}") from None
    i, j, k = labels.shape
    rows, columns = int(datasets[0].Rows), int(datasets[0].Columns)
    if (columns, rows, len(datasets)) != (i, j, k):
        raise OutputError(
            f"label map shape {labels.shape} does not match the DICOM series "
            f"({columns} columns x {rows} rows x {len(datasets)} slices)"
        )
    ordered = list(segments)
    # DICOM SEG numbers segments 1..N: map label values onto segment numbers.
    lookup = np.zeros(int(max(int(s.value) for s in ordered)) + 1, dtype=np.uint16)
    for number, label in enumerate(ordered, start=1):
        lookup[int(label.value)] = number
    # (I, J, K) -> frames (K) of rows (J) x columns (I), in the order of the source files.
    pixel_array = lookup[labels].transpose(2, 1, 0)
    pixel_array = pixel_array.astype(np.uint8 if len(ordered) < 256 else np.uint16)

    name, version = algorithm_name_and_version(provenance)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=name, family=codes.cid7162.ArtificialIntelligence, version=version
    )
    descriptions = [_segment_description(n, label, algorithm) for n, label in enumerate(ordered, start=1)]
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(getattr(datasets[0], "SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="VolSegSlicer",
            manufacturer_model_name=name,
            software_versions=f"volseg {_volseg_version()}",
            device_serial_number="0",
            series_description=f"{name} segmentation"[:64],
            omit_empty_frames=bool(pixel_array.any()),
        )
    except (ValueError, TypeError, AttributeError) as error:
        raise OutputError(f"cannot build the DICOM SEG from the source series: {error}") from None
    seg.save_as(str(path))
    return Path(path)
