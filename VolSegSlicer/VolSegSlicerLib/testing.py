"""The user's chain as checks: segment, correct as Segment Editor would, re-run, export.

Used by the module's self-test inside Slicer and by pytest on slicer-core, so both check the
same claims. Checks take a ``unittest.TestCase``-like object (``assertEqual``, ``assertTrue``...).
Edits go through ``SetBinaryLabelmapToSegment``, the call Segment Editor's effects make.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from VolSegSlicerLib.catalog import segment_rows
from VolSegSlicerLib.export import read_labelmap_file
from VolSegSlicerLib.mrml import (
    TAG_LABEL_VALUE,
    TAG_MODEL_ID,
    MRMLContext,
    ijk_to_ras,
    matrix_array,
    reference_volume,
    segment_tag,
    string_array,
    subject_hierarchy_item,
    terminology_tag_name,
    volume_array,
)


def sample_ct_path() -> str:
    """slicerio's chest CT (128x128x34), the demo model's own sample."""
    import slicerio

    return os.path.join(os.path.dirname(slicerio.__file__), "data", "CTChest4.nrrd")


def demo_model(models: Sequence[dict]) -> dict:
    """The ``demo`` card's entry of ``volseg models --json``."""
    demo = next((m for m in models if m.get("id") == "demo"), None)
    if demo is None:
        raise AssertionError("the 'demo' model card is missing from the model list")
    return demo


