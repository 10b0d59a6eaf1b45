"""The re-run rule "replace": a model's new result takes the place of its earlier segments.

Exactly one earlier segment per label value is replaced: the one this model made for that
value (by the :data:`~.mrml.TAG_MODEL_ID` and :data:`~.mrml.TAG_LABEL_VALUE` tags; where the
user copied it, the one with the card's own ID). The new segment takes its ID, its place in the
list, and what the user chose for it (name, colour, visibility, opacity); only the voxels, the
terminology and the tags come from the new result. Every other segment — the user's own, copies,
other models' — is left as it was.
"""

from __future__ import annotations

from typing import Any, Sequence

from VolSegSlicerLib.mrml import (
    TAG_LABEL_VALUE,
    TAG_MODEL_ID,
    MRMLContext,
    node_in_scene,
    reference_volume,
    segment_tag,
)

BINARY_LABELMAP = "Binary labelmap"


class ReplaceError(Exception):
    """The target cannot take the result; the message says why and what to do."""


def replaced_segments(target: Any, model_id: str) -> dict[str, str]:
    """``{label value: segment ID}`` of the segments of ``target`` a re-run of ``model_id`` replaces."""
    segmentation = target.GetSegmentation()
    chosen: dict[str, str] = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetNthSegment(index)
        value = segment_tag(segment, TAG_LABEL_VALUE)
        if not value or segment_tag(segment, TAG_MODEL_ID) != str(model_id):
            continue
        if value not in chosen or segment_id == f"Segment_{value}":
            chosen[value] = segment_id
    return chosen


def check_replace_target(context: MRMLContext, target: Any, input_volume: Any) -> None:
    """Refuse a target that cannot take a result on ``input_volume`` without changing the user's data.

    Raises:
        ReplaceError: the target left the scene, was made on another volume, is under another
            transform, or stores its segments as surfaces (they would be resampled).
    """
    if not node_in_scene(context, target):
        raise ReplaceError("the segmentation chosen for 'replace' was removed from the scene during the run; "
                           "nothing was imported. Run again with a new segmentation.")
    reference = reference_volume(target)
    if reference is not None and reference is not input_volume:
        raise ReplaceError(
            f"'{target.GetName()}' was made on '{reference.GetName()}', not on '{input_volume.GetName()}'; "
            "nothing was imported. Untick 'replace' to get a new segmentation.")
    if (target.GetTransformNodeID() or "") != (input_volume.GetTransformNodeID() or ""):
        raise ReplaceError(
            f"'{target.GetName()}' and '{input_volume.GetName()}' are under different transforms; nothing "
            "was imported. Untick 'replace' to get a new segmentation.")
    source = target.GetSegmentation().GetSourceRepresentationName()
    if target.GetSegmentation().GetNumberOfSegments() and source != BINARY_LABELMAP:
        raise ReplaceError(
            f"'{target.GetName()}' stores its segments as '{source}', and the result would be resampled into it; "
            "nothing was imported. Untick 'replace' to get a new segmentation.")


def choose_segment_ids(rows: Sequence[dict], target: Any, model_id: str) -> list[str]:
    """Segment IDs for the new segments: in ``target``, the ID of the segment each replaces;
    otherwise the card's ``Segment_<value>``, made unique against every other segment of
    ``target`` (Segment Editor names the user's own segments ``Segment_1``, ``Segment_2``... too)."""
    earlier: dict[str, str] = {}
    taken: set[str] = set()
    if target is not None:
        segmentation = target.GetSegmentation()
        earlier = replaced_segments(target, model_id)
        taken = {segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())}
        taken -= set(earlier.values())
    chosen: list[str] = []
    for row in rows:
        segment_id = earlier.get(str(row["value"]), row["id"])
        candidate, n = segment_id, 1
        while candidate in taken or candidate in chosen:
            candidate, n = f"{segment_id}_{n}", n + 1
        chosen.append(candidate)
    return chosen


def commit_replace(staging: Any, target: Any, model_id: str) -> None:
    """Swap the segments :func:`replaced_segments` names for the staged ones (see the module
    docstring); labels that had no segment yet are added at the end. If Slicer refuses a copy,
    the earlier segments are put back and ``target`` is as it was.

    Raises:
        ReplaceError: Slicer refused to copy a segment (``target`` unchanged).
    """
    import slicer

    source, destination = staging.GetSegmentation(), target.GetSegmentation()
    old = replaced_segments(target, model_id)
    positions = {segment_id: destination.GetSegmentIndex(segment_id) for segment_id in old.values()}
    display = target.GetDisplayNode()
    looks = {segment_id: (destination.GetSegment(segment_id).GetName(), destination.GetSegment(segment_id).GetColor(),
                          _display_state(display, segment_id)) for segment_id in old.values()}
    backup = slicer.vtkSegmentation()
    backup.DeepCopy(destination)
    for segment_id in old.values():
        destination.RemoveSegment(segment_id)
    copied: list[str] = []
    for index in range(source.GetNumberOfSegments()):
        segment_id = source.GetNthSegmentID(index)
        if not destination.CopySegmentFromSegmentation(source, segment_id, False):
            for done in copied:
                destination.RemoveSegment(done)
            for segment_id_old in old.values():
                destination.CopySegmentFromSegmentation(backup, segment_id_old, False)
            raise ReplaceError(f"Slicer could not copy segment '{segment_id}' into '{target.GetName()}'; "
                               "it was left as it was")
        copied.append(segment_id)
    for segment_id, position in sorted(positions.items(), key=lambda item: item[1]):
        if destination.GetSegment(segment_id) is None:
            continue
        destination.SetSegmentIndex(segment_id, min(position, destination.GetNumberOfSegments() - 1))
        name, color, state = looks[segment_id]
        destination.GetSegment(segment_id).SetName(name)
        destination.GetSegment(segment_id).SetColor(color)
        _restore_display_state(display, segment_id, state)


def _display_state(display: Any, segment_id: str) -> tuple | None:
    if display is None:
        return None
    return (display.GetSegmentVisibility(segment_id), display.GetSegmentOpacity3D(segment_id),
            display.GetSegmentOpacity2DFill(segment_id), display.GetSegmentOpacity2DOutline(segment_id))


def _restore_display_state(display: Any, segment_id: str, state: tuple | None) -> None:
    if display is None or state is None:
        return
    visible, opacity_3d, fill, outline = state
    display.SetSegmentVisibility(segment_id, visible)
    display.SetSegmentOpacity3D(segment_id, opacity_3d)
    display.SetSegmentOpacity2DFill(segment_id, fill)
    display.SetSegmentOpacity2DOutline(segment_id, outline)
