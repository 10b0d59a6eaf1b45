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
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from VolSegSlicerLib.catalog import segment_rows
from VolSegSlicerLib.mrml import (
    TAG_LABEL_VALUE,
    MRMLContext,
    reference_volume,
    segment_tag,
    string_array,
    terminology_tag_name,
    volume_array,
    write_volume_file,
)

#: The representation .seg.nrrd files hold.
BINARY_LABELMAP = "Binary labelmap"
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


def _legend(labels: Sequence[ExportedLabel], model: Mapping[str, Any] | None) -> list[SimpleNamespace]:
    """Rows of the colour table: every exported segment, then every card label not exported (so
    a value never changes meaning between exports), in the form the engine's writer takes."""
    from volseg.terminology import parse_slicer_terminology_tag

    rows = [(label.value, label.name, label.color, label.terminology_tag) for label in labels]
    used = {label.value for label in labels}
    rows += [(row["value"], row["name"], row["color"], row["terminology_tag"])
             for row in (segment_rows(dict(model)) if model else []) if row["value"] not in used]
    legend = []
    for value, name, color, tag in sorted(rows, key=lambda row: row[0]):
        try:
            terminology = parse_slicer_terminology_tag(tag) if tag else None
        except ValueError:  # a tag Slicer's editor wrote in another form: the colour table goes without
            terminology = None
        legend.append(SimpleNamespace(value=value, name=" ".join(str(name).split()),
                                      color=tuple(int(round(255 * c)) for c in color), terminology=terminology))
    return legend


def _set_voxels(volume_node: Any, array: np.ndarray) -> None:
    from vtk.util import numpy_support

    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    volume_node.GetImageData().GetPointData().SetScalars(scalars)
    volume_node.Modified()


def _harden(node: Any, transform_id: str | None) -> None:
    if transform_id:
        node.SetAndObserveTransformNodeID(transform_id)
        node.HardenTransform()


def _check_color_table_target(table: Path, overwrite: bool) -> None:
    """The colour table beside a label map may replace an earlier colour table (with
    ``overwrite``), never another file that happens to have its name."""
    if not (table.exists() or table.is_symlink()):
        return
    if not overwrite:
        raise ExportError(f"{table} exists already; choose another file name (nothing was written)")
    try:
        with open(table, encoding="utf-8", errors="replace") as handle:
            first = handle.readline()
    except OSError:
        first = ""
    if "LabelValue" not in first:
        raise ExportError(f"{table.name} beside it is not a colour table and would be replaced; choose another "
                          "file name (nothing was written)")


@contextlib.contextmanager
def _committed(paths: Sequence[Path], overwrite: bool) -> Iterator[list[Path]]:
    """``volseg.io.atomic.atomic_outputs``: temporary paths committed together at the end, never
    over an existing file without ``overwrite``; its refusals become one-line :class:`ExportError`.
    A ``TempWrite`` folder Slicer's writers leave beside a failed write is removed."""
    from volseg.errors import OutputError
    from volseg.io.atomic import atomic_outputs

    for path in paths:
        if not overwrite and (path.exists() or path.is_symlink()):
            raise ExportError(f"{path} exists already; choose another file name (nothing was written)")
    scratch = paths[0].parent / "TempWrite"
    had_scratch = scratch.exists()
    try:
        with atomic_outputs(list(paths), overwrite=overwrite) as temporary:
            yield temporary
    except OutputError as exc:
        raise ExportError(exc.message) from None
    finally:
        if not had_scratch and scratch.is_dir():
            shutil.rmtree(scratch, ignore_errors=True)


def _write_verified(write: Any, read_back: Any, what: Path) -> None:
    """Write, then read the file back: a full disk can make a writer report success over a
    truncated file."""
    try:
        write()
        ok = read_back()
    except Exception:  # any reader's refusal of a damaged file (EOFError, nibabel's, pynrrd's...)
        ok = False
    if not ok:
        raise ExportError(f"could not write {what}: the file came out incomplete (is the disk full or "
                          "the folder read-only?); nothing was written")