def world_matrix(node: Any) -> np.ndarray:
    """The node's parent transform to world as a 4x4 matrix (identity when it has none)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    transform = node.GetParentTransformNode()
    if transform is not None:
        transform.GetMatrixTransformToWorld(matrix)
    return matrix_array(matrix)


def segment_mask(context: MRMLContext, segmentation_node: Any, segment_id: str, volume: Any) -> np.ndarray:
    """One segment as a boolean (K, J, I) array on ``volume``'s grid."""
    import slicer

    with context.temporary_additions():
        labelmap = context.add_node("vtkMRMLLabelMapVolumeNode", "mask", hidden=True)
        if not context.segmentations_logic.ExportSegmentsToLabelmapNode(
                segmentation_node, string_array([segment_id]), labelmap, volume,
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise AssertionError(f"segment {segment_id} could not be exported")
        return volume_array(labelmap) > 0


def oriented_mask(mask: np.ndarray, volume: Any) -> Any:
    """``mask`` (K, J, I on ``volume``'s grid) as a ``vtkOrientedImageData`` in ``volume``'s
    local coordinates, the form Segment Editor's effects hand to the segmentation."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    k, j, i = mask.shape
    image.SetDimensions(i, j, k)
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask.astype(np.uint8).ravel(), deep=True))
    return image


def set_segment_voxels(segmentation_node: Any, segment_id: str, volume: Any, mask: np.ndarray, mode: int) -> None:
    """Apply ``mask`` to one segment with ``SetBinaryLabelmapToSegment`` (``MODE_REPLACE``...),
    leaving the other segments alone."""
    import slicer

    image = oriented_mask(mask, volume)
    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            image, segmentation_node, segment_id, mode, image.GetExtent()):
        raise AssertionError(f"editing segment {segment_id} failed")


@dataclass
class Edits:
    """What :func:`correct_like_segment_editor` did, to check later."""

    painted_segment: str
    sphere: np.ndarray
    erased_segment: str
    slab: np.ndarray
    user_segment: str
    user_mask: np.ndarray
    masks_after: dict = field(default_factory=dict)  # every segment's mask after the edits


def correct_like_segment_editor(context: MRMLContext, segmentation_node: Any, volume: Any) -> Edits:
    """Correct a result with Segment Editor's own logic (``vtkSlicerSegmentEditorLogic``, what
    its Paint, Erase and Add effects call), with the editor's default settings (painting takes
    voxels from the other segments): paint a sphere into "right lung", erase a slab of "tissue",
    and add a user segment "my lesion" (a box; the one already there is reused)."""
    import slicer

    editor = slicer.vtkSlicerSegmentEditorLogic
    segmentation = segmentation_node.GetSegmentation()
    lung, tissue = (segmentation.GetSegmentIdBySegmentName(name) for name in ("right lung", "tissue"))
    shape = volume_array(volume).shape
    kk, jj, ii = np.indices(shape)
    spacing = volume.GetSpacing()
    centre = (shape[0] // 2, shape[1] // 2, shape[2] // 3)
    sphere = ((kk - centre[0]) * spacing[2]) ** 2 + ((jj - centre[1]) * spacing[1]) ** 2 + \
        ((ii - centre[2]) * spacing[0]) ** 2 <= 20.0 ** 2
    slab = np.zeros(shape, bool)
    slab[shape[0] // 2 - 2: shape[0] // 2 + 2] = True
    box = np.zeros(shape, bool)
    box[3:8, 100:110, 60:70] = True
    with context.temporary_additions():  # the editor's parameter node goes when the edits are done
        logic = editor()
        logic.SetMRMLScene(context.scene)
        logic.SetSegmentEditorNode(context.add_node("vtkMRMLSegmentEditorNode", "VolSegSlicer test editor",
                                                    hidden=True))
        logic.SetSegmentationNode(segmentation_node)
        logic.SetSourceVolumeNode(volume)
        user = segmentation.GetSegmentIdBySegmentName("my lesion") or \
            segmentation.AddEmptySegment("", "my lesion", [0.1, 0.2, 0.9])
        for segment_id, mask, mode in ((lung, sphere, editor.ModificationModeAdd),
                                       (tissue, slab, editor.ModificationModeRemove),
                                       (user, box, editor.ModificationModeSet)):
            logic.SetCurrentSegmentID(segment_id)
            logic.ModifySegmentByLabelmap(segmentation_node, segment_id, oriented_mask(mask, volume), mode,
                                          False, False)
    edits = Edits(lung, sphere, tissue, slab, user, box)
    edits.masks_after = all_masks(context, segmentation_node, volume)
    return edits


def all_masks(context: MRMLContext, segmentation_node: Any, volume: Any) -> dict:
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    return {segment_id: segment_mask(context, segmentation_node, segment_id, volume) for segment_id in ids}


def reference_geometry(segmentation_node: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """The segmentation's "Reference image geometry" conversion parameter: its image-to-RAS
    matrix (4x4, in the segmentation node's own coordinates) and its extent."""
    text = segmentation_node.GetSegmentation().GetConversionParameter("Reference image geometry")
    values = [float(v) for v in text.strip(";").split(";")]
    if len(values) != 22:
        raise AssertionError(f"the segmentation has no reference image geometry ({text!r})")
    return np.array(values[:16]).reshape(4, 4), tuple(int(v) for v in values[16:])


def editor_canvas(context: MRMLContext, segmentation_node: Any, volume: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """The grid Segment Editor paints on with ``volume`` as its source volume: the image-to-RAS
    matrix (segmentation coordinates) and extent of ``vtkSlicerSegmentEditorLogic``'s reference
    geometry image, which its effects' modifier labelmaps take."""
    import slicer
    import vtk

    with context.temporary_additions():
        logic = slicer.vtkSlicerSegmentEditorLogic()
        logic.SetMRMLScene(context.scene)
        logic.SetSegmentEditorNode(context.add_node("vtkMRMLSegmentEditorNode", "VolSegSlicer canvas check",
                                                    hidden=True))
        logic.SetSegmentationNode(segmentation_node)
        logic.SetSourceVolumeNode(volume)
        if not logic.UpdateReferenceGeometryImage():
            raise AssertionError("Segment Editor found no geometry to paint on")
        image = logic.GetReferenceGeometryImage()
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        return matrix_array(matrix), tuple(image.GetExtent())


def check_geometry(tc: Any, context: MRMLContext, segmentation_node: Any, volume: Any) -> None:
    """The segmentation lies on the volume's grid, once: under the volume's parent transform, its
    reference image geometry and Segment Editor's canvas are the volume's own IJK-to-RAS and
    extent (in local coordinates; the shared transform places both in the world)."""
    extent = tuple(v for n in volume.GetImageData().GetDimensions() for v in (0, n - 1))
    tc.assertEqual(segmentation_node.GetTransformNodeID(), volume.GetTransformNodeID())
    for what, (matrix, grid) in (("reference image geometry", reference_geometry(segmentation_node)),
                                 ("Segment Editor canvas", editor_canvas(context, segmentation_node, volume))):
        tc.assertTrue(np.allclose(matrix, ijk_to_ras(volume), atol=1e-4),
                      f"the {what} is not the volume's IJK-to-RAS:\n{matrix}\n!=\n{ijk_to_ras(volume)}")
        tc.assertEqual(grid, extent, f"the {what} extent is not the volume's")


def check_result(tc: Any, context: MRMLContext, segmentation_node: Any, model: dict, volume: Any) -> None:
    """A fresh result: one segment per card label with the card's name, colour, terminology and
    our tags, on the volume's geometry (:func:`check_geometry`), under its transform and in its
    folder/study."""
    tc.assertIsNotNone(segmentation_node, "no segmentation node was made")
    rows = segment_rows(model)
    segmentation = segmentation_node.GetSegmentation()
    tc.assertEqual(segmentation.GetNumberOfSegments(), len(rows))
    terminology = terminology_tag_name()
    for index, row in enumerate(rows):
        segment = segmentation.GetNthSegment(index)
        tc.assertEqual(segment.GetName(), row["name"])
        tc.assertTrue(np.allclose(segment.GetColor(), row["color"], atol=1e-6), row["name"])
        tc.assertEqual(segment_tag(segment, terminology), row["terminology_tag"])
        tc.assertEqual(segment_tag(segment, TAG_LABEL_VALUE), str(row["value"]))
        tc.assertEqual(segment_tag(segment, TAG_MODEL_ID), model["id"])
    tc.assertIs(reference_volume(segmentation_node), volume)
    check_geometry(tc, context, segmentation_node, volume)
    hierarchy = context.subject_hierarchy
    tc.assertEqual(hierarchy.GetItemParent(subject_hierarchy_item(context, segmentation_node)),
                   hierarchy.GetItemParent(subject_hierarchy_item(context, volume)))
    masks = all_masks(context, segmentation_node, volume)
    tc.assertTrue(sum(int(m.sum()) for m in masks.values()) > 0, "every segment is empty")


def check_replaced(tc: Any, context: MRMLContext, segmentation_node: Any, volume: Any, edits: Edits,
                   fresh_masks: dict) -> None:
    """After a 'replace' re-run: the model's segments are the model's again (the painted sphere
    and erased slab are gone), the user's segment is exactly as it was, in its place."""
    check_geometry(tc, context, segmentation_node, volume)
    masks = all_masks(context, segmentation_node, volume)
    tc.assertIn(edits.user_segment, masks, "the user's segment was removed")
    tc.assertTrue(np.array_equal(masks[edits.user_segment], edits.user_mask), "the user's segment changed")
    for segment_id, fresh in fresh_masks.items():
        tc.assertTrue(np.array_equal(masks[segment_id], fresh), f"segment {segment_id} is not the model's result")
    segmentation = segmentation_node.GetSegmentation()
    tc.assertEqual(segmentation.GetNumberOfSegments(), len(fresh_masks) + 1)
    tc.assertEqual(segmentation.GetNthSegmentID(segmentation.GetNumberOfSegments() - 1), edits.user_segment)


def check_labelmap_export(tc: Any, written: Sequence[Any], model: dict, volume: Any,
                          edits: Edits | None = None) -> np.ndarray:
    """Read an exported label map (nibabel or pynrrd) and its colour table: the grid is the volume's
    (in world coordinates), values and names are the card's, the edits are there."""
    import csv

    labels, affine = read_labelmap_file(str(written[0]))
    expected_affine = world_matrix(volume) @ ijk_to_ras(volume)
    tc.assertTrue(np.allclose(affine, expected_affine, atol=1e-3), f"{affine} != {expected_affine}")
    tc.assertEqual(labels.shape, volume_array(volume).shape)
    with open(written[1], newline="", encoding="utf-8") as handle:
        table = {int(row["LabelValue"]): row for row in csv.DictReader(handle)}
    for row in segment_rows(model):
        tc.assertEqual(table[row["value"]]["Name"], row["name"])
    if edits is not None:
        values = {row["name"]: row["value"] for row in segment_rows(model)}
        tc.assertTrue(np.all(labels[edits.sphere] == values["right lung"]), "the painted sphere is missing")
        tc.assertFalse(np.any(labels[edits.slab] == values["tissue"]), "the erased slab is still tissue")
        user_value = max(values.values()) + 1
        tc.assertTrue(np.all(labels[edits.user_mask] == user_value), "the user's segment is missing")
        tc.assertEqual(table[user_value]["Name"], "my lesion")
    return labels


def check_seg_nrrd_export(tc: Any, path: str, model: dict, edits: Edits, volume: Any) -> None:
    """Read an exported ``.seg.nrrd`` with slicerio: names, our tags and terminology, the edits."""
    import slicerio

    segmentation = slicerio.read_segmentation(str(path))
    names = [segment["name"] for segment in segmentation["segments"]]
    tc.assertEqual(names, [row["name"] for row in segment_rows(model)] + ["my lesion"])
    lung = next(s for s in segmentation["segments"] if s["name"] == "right lung")
    tc.assertEqual(lung["terminology"]["type"][1], "39607008")
    lung_voxels = slicerio.extract_segments(segmentation, [("right lung", 1)])["voxels"]
    lung_mask = np.asarray(lung_voxels).transpose(2, 1, 0) > 0 if lung_voxels.ndim == 3 else None
    tc.assertIsNotNone(lung_mask)
    tc.assertEqual(lung_mask.shape, volume_array(volume).shape)
    tc.assertTrue(np.all(lung_mask[edits.sphere]), "the painted sphere is missing from the .seg.nrrd")
    check_seg_nrrd_grid(tc, path, volume)


def check_seg_nrrd_grid(tc: Any, path: str, volume: Any) -> None:
    """An exported ``.seg.nrrd`` lies on the volume's grid where it is shown: its header's sizes
    are the volume's, its space directions and origin (LPS) are the volume's IJK-to-RAS with its
    parent transforms applied (the file is hardened, nothing resampled)."""
    import nrrd

    header = nrrd.read_header(str(path))
    sizes = [int(n) for n in header["sizes"]][-3:]
    tc.assertEqual(tuple(sizes), tuple(volume.GetImageData().GetDimensions()), "the .seg.nrrd grid was resampled")
    directions = np.asarray(header["space directions"], float)[-3:]
    tc.assertIn(header.get("space"), ("left-posterior-superior", "LPS"))
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3], ijk_to_lps[:3, 3] = directions.T, np.asarray(header["space origin"], float)
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ world_matrix(volume) @ ijk_to_ras(volume)
    tc.assertTrue(np.allclose(ijk_to_lps, expected, atol=1e-3),
                  f"the .seg.nrrd is not on the volume's grid in world coordinates:\n{ijk_to_lps}\n!=\n{expected}")


#: Dice per label that a run on a finer copy of the sample CT must reach against the native run
#: (the demo card resamples to its training spacing and back; thin ribs differ most at their
#: edges). Measured on the 4x copy: ribs 0.78, spine 0.89-0.94, lungs and tissue 0.97.
RESOLUTION_DICE = {"ribs": 0.7, "cervical vertebral column": 0.8, "thoracic vertebral column": 0.85,
                   "lumbar vertebral column": 0.85, "right lung": 0.95, "left lung": 0.95, "tissue": 0.95}


def upsampled_volume(context: MRMLContext, volume: Any, factor: int, name: str) -> Any:
    """A new scalar volume: ``volume`` resampled (trilinear) onto a grid ``factor`` times finer
    along each axis that covers the same space (voxel edges on voxel edges), as a full-resolution
    scan of which ``volume`` is a downsample: slicerio's CTChest4 x 4 stands in for Slicer's Sample
    Data CTChest (512 x 512 x ~139 at 0.76 x 0.76 x 2.5 mm)."""
    import slicer
    import vtk

    dims = volume.GetImageData().GetDimensions()
    reslice = vtk.vtkImageReslice()
    reslice.SetInputData(volume.GetImageData())
    reslice.SetInterpolationModeToLinear()
    reslice.SetBorder(True)  # the outer half voxel takes the edge value (within 0.5 voxel of the grid)
    reslice.SetOutputSpacing(*(1.0 / factor,) * 3)  # in the input's IJK units
    reslice.SetOutputOrigin(*(0.5 / factor - 0.5,) * 3)
    reslice.SetOutputExtent(*(v for n in dims for v in (0, factor * n - 1)))
    reslice.Update()
    image = vtk.vtkImageData()
    image.DeepCopy(reslice.GetOutput())
    image.SetOrigin(0.0, 0.0, 0.0)
    image.SetSpacing(1.0, 1.0, 1.0)
    fine_to_coarse = np.diag([1.0 / factor] * 3 + [1.0])
    fine_to_coarse[:3, 3] = 0.5 / factor - 0.5
    matrix = vtk.vtkMatrix4x4()
    for r, row in enumerate(ijk_to_ras(volume) @ fine_to_coarse):
        for c, value in enumerate(row):
            matrix.SetElement(r, c, value)
    node = context.add_node("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveImageData(image)
    node.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    node.CreateDefaultDisplayNodes()
    return node


def dice_per_label(context: MRMLContext, node: Any, other: Any, volume: Any) -> dict:
    """Dice of each segment of ``node`` with the segment of the same name in ``other``, both
    on ``volume``'s grid: ``{segment name: Dice}`` (1.0 where both are empty)."""
    ours, theirs = node.GetSegmentation(), other.GetSegmentation()
    dice = {}
    for index in range(ours.GetNumberOfSegments()):
        name = ours.GetNthSegment(index).GetName()
        other_id = theirs.GetSegmentIdBySegmentName(name)
        if not other_id:
            dice[name] = 0.0
            continue
        a = segment_mask(context, node, ours.GetNthSegmentID(index), volume)
        b = segment_mask(context, other, other_id, volume)
        total = int(a.sum()) + int(b.sum())
        dice[name] = 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
    return dice


def check_finer_resolution(tc: Any, context: MRMLContext, segment: Any, model: dict, volume: Any,
                           native_node: Any, factor: int = 4) -> dict:
    """The same model on a ``factor`` times finer copy of ``volume`` gives the native answer:
    segment the copy with ``segment(volume)`` (-> finished job), check the result as any result,
    and compare it with ``native_node`` (the native run) label by label on the fine grid.

    Returns:
        ``{segment name: Dice}``; each must reach :data:`RESOLUTION_DICE`.
    """
    fine = upsampled_volume(context, volume, factor, f"{volume.GetName()} x{factor}")
    job = segment(fine)
    tc.assertEqual(job.monitor.outcome, "done", job.monitor.error)
    check_result(tc, context, job.segmentationNode, model, fine)
    dice = dice_per_label(context, job.segmentationNode, native_node, fine)
    for name, value in dice.items():
        tc.assertGreaterEqual(value, RESOLUTION_DICE.get(name, 0.95),
                              f"'{name}' on the {factor}x finer CT differs from the native run: Dice {value:.3f} ({dice})")
    return dice


def scene_snapshot(context: MRMLContext) -> dict:
    """Every node ID with, for segmentations, its segments' IDs and names: to check that a
    failed run changed nothing."""
    snapshot = {}
    scene = context.scene
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        entry = node.GetClassName()
        if node.IsA("vtkMRMLSegmentationNode"):
            segmentation = node.GetSegmentation()
            entry += repr([(segmentation.GetNthSegmentID(n), segmentation.GetNthSegment(n).GetName())
                           for n in range(segmentation.GetNumberOfSegments())])
        snapshot[node.GetID()] = entry
    return snapshot


def run_user_chain(tc: Any, context: MRMLContext, segment: Any, export_labelmap: Any, export_segmentation: Any,
                   volume: Any, model: dict, folder: str) -> Any:
    """The user's journey, checked at every step: segment -> correct as Segment Editor would ->
    re-run into a new node (the edited one untouched) -> re-run with 'replace' (only the model's
    segments swapped, the user's own and other nodes untouched) -> export a label map and a
    ``.seg.nrrd`` of the corrected segmentation, read back outside Slicer.

    Args:
        segment: ``segment(outputSegmentation=None, replaceOutput=False)`` runs the model on
            ``volume`` and returns the finished job (the module's logic or the library's runner).
        export_labelmap: ``export_labelmap(node, path)`` -> written files.
        export_segmentation: ``export_segmentation(node, path)`` -> written file.

    Returns:
        The corrected segmentation node.
    """
    first = segment()
    tc.assertEqual(first.monitor.outcome, "done", first.monitor.error)
    tc.assertFalse(os.path.exists(first.tempDir), "the run folder was left behind")
    node = first.segmentationNode
    check_result(tc, context, node, model, volume)
    fresh = all_masks(context, node, volume)
    edits = correct_like_segment_editor(context, node, volume)
    tc.assertTrue(edits.masks_after[edits.painted_segment][edits.sphere].all(), "painting did not take")
    tc.assertFalse(edits.masks_after[edits.erased_segment][edits.slab].any(), "erasing did not take")
    tc.assertFalse(any(mask[edits.sphere].any() for segment_id, mask in edits.masks_after.items()
                       if segment_id != edits.painted_segment), "painting left the sphere in other segments")
    tc.assertTrue(edits.masks_after[edits.user_segment][edits.user_mask].all(), "the user's segment is missing")

    second = segment()
    tc.assertEqual(second.monitor.outcome, "done", second.monitor.error)
    tc.assertIsNot(second.segmentationNode, node)
    check_result(tc, context, second.segmentationNode, model, volume)
    after = all_masks(context, node, volume)
    tc.assertEqual(after.keys(), edits.masks_after.keys())
    tc.assertTrue(all(np.array_equal(after[k], edits.masks_after[k]) for k in after), "the edited node changed")

    others = all_masks(context, second.segmentationNode, volume)
    third = segment(outputSegmentation=node, replaceOutput=True)
    tc.assertEqual(third.monitor.outcome, "done", third.monitor.error)
    tc.assertIs(third.segmentationNode, node)
    check_replaced(tc, context, node, volume, edits, fresh)
    still = all_masks(context, second.segmentationNode, volume)
    tc.assertTrue(all(np.array_equal(still[k], others[k]) for k in others), "another node changed")

    edits = correct_like_segment_editor(context, node, volume)
    for suffix in (".nii.gz", ".nrrd"):
        written = export_labelmap(node, os.path.join(folder, f"edited{suffix}"))
        tc.assertEqual([os.path.basename(str(p)) for p in written], [f"edited{suffix}", "edited.csv"])
        check_labelmap_export(tc, written, model, volume, edits)
        for path in written:
            os.remove(path)
    check_seg_nrrd_export(tc, str(export_segmentation(node, os.path.join(folder, "edited.seg.nrrd"))), model,
                          edits, volume)
    return node


def run_module_chain(tc: Any, logic: Any, load_volume: Any, process_events: Any, folder: str) -> Any:
    """:func:`run_user_chain` through the module's logic (``VolSegSlicerLogic``: ``runner``,
    ``context``, ``getParameterNode``, ``segment``, ``exportLabelmap``, ``exportSegmentation``):
    the demo model on the sample CT, loaded by ``load_volume(path)``; then the same model on a 4x
    finer copy of it (as Slicer's Sample Data CTChest is), checked against the native answer
    (:func:`check_finer_resolution`)."""
    volume = load_volume(sample_ct_path())
    query = logic.runner.query_models("", lambda models, error: None)
    logic.runner.wait_for(query, timeout=300, process_events=process_events)
    demo = demo_model(logic.runner.models)
    params = logic.getParameterNode()
    params.device, params.keepWarm = "cpu", True

    def segment_volume(target_volume, outputSegmentation=None, replaceOutput=False):
        params.outputSegmentation, params.replaceOutput = outputSegmentation, replaceOutput
        return logic.segment(demo, [target_volume], params, wait=True)

    def segment(outputSegmentation=None, replaceOutput=False):
        return segment_volume(volume, outputSegmentation, replaceOutput)

    node = run_user_chain(tc, logic.context, segment, lambda node, path: logic.exportLabelmap(node, path, [demo]),
                          logic.exportSegmentation, volume, demo, folder)
    native = segment()
    tc.assertEqual(native.monitor.outcome, "done", native.monitor.error)
    check_finer_resolution(tc, logic.context, segment_volume, demo, volume, native.segmentationNode)
    return node
