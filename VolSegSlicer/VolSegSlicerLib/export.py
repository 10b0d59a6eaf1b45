"""Export of an (edited) segmentation: label map with colour table, ``.seg.nrrd``.

Exports are in world coordinates: a segmentation under a parent transform is written where it
is shown (the transform hardened on a temporary copy; the scene is not changed). Files are
written atomically and never over an existing file unless ``overwrite`` is given.

Label values: a segment the model made keeps its card value (:data:`~.results.TAG_LABEL_VALUE`);
a segment the user added gets the card value of the label with the same name, or else the next
value above every card value, so the values a downstream tool knows never move.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from VolSegSlicerLib.catalog import segment_rows
from VolSegSlicerLib.mrml import MRMLContext, string_array, volume_array, write_volume_file
from VolSegSlicerLib.results import TAG_LABEL_VALUE, reference_volume, segment_tag, terminology_tag_name

#: Label map formats the export writes (the colour table goes beside it).
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd")


class ExportError(Exception):
    """An export that cannot be done; the message says why. Nothing was written."""


@dataclass(frozen=True)
class ExportedLabel:
    """One segment as it appears in an exported label map."""

    segment_id: str
    value: int
    name: str
    color: tuple[float, float, float]
    terminology_tag: str


def export_labels(segmentation_node: Any, model: Mapping[str, Any] | None = None) -> list[ExportedLabel]:
    """The label value, name, colour and terminology of every segment, in segment order."""
    segmentation = segmentation_node.GetSegmentation()
    rows = segment_rows(dict(model)) if model else []
    card_by_name = {row["name"]: row["value"] for row in rows}
    card_values = {row["value"] for row in rows}
    segments = [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i))
                for i in range(segmentation.GetNumberOfSegments())]
    values: dict[str, int] = {}
    for segment_id, segment in segments:  # the model's own segments first: their values are fixed
        tagged = segment_tag(segment, TAG_LABEL_VALUE)
        if tagged.isdigit() and int(tagged) > 0 and int(tagged) not in values.values():
            values[segment_id] = int(tagged)
    next_value = max([*card_values, *values.values(), 0]) + 1
    for segment_id, segment in segments:
        if segment_id in values:
            continue
        by_name = card_by_name.get(segment.GetName())
        if by_name is not None and by_name not in values.values():
            values[segment_id] = by_name
        else:
            values[segment_id], next_value = next_value, next_value + 1
    terminology = terminology_tag_name()
    return [ExportedLabel(segment_id, values[segment_id], segment.GetName(),
                          tuple(float(c) for c in segment.GetColor()), segment_tag(segment, terminology))
            for segment_id, segment in segments]


def _labelmap_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in LABELMAP_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise ExportError(f"cannot export a label map to '{path.name}': use a name ending in "
                      f"{', '.join(LABELMAP_SUFFIXES)}")


def _color_table_node(context: MRMLContext, labels: Sequence[ExportedLabel]) -> Any:
    node = context.add_node("vtkMRMLColorTableNode", "VolSegSlicer export colors", hidden=True)
    node.SetTypeToUser()
    node.SetNumberOfColors(max([label.value for label in labels] + [0]) + 1)
    node.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for label in labels:
        node.SetColor(label.value, label.name, *label.color, 1.0)
        if label.terminology_tag:
            node.SetTerminologyFromString(label.value, label.terminology_tag)
    return node


def _set_voxels(volume_node: Any, array: np.ndarray) -> None:
    from vtk.util import numpy_support

    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    volume_node.GetImageData().GetPointData().SetScalars(scalars)
    volume_node.Modified()


def _harden(node: Any, transform_id: str | None) -> None:
    if transform_id:
        node.SetAndObserveTransformNodeID(transform_id)
        node.HardenTransform()


@contextlib.contextmanager
def _committed(paths: Sequence[Path], overwrite: bool) -> Iterator[list[Path]]:
    """``volseg.io.atomic.atomic_outputs``: temporary paths committed together at the end, never
    over an existing file without ``overwrite``; its refusals become :class:`ExportError`."""
    from volseg.errors import OutputError
    from volseg.io.atomic import atomic_outputs

    for path in paths:
        if not overwrite and (path.exists() or path.is_symlink()):
            raise ExportError(f"{path} exists already; choose another file name (nothing was written)")
    try:
        with atomic_outputs(list(paths), overwrite=overwrite) as temporary:
            yield temporary
    except OutputError as exc:
        raise ExportError(str(exc)) from None


def export_labelmap(context: MRMLContext, segmentation_node: Any, path: str | os.PathLike,
                    model: Mapping[str, Any] | None = None, overwrite: bool = False) -> list[Path]:
    """Write ``segmentation_node`` as a label map (``.nii.gz``, ``.nii`` or ``.nrrd``) on its
    reference volume's grid, with a Slicer colour table CSV (names, colours, terminology of every
    exported segment and every card label) beside it. Returns the files written (label map, colour table).

    Raises:
        ExportError: bad extension, a file exists (without ``overwrite``), nothing to export, or
            Slicer or the disk refused; nothing is written then.
    """
    from volseg.io.writers import color_table_path

    path = Path(path)
    _labelmap_suffix(path)
    labels = export_labels(segmentation_node, model)
    if not labels:
        raise ExportError(f"'{segmentation_node.GetName()}' has no segments to export")
    files = [path, color_table_path(path)]
    with context.temporary_additions():
        labelmap = context.add_node("vtkMRMLLabelMapVolumeNode", "VolSegSlicer export", hidden=True)
        ids = string_array(label.segment_id for label in labels)
        import slicer

        if not context.segmentations_logic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_volume(segmentation_node),
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise ExportError(f"Slicer could not turn '{segmentation_node.GetName()}' into a label map")
        lookup = np.array([0] + [label.value for label in labels])  # export order -> card value
        voxels = volume_array(labelmap)
        dtype = np.uint8 if lookup.max() <= 255 else np.uint16
        _set_voxels(labelmap, lookup[voxels].astype(dtype))
        _harden(labelmap, segmentation_node.GetTransformNodeID())
        legend = labels + [ExportedLabel("", row["value"], row["name"], row["color"], row["terminology_tag"])
                           for row in (segment_rows(dict(model)) if model else [])
                           if row["value"] not in {label.value for label in labels}]
        colors = _color_table_node(context, legend)  # the whole card, so values never change meaning
        with _committed(files, overwrite) as (labelmap_tmp, colors_tmp):
            write_volume_file(labelmap, labelmap_tmp, compress=True)
            storage = slicer.vtkMRMLColorTableStorageNode()
            storage.SetFileName(str(colors_tmp))
            if not storage.WriteData(colors):
                raise ExportError(f"Slicer could not write the colour table {files[1]}")
    return files


def export_segmentation_file(context: MRMLContext, segmentation_node: Any, path: str | os.PathLike,
                             overwrite: bool = False) -> Path:
    """Write ``segmentation_node`` as ``.seg.nrrd`` with Slicer's own storage node (names,
    colours, terminology and every segment tag kept), in world coordinates.

    Raises:
        ExportError: as :func:`export_labelmap`.
    """
    import slicer

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd") or len(path.name) <= len(".seg.nrrd"):
        raise ExportError(f"cannot export a segmentation to '{path.name}': use a name ending in .seg.nrrd")
    with context.temporary_additions():
        node = segmentation_node
        if segmentation_node.GetTransformNodeID():
            node = context.add_node("vtkMRMLSegmentationNode", "VolSegSlicer export", hidden=True)
            node.Copy(segmentation_node)
            node.SetHideFromEditors(True)
            _harden(node, segmentation_node.GetTransformNodeID())
        with _committed([path], overwrite) as (tmp,):
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(str(tmp))
            if not storage.WriteData(node):
                raise ExportError(f"Slicer could not write {path}")
    return path
