"""The engine's result becomes segments: one per card label, with name, colour and terminology.

:func:`import_result` is what happens after Segment. It never leaves the scene half changed:
the label map is checked (grid, label values) and imported into a hidden staging segmentation
first; only then are the segments committed, either as a new segmentation node (the default)
or, with ``replace``, into the chosen one, where exactly this model's earlier segments are
swapped for the new ones in place and every other segment (the user's own, other models') is
left as it was.

Every segment carries Slicer's terminology tag and two tags of ours, :data:`TAG_LABEL_VALUE`
and :data:`TAG_MODEL_ID`, which later say which segments a re-run may replace and which label
value each one has on export.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from VolSegSlicerLib.catalog import import_segment_ids, segment_rows
from VolSegSlicerLib.mrml import MRMLContext, ijk_to_ras, read_labelmap_node, string_array, volume_array

#: Segment tag: the segment's label value in the model card.
TAG_LABEL_VALUE = "VolSegSlicer.LabelValue"
#: Segment tag and node attribute: the id of the model card that made the segment / node.
TAG_MODEL_ID = "VolSegSlicer.ModelId"
#: Node attributes with the run's provenance are named ``VolSegSlicer.<key>``.
PROVENANCE_PREFIX = "VolSegSlicer."


class ResultError(Exception):
    """A result that cannot be imported; the message says why and what to do. The scene is
    unchanged when this is raised."""


def terminology_tag_name() -> str:
    """The name of Slicer's segment terminology tag (``TerminologyEntry``)."""
    import slicer

    return slicer.vtkSegment.GetTerminologyEntryTagName()


def node_in_scene(context: MRMLContext, node: Any) -> bool:
    """Whether ``node`` is (still) in the context's scene."""
    return node is not None and node.GetScene() is context.scene and context.scene.IsNodePresent(node)


def reference_volume(segmentation_node: Any) -> Any:
    """The volume a segmentation node takes its geometry from (None if it has none)."""
    if segmentation_node is None:
        return None
    return segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())


def model_segment_ids(segmentation_node: Any, model_id: str) -> list[str]:
    """IDs of the segments that the model ``model_id`` made in ``segmentation_node`` (by tag)."""
    segmentation = segmentation_node.GetSegmentation()
    ids = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        if segment_tag(segment, TAG_MODEL_ID) == str(model_id) and segment_tag(segment, TAG_LABEL_VALUE):
            ids.append(segmentation.GetNthSegmentID(index))
    return ids


def segment_tag(segment: Any, name: str) -> str:
    """A segment's tag value ('' when the segment has no such tag)."""
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else ""


def _check_on_input_grid(labelmap: Any, input_volume: Any, path: str) -> None:
    dims, expected = labelmap.GetImageData().GetDimensions(), input_volume.GetImageData().GetDimensions()
    if tuple(dims) != tuple(expected) or not np.allclose(ijk_to_ras(labelmap), ijk_to_ras(input_volume),
                                                         rtol=0, atol=1e-3):
        raise ResultError(
            f"the result {os.path.basename(path)} does not lie on the grid of '{input_volume.GetName()}' "
            f"(size {tuple(dims)} vs {tuple(expected)}); nothing was imported. This is a bug: please "
            "report it with the log (Copy log).")


def _choose_segment_ids(rows: Sequence[dict], target: Any, model_id: str) -> list[str]:
    """Segment IDs for the new segments: in ``target`` (replace), the id of this model's earlier
    segment of the same label value; otherwise the card's ``Segment_<value>``, made unique
    against every other segment of ``target`` (Segment Editor names the user's own segments
    ``Segment_1``, ``Segment_2``... too)."""
    earlier, taken = {}, set()
    if target is not None:
        segmentation = target.GetSegmentation()
        replaced = set(model_segment_ids(target, model_id))
        for segment_id in replaced:
            earlier[segment_tag(segmentation.GetSegment(segment_id), TAG_LABEL_VALUE)] = segment_id
        taken = {segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())} - replaced
    chosen: list[str] = []
    for row in rows:
        segment_id = earlier.get(str(row["value"]), row["id"])
        candidate, n = segment_id, 1
        while candidate in taken or candidate in chosen:
            candidate, n = f"{segment_id}_{n}", n + 1
        chosen.append(candidate)
    return chosen