def export_labelmap(context: MRMLContext, segmentation_node: Any, path: str | os.PathLike,
                    model: Mapping[str, Any] | None = None, overwrite: bool = False) -> list[Path]:
    """Write ``segmentation_node`` as a label map (``.nii.gz``, ``.nii`` or ``.nrrd``) on its
    reference volume's grid, where it is shown (world coordinates), with a Slicer colour table CSV
    beside it (names, colours, terminology of every exported segment and every card label).
    Returns the files written (label map, colour table).

    ``overwrite`` replaces the label map and the colour table written for it earlier, never a
    file of another kind that has the colour table's name.

    Raises:
        ExportError: bad extension, a file exists (without ``overwrite``), nothing to export, or
            Slicer or the disk refused; nothing is written then.
    """
    import slicer
    from volseg.io.outputs import color_table_path
    from volseg.io.writers import write_color_table

    path = Path(path)
    _labelmap_suffix(path)
    labels = export_labels(segmentation_node, model)
    if not labels:
        raise ExportError(f"'{segmentation_node.GetName()}' has no segments to export")
    table = color_table_path(path)
    _check_color_table_target(table, overwrite)
    reference = reference_volume(segmentation_node)
    with context.temporary_additions():
        labelmap = context.add_node("vtkMRMLLabelMapVolumeNode", "VolSegSlicer export", hidden=True)
        exported = context.segmentations_logic.ExportSegmentsToLabelmapNode(
            segmentation_node, string_array(label.segment_id for label in labels), labelmap, reference,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not exported or labelmap.GetImageData() is None or not any(labelmap.GetImageData().GetDimensions()):
            raise ExportError(f"'{segmentation_node.GetName()}' has nothing painted to export" if reference is None
                              else f"Slicer could not turn '{segmentation_node.GetName()}' into a label map")
        lookup = np.array([0] + [label.value for label in labels])  # export order -> card value
        voxels = lookup[volume_array(labelmap)].astype(np.uint8 if lookup.max() <= 255 else np.uint16)
        _set_voxels(labelmap, voxels)
        # The export is on the reference volume's grid, in its local coordinates (or, without one,
        # in the segmentation's): its transform places the file where the segments are shown.
        _harden(labelmap, (reference or segmentation_node).GetTransformNodeID())
        with _committed([path, table], overwrite) as (labelmap_tmp, table_tmp):
            _write_verified(lambda: write_volume_file(labelmap, labelmap_tmp, compress=True),
                            lambda: np.array_equal(read_labelmap_file(labelmap_tmp)[0], voxels), path)
            write_color_table(table_tmp, _legend(labels, model), overwrite=True)
    return [path, table]


def read_labelmap_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A label map file as a (K, J, I) array and its IJK-to-RAS matrix, read by pynrrd (NRRD) or
    nibabel (NIfTI), not by the Slicer writer that made it: these refuse a truncated file
    instead of filling it with zeros, and check an export independently."""
    path = Path(path)
    if path.name.lower().endswith(".nrrd"):
        import nrrd

        data, header = nrrd.read(str(path))
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(header["space directions"], float).T
        affine[:3, 3] = header["space origin"]
        if header.get("space") in ("left-posterior-superior", "LPS"):
            affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        return np.asarray(data).transpose(2, 1, 0), affine
    import nibabel

    image = nibabel.load(str(path))
    return np.asarray(image.dataobj).transpose(2, 1, 0), image.affine  # (I, J, K) -> (K, J, I)


def export_segmentation_file(context: MRMLContext, segmentation_node: Any, path: str | os.PathLike,
                             overwrite: bool = False) -> Path:
    """Write ``segmentation_node`` as ``.seg.nrrd`` with Slicer's own storage node (names,
    colours, terminology and every segment tag kept), in world coordinates. Segments stored as
    surfaces (an imported model, an RT structure set) are written as label maps, as the format
    requires; the user's node is not changed.

    Raises:
        ExportError: as :func:`export_labelmap`.
    """
    import slicer

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd") or len(path.name) <= len(".seg.nrrd"):
        raise ExportError(f"cannot export a segmentation to '{path.name}': use a name ending in .seg.nrrd")
    segmentation = segmentation_node.GetSegmentation()
    if not segmentation.GetNumberOfSegments():
        raise ExportError(f"'{segmentation_node.GetName()}' has no segments to export")
    with context.temporary_additions():
        node = segmentation_node
        surfaces = segmentation.GetSourceRepresentationName() != BINARY_LABELMAP
        if segmentation_node.GetTransformNodeID() or surfaces:
            node = context.add_node("vtkMRMLSegmentationNode", "VolSegSlicer export", hidden=True)
            node.Copy(segmentation_node)
            node.SetHideFromEditors(True)
            if surfaces:
                node.GetSegmentation().CreateRepresentation(BINARY_LABELMAP)
                node.GetSegmentation().SetSourceRepresentationName(BINARY_LABELMAP)
            _harden(node, segmentation_node.GetTransformNodeID())
        with _committed([path], overwrite) as (tmp,):
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(str(tmp))

            def read_back() -> bool:
                check = context.add_node("vtkMRMLSegmentationNode", "VolSegSlicer check", hidden=True)
                reader = slicer.vtkMRMLSegmentationStorageNode()
                reader.SetFileName(str(tmp))
                return bool(reader.ReadData(check)) and \
                    check.GetSegmentation().GetNumberOfSegments() == segmentation.GetNumberOfSegments()

            _write_verified(lambda: storage.WriteData(node), read_back, path)
    return path
