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

from typing import Any, Mapping, Sequence

import numpy as np

from VolSegSlicerLib.catalog import import_segment_ids, segment_rows
from VolSegSlicerLib.mrml import (
    PROVENANCE_PREFIX,
    TAG_LABEL_VALUE,
    TAG_MODEL_ID,
    MRMLContext,
    ijk_to_ras,
    node_in_scene,
    place_beside,
    read_labelmap_node,
    reference_volume,
    string_array,
    terminology_tag_name,
    volume_array,
)
from VolSegSlicerLib.replace import ReplaceError, check_replace_target, choose_segment_ids, commit_replace

class ResultError(Exception):
    """A result that cannot be imported; the message says why and what to do. The scene is
    unchanged when this is raised."""


def _check_result_labelmap(labelmap: Any, input_volume: Any) -> np.ndarray:
    """The result's voxels, once they are known to be integer labels on the input's grid."""
    dims, expected = labelmap.GetImageData().GetDimensions(), input_volume.GetImageData().GetDimensions()
    if tuple(dims) != tuple(expected):
        raise ResultError(f"the engine's result has {tuple(dims)} voxels, '{input_volume.GetName()}' has "
                          f"{tuple(expected)}; nothing was imported. This is a bug: please report it with the log.")
    if not np.allclose(ijk_to_ras(labelmap), ijk_to_ras(input_volume), rtol=0, atol=1e-3):
        raise ResultError(f"the engine's result is not on the grid of '{input_volume.GetName()}' (its origin, "
                          "spacing or orientation differ); nothing was imported. This is a bug: please report it "
                          "with the log.")
    voxels = volume_array(labelmap)
    if voxels.dtype.kind == "f" and not np.array_equal(voxels, np.round(voxels)):
        raise ResultError("the engine's result holds fractional values, not label values; nothing was imported")
    return voxels


def _fill_staging(context: MRMLContext, labelmap: Any, voxels: np.ndarray, rows: Sequence[dict],
                  segment_ids: Sequence[str], model_id: str, input_volume: Any) -> Any:
    """A hidden segmentation node with one segment per card label, filled from ``labelmap``."""
    staging = context.add_node("vtkMRMLSegmentationNode", "VolSegSlicer staging", hidden=True)
    # The staging node and the label map go under the input's parent transform *before* the
    # geometry is set and the voxels imported: Slicer expresses the reference geometry, and
    # resamples an imported label map, in the segmentation node's own coordinates, composing
    # whatever transform lies between the two nodes. Under the same transform there is none, so
    # the reference geometry is exactly the volume's IJK-to-RAS and the voxels are copied as they
    # are (set afterwards, the transform would be applied twice).
    transform_id = input_volume.GetTransformNodeID()
    staging.SetAndObserveTransformNodeID(transform_id)
    labelmap.SetAndObserveTransformNodeID(transform_id)
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
        import_ids = import_segment_ids([dict(row, id=i) for row, i in zip(rows, segment_ids)], np.unique(voxels))
    except ValueError as exc:
        raise ResultError(f"{exc}; the result and the model card '{model_id}' do not belong together, so "
                          "nothing was imported") from None
    if import_ids and not context.segmentations_logic.ImportLabelmapToSegmentationNode(
            labelmap, staging, string_array(import_ids)):
        raise ResultError("Slicer could not import the engine's result as segments; nothing was imported")
    return staging


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
    target = target if replace else None
    try:
        rows = segment_rows(dict(model))
        if not rows:
            raise ValueError(f"the model card '{model_id}' names no labels")
        if target is not None:
            check_replace_target(context, target, input_volume)
    except (ValueError, ReplaceError) as exc:
        raise ResultError(str(exc)) from None
    with context.temporary_additions() as keep:
        try:
            labelmap = read_labelmap_node(context, labelmap_path, "VolSegSlicer result")
        except OSError:
            raise ResultError("the engine reported success but its result could not be read; nothing was "
                              "imported. Please report it with the log.") from None
        voxels = _check_result_labelmap(labelmap, input_volume)
        segment_ids = choose_segment_ids(rows, target, model_id)
        staging = _fill_staging(context, labelmap, voxels, rows, segment_ids, model_id, input_volume)
        if target is None:
            keep.add(staging.GetID())
        else:
            try:
                commit_replace(staging, target, model_id)
            except ReplaceError as exc:
                raise ResultError(str(exc)) from None
            if reference_volume(target) is None:
                target.SetReferenceImageGeometryParameterFromVolumeNode(input_volume)
                target.SetNodeReferenceID(target.GetReferenceImageGeometryReferenceRole(), input_volume.GetID())
    result = target
    if target is None:  # after the block, so that the display nodes made here stay
        result = staging
        _commit_new(context, staging, f"{input_volume.GetName()} {model.get('title') or model_id}", input_volume)
    if not result.GetAttribute(TAG_MODEL_ID):  # the model a node was made by; a later replace keeps it
        result.SetAttribute(TAG_MODEL_ID, model_id)
    for key, value in (provenance or {}).items():
        result.SetAttribute(PROVENANCE_PREFIX + key, str(value))
    return result


def _commit_new(context: MRMLContext, staging: Any, name: str, input_volume: Any) -> None:
    """Turn the staging node into the node the user sees: named, shown, referencing the input
    volume and beside it in the subject hierarchy (it is under the input's parent transform
    already, see :func:`_fill_staging`)."""
    staging.SetName(context.scene.GenerateUniqueName(name))
    staging.SetHideFromEditors(False)
    staging.CreateDefaultDisplayNodes()
    staging.SetNodeReferenceID(staging.GetReferenceImageGeometryReferenceRole(), input_volume.GetID())
    place_beside(context, staging, input_volume)


def model_for_segmentation(segmentation_node: Any, models: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The entry of ``models`` whose model made ``segmentation_node`` (None if unknown)."""
    model_id = segmentation_node.GetAttribute(TAG_MODEL_ID) if segmentation_node is not None else None
    return next((m for m in models if m.get("id") == model_id), None)