def _fill_staging(context: MRMLContext, labelmap: Any, rows: Sequence[dict], segment_ids: Sequence[str],
                  model_id: str, input_volume: Any, path: str) -> Any:
    """A hidden segmentation node with one segment per card label, filled from ``labelmap``."""
    staging = context.add_node("vtkMRMLSegmentationNode", "VolSegSlicer staging", hidden=True)
    staging.SetReferenceImageGeometryParameterFromVolumeNode(input_volume)
    segmentation = staging.GetSegmentation()
    terminology = terminology_tag_name()
    for row, segment_id in zip(rows, segment_ids):
        segmentation.AddEmptySegment(segment_id, row["name"], list(row["color"]))
        segment = segmentation.GetSegment(segment_id)
        if row.get("terminology_tag"):
            segment.SetTag(terminology, row["terminology_tag"])
        segment.SetTag(TAG_LABEL_VALUE, str(row["value"]))
        segment.SetTag(TAG_MODEL_ID, model_id)
    try:
        import_ids = import_segment_ids([dict(row, id=i) for row, i in zip(rows, segment_ids)],
                                        np.unique(volume_array(labelmap)))
    except ValueError as exc:
        raise ResultError(f"{exc}; the result {os.path.basename(path)} and the model card "
                          f"'{model_id}' do not belong together, so nothing was imported") from None
    if import_ids and not context.segmentations_logic.ImportLabelmapToSegmentationNode(
            labelmap, staging, string_array(import_ids)):
        raise ResultError(f"Slicer could not import the label map {os.path.basename(path)} as segments")
    return staging


def _commit_replace(staging: Any, target: Any, model_id: str) -> None:
    """Swap ``model_id``'s earlier segments of ``target`` for the staged ones, each in its
    earlier place; new labels go at the end. Other segments are not touched. If Slicer refuses a
    copy, the earlier segments are put back and ``target`` is as it was."""
    import slicer

    source, destination = staging.GetSegmentation(), target.GetSegmentation()
    old = model_segment_ids(target, model_id)
    positions = {segment_id: destination.GetSegmentIndex(segment_id) for segment_id in old}
    backup = slicer.vtkSegmentation()
    backup.DeepCopy(destination)
    for segment_id in old:
        destination.RemoveSegment(segment_id)
    copied = []
    for index in range(source.GetNumberOfSegments()):
        segment_id = source.GetNthSegmentID(index)
        if not destination.CopySegmentFromSegmentation(source, segment_id, False):
            for done in copied:
                destination.RemoveSegment(done)
            for segment_id_old in old:
                destination.CopySegmentFromSegmentation(backup, segment_id_old, False)
            raise ResultError(f"Slicer could not copy segment '{segment_id}' into '{target.GetName()}'; "
                              "it was left as it was")
        copied.append(segment_id)
    for segment_id, position in sorted(positions.items(), key=lambda item: item[1]):
        if destination.GetSegment(segment_id) is not None:
            destination.SetSegmentIndex(segment_id, position)


def _check_replace_target(context: MRMLContext, target: Any, input_volume: Any) -> None:
    if not node_in_scene(context, target):
        raise ResultError("the segmentation chosen for 'replace' was removed from the scene during the run; "
                          "nothing was imported. Run again with a new segmentation.")
    reference = reference_volume(target)
    if reference is not None and reference is not input_volume:
        raise ResultError(
            f"'{target.GetName()}' was made on '{reference.GetName()}', not on '{input_volume.GetName()}'; "
            "nothing was imported. Untick 'replace' to get a new segmentation.")
    if (target.GetTransformNodeID() or "") != (input_volume.GetTransformNodeID() or ""):
        raise ResultError(
            f"'{target.GetName()}' and '{input_volume.GetName()}' are under different transforms; nothing "
            "was imported. Untick 'replace' to get a new segmentation.")


def import_result(context: MRMLContext, labelmap_path: str, model: Mapping[str, Any], input_volume: Any,
                  target: Any = None, replace: bool = False, provenance: Mapping[str, Any] | None = None) -> Any:
    """Import the engine's label map (on ``input_volume``'s grid, in its local coordinates).

    Args:
        context: the scene and logics.
        labelmap_path: the engine's output label map (``.nrrd``/``.nii.gz``).
        model: the model's entry of ``volseg models --json`` (id, title, labels).
        input_volume: the (first) input volume node; the result takes its geometry, parent
            transform and place in the subject hierarchy.
        target: an existing segmentation node, used only with ``replace``.
        replace: swap ``model``'s earlier segments of ``target`` for the new ones (each in its
            place; the user's other segments stay). Otherwise a new segmentation node is made.
        provenance: run details stored as node attributes ``VolSegSlicer.<key>``.

    Returns:
        The segmentation node holding the result.

    Raises:
        ResultError: the input volume (or the target) left the scene during the run, the result
            does not fit the input grid or the card's labels, or Slicer refused the import. The
            scene is then exactly as before.
    """
    model_id = str(model.get("id", ""))
    if not node_in_scene(context, input_volume):
        raise ResultError("the input volume was removed from the scene while the model ran; nothing was imported")
    if replace and target is not None:
        _check_replace_target(context, target, input_volume)
    else:
        target = None
    rows = segment_rows(dict(model))
    with context.temporary_additions() as keep:
        try:
            labelmap = read_labelmap_node(context, labelmap_path, "VolSegSlicer result")
        except OSError as exc:
            raise ResultError(f"{exc}; nothing was imported") from None
        _check_on_input_grid(labelmap, input_volume, labelmap_path)
        segment_ids = _choose_segment_ids(rows, target, model_id)
        staging = _fill_staging(context, labelmap, rows, segment_ids, model_id, input_volume, labelmap_path)
        if target is None:
            result = staging
            keep.add(result.GetID())
        else:
            _commit_replace(staging, target, model_id)
            result = target
            if reference_volume(target) is None:
                target.SetReferenceImageGeometryParameterFromVolumeNode(input_volume)
                target.SetNodeReferenceID(target.GetReferenceImageGeometryReferenceRole(), input_volume.GetID())
    if result is staging:  # after the block, so that the display nodes made here stay
        _commit_new(context, staging, f"{input_volume.GetName()} {model.get('title') or model_id}", input_volume)
    result.SetAttribute(TAG_MODEL_ID, model_id)
    for key, value in (provenance or {}).items():
        result.SetAttribute(PROVENANCE_PREFIX + key, str(value))
    return result


def _commit_new(context: MRMLContext, staging: Any, name: str, input_volume: Any) -> None:
    """Turn the staging node into the node the user sees: named, shown, on the input's geometry,
    under its parent transform and beside it in the subject hierarchy."""
    staging.SetName(context.scene.GenerateUniqueName(name))
    staging.SetHideFromEditors(False)
    staging.CreateDefaultDisplayNodes()
    staging.SetNodeReferenceID(staging.GetReferenceImageGeometryReferenceRole(), input_volume.GetID())
    staging.SetAndObserveTransformNodeID(input_volume.GetTransformNodeID())
    place_beside(context, staging, input_volume)


def subject_hierarchy_item(context: MRMLContext, node: Any) -> int:
    """The subject hierarchy item of ``node``, made (under the scene) if it has none yet. Slicer's
    subject hierarchy plugins make one for every data node; a scene without them may not."""
    hierarchy = context.subject_hierarchy
    item = hierarchy.GetItemByDataNode(node)
    if not item:
        item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)
    return item


def place_beside(context: MRMLContext, node: Any, volume: Any) -> None:
    """Put ``node`` in the same folder/study as ``volume`` in the subject hierarchy (where DICOM
    SEG export looks for the study it belongs to)."""
    hierarchy = context.subject_hierarchy
    parent = hierarchy.GetItemParent(subject_hierarchy_item(context, volume))
    hierarchy.SetItemParent(subject_hierarchy_item(context, node), parent)


def model_for_segmentation(segmentation_node: Any, models: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The entry of ``models`` whose model made ``segmentation_node`` (None if unknown)."""
    model_id = segmentation_node.GetAttribute(TAG_MODEL_ID) if segmentation_node is not None else None
    return next((m for m in models if m.get("id") == model_id), None)
