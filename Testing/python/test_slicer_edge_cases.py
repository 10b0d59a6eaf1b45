"""Edge cases of the Slicer half on slicer-core, each found by trying to break it.

Results missing labels, segmentations and volumes under different transforms, disks that
truncate files, surface segmentations, files beside an export that are not ours, names with
quotes, user changes to model segments across a 'replace', and the runner's callbacks.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT / "VolSegSlicer") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "VolSegSlicer"))

slicer = pytest.importorskip("slicer", reason="slicer-core is part of the [test] extra: pip install -e '.[test]'")

from slicer_scene import engine_result, load_ct, surface_segmentation  # noqa: E402
from VolSegSlicerLib import export as export_module  # noqa: E402
from VolSegSlicerLib import testing  # noqa: E402
from VolSegSlicerLib.dicom import export_dicom_seg  # noqa: E402
from VolSegSlicerLib.export import ExportError, export_labelmap, export_segmentation_file  # noqa: E402
from VolSegSlicerLib.mrml import TAG_MODEL_ID, subject_hierarchy_item  # noqa: E402
from VolSegSlicerLib.results import ResultError, import_result  # noqa: E402
from VolSegSlicerLib.runner import EngineRunner  # noqa: E402
from VolSegSlicerLib.settings import RunSettings  # noqa: E402

MODULE_DIR = REPO_ROOT / "VolSegSlicer"


def _labels_of(path: Path) -> np.ndarray:
    import nrrd

    return np.asarray(nrrd.read(str(path))[0]).transpose(2, 1, 0)


def _segment_named(node, name: str) -> str:
    return node.GetSegmentation().GetSegmentIdBySegmentName(name)


# ------------------------------------------------------------------------------------------ import
def test_a_result_missing_some_labels_puts_every_voxel_under_its_own_label(context, demo, tmp_path) -> None:
    """Slicer fills the i-th segment ID with value i + 1: absent values must keep their places."""
    volume = load_ct(context)
    path = engine_result(tmp_path, demo, volume, [3, 5, 7])  # no 1, 2, 4, 6 (e.g. a cropped scan)
    labels = _labels_of(path)
    node = import_result(context, str(path), demo, volume)
    for row in demo["labels"]:
        mask = testing.segment_mask(context, node, _segment_named(node, row["name"]), volume)
        assert np.array_equal(mask, labels == row["value"]), row["name"]


def test_a_real_run_on_a_cropped_ct_matches_the_engines_labels_segment_by_segment(context, demo, tmp_path) -> None:
    volume = load_ct(context)
    image = volume.GetImageData()
    voxels = testing.volume_array(volume)
    cropped = voxels[:14]  # the upper slices only: some structures are absent
    from vtk.util import numpy_support

    image.SetDimensions(voxels.shape[2], voxels.shape[1], 14)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(cropped).ravel(), deep=True))
    runner = EngineRunner(context, str(MODULE_DIR), temp_root=str(tmp_path))
    captured = {}
    original = runner._import

    def keep_engine_labels(job):
        captured["labels"] = _labels_of(Path(job.outputPath))
        original(job)

    runner._import = keep_engine_labels
    try:
        job = runner.wait_for(runner.segment(demo, [volume], RunSettings(device="cpu")), timeout=240)
    finally:
        runner.shutdown()
    assert job.monitor.outcome == "done", job.monitor.error
    labels = captured["labels"]
    assert len(np.unique(labels)) - 1 < len(demo["labels"]), "every label present: the crop tests nothing"
    for row in demo["labels"]:
        mask = testing.segment_mask(context, job.segmentationNode, _segment_named(job.segmentationNode, row["name"]),
                                    volume)
        assert np.array_equal(mask, labels == row["value"]), row["name"]


def test_cards_and_results_that_cannot_be_imported_are_refused_cleanly(context, demo, tmp_path) -> None:
    volume = load_ct(context)
    path = engine_result(tmp_path, demo, volume, [1])
    before = testing.scene_snapshot(context)
    with pytest.raises(ResultError, match="names no labels"):
        import_result(context, str(path), dict(demo, labels=[]), volume)
    with pytest.raises(ResultError):
        import_result(context, str(path), dict(demo, labels=demo["labels"] + [dict(demo["labels"][0])]), volume)
    import nrrd

    data, header = nrrd.read(str(path))
    nrrd.write(str(path), data.astype(np.float32) * 0.5, header)
    with pytest.raises(ResultError, match="fractional"):
        import_result(context, str(path), demo, volume)
    assert testing.scene_snapshot(context) == before


# ------------------------------------------------------------------------------------------ replace
def test_replace_keeps_the_users_copies_names_colours_and_display(context, demo, tmp_path) -> None:
    volume = load_ct(context)
    node = import_result(context, str(engine_result(tmp_path, demo, volume, [1, 5, 7])), demo, volume)
    segmentation = node.GetSegmentation()
    segmentation.CopySegmentFromSegmentation(segmentation, "Segment_5", False)  # no-op copy onto itself
    copy = slicer.vtkSegment()
    copy.DeepCopy(segmentation.GetSegment("Segment_5"))
    copy.SetName("right lung copy")
    segmentation.AddSegment(copy, "Copy5")
    segmentation.GetSegment("Segment_1").SetName("ribs (checked)")
    segmentation.GetSegment("Segment_1").SetColor(0.1, 0.9, 0.1)
    display = node.GetDisplayNode()
    display.SetSegmentVisibility("Segment_7", False)
    display.SetSegmentOpacity3D("Segment_5", 0.2)
    copy_mask = testing.segment_mask(context, node, "Copy5", volume)
    order = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]

    import_result(context, str(engine_result(tmp_path, demo, volume, [1, 5])), demo, volume, node, True)
    assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == order
    assert segmentation.GetSegment("Segment_1").GetName() == "ribs (checked)"
    assert segmentation.GetSegment("Segment_1").GetColor() == pytest.approx((0.1, 0.9, 0.1))
    assert display.GetSegmentVisibility("Segment_7") is False or display.GetSegmentVisibility("Segment_7") == 0
    assert display.GetSegmentOpacity3D("Segment_5") == pytest.approx(0.2)
    assert np.array_equal(testing.segment_mask(context, node, "Copy5", volume), copy_mask), "the user's copy changed"
    assert not testing.segment_mask(context, node, "Segment_7", volume).any(), "label 7 is not the new result's"


def test_replace_refuses_a_surface_segmentation_and_keeps_the_node_model(context, demo, tmp_path) -> None:
    volume = load_ct(context)
    surfaces = surface_segmentation(context, "from STL", (0, 0, -200), 30)
    before = testing.scene_snapshot(context)
    with pytest.raises(ResultError, match="Closed surface"):
        import_result(context, str(engine_result(tmp_path, demo, volume, [1])), demo, volume, surfaces, True)
    assert testing.scene_snapshot(context) == before

    other = dict(demo, id="other-model")
    node = import_result(context, str(engine_result(tmp_path, demo, volume, [1])), demo, volume)
    import_result(context, str(engine_result(tmp_path, demo, volume, [2])), other, volume, node, True)
    assert node.GetAttribute(TAG_MODEL_ID) == "demo"
    assert node.GetSegmentation().GetNumberOfSegments() == 2 * len(demo["labels"])


# ------------------------------------------------------------------------------------------ export
def _exported_world_bounds(path: Path) -> np.ndarray:
    labels, affine = testing.read_labelmap_file(str(path))
    k, j, i = np.nonzero(labels)
    corners = affine @ np.vstack([i, j, k, np.ones_like(i)])
    return np.array([corners[a].min() for a in range(3)] + [corners[a].max() for a in range(3)])


@pytest.mark.parametrize("moved", ["segmentation", "volume"])
def test_labelmap_export_is_where_the_segments_are_shown_when_only_one_is_transformed(context, demo, tmp_path,
                                                                                      moved) -> None:
    import vtk

    volume = load_ct(context)
    node = import_result(context, str(engine_result(tmp_path, demo, volume, [5])), demo, volume)
    transform = context.add_node("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 30.0)
    transform.SetMatrixTransformToParent(matrix)
    (node if moved == "segmentation" else volume).SetAndObserveTransformNodeID(transform.GetID())
    k, j, i = np.nonzero(_labels_of(tmp_path / "result.nrrd"))  # the segment's voxels, in its own grid
    shown = testing.world_matrix(node) @ testing.ijk_to_ras(volume) @ np.vstack([i, j, k, np.ones_like(i)])
    shown_bounds = np.array([shown[a].min() for a in range(3)] + [shown[a].max() for a in range(3)])
    written = export_labelmap(context, node, tmp_path / "shifted.nii.gz", demo)
    exported = _exported_world_bounds(written[0])
    spacing = np.tile(np.array(volume.GetSpacing()), 2)
    assert np.all(np.abs(exported - shown_bounds) <= spacing), (exported, shown_bounds)


def test_a_truncated_write_is_an_error_and_leaves_nothing(context, demo, tmp_path, monkeypatch) -> None:
    volume = load_ct(context)
    node = import_result(context, str(engine_result(tmp_path, demo, volume, [5])), demo, volume)
    out = tmp_path / "out"
    out.mkdir()
    real_write = export_module.write_volume_file

    def write_then_truncate(volume_node, path, compress=False):  # what a full disk did to gzip output
        real_write(volume_node, path, compress)
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)

    monkeypatch.setattr(export_module, "write_volume_file", write_then_truncate)
    before = testing.scene_snapshot(context)
    with pytest.raises(ExportError, match="incomplete") as refused:
        export_labelmap(context, node, out / "seg.nii.gz", demo)
    assert "\n" not in str(refused.value) and "volseg-tmp" not in str(refused.value)
    assert list(out.iterdir()) == [] and testing.scene_snapshot(context) == before


def test_a_surface_segmentation_exports_as_a_real_seg_nrrd(context, tmp_path) -> None:
    import slicerio

    volume = load_ct(context)
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    centre = ((bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2)
    node = surface_segmentation(context, "from STL", centre, 40)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    path = export_segmentation_file(context, node, tmp_path / "implant.seg.nrrd")
    read = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in read["segments"]] == ["implant"] and read["voxels"].sum() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["implant.seg.nrrd"]
    assert node.GetSegmentation().GetSourceRepresentationName() == "Closed surface"


def test_the_colour_table_beside_an_export_never_replaces_another_file(context, demo, tmp_path) -> None:
    volume = load_ct(context)
    node = import_result(context, str(engine_result(tmp_path, demo, volume, [5])), demo, volume)
    node.GetSegmentation().GetSegment("Segment_5").SetName('lesion "A"')
    (tmp_path / "results.csv").write_text("patient,volume_ml\n1,20\n")
    with pytest.raises(ExportError, match="not a colour table"):
        export_labelmap(context, node, tmp_path / "results.nii.gz", demo, overwrite=True)
    assert (tmp_path / "results.csv").read_text() == "patient,volume_ml\n1,20\n"
    assert not (tmp_path / "results.nii.gz").exists()
    first = export_labelmap(context, node, tmp_path / "labels.nii.gz", demo)
    again = export_labelmap(context, node, tmp_path / "labels.nii.gz", demo, overwrite=True)  # ours: replaced
    assert first == again
    with open(again[1], newline="", encoding="utf-8") as handle:
        names = {int(row["LabelValue"]): row["Name"] for row in csv.DictReader(handle)}
    assert names[5] == "lesion 'A'" and names[1] == "ribs"


def test_an_empty_segmentation_without_reference_and_a_failed_dicom_export_change_nothing(context, tmp_path) -> None:
    volume = load_ct(context)
    empty = context.add_node("vtkMRMLSegmentationNode", "all empty")
    empty.GetSegmentation().AddEmptySegment("", "nothing", [1, 0, 0])
    with pytest.raises(ExportError, match="nothing painted"):
        export_labelmap(context, empty, tmp_path / "e.nrrd")
    hierarchy = context.subject_hierarchy
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "P")
    study = hierarchy.CreateStudyItem(patient, "S")
    hierarchy.SetItemParent(subject_hierarchy_item(context, volume), study)
    volume.SetAttribute("DICOM.instanceUIDs", "1.2.3")
    node = context.add_node("vtkMRMLSegmentationNode", "mine")
    node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), volume.GetID())
    folder = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "my folder")
    hierarchy.SetItemParent(subject_hierarchy_item(context, node), folder)
    with pytest.raises(ExportError, match="does not exist"):
        export_dicom_seg(context, node, str(tmp_path / "no such folder"))
    assert hierarchy.GetItemParent(subject_hierarchy_item(context, node)) == folder


# ------------------------------------------------------------------------------------------ runner
def test_runner_callbacks_and_shutdown(context, demo, tmp_path) -> None:
    volume = load_ct(context)
    runner = EngineRunner(context, str(MODULE_DIR), temp_root=str(tmp_path))
    empty = context.add_node("vtkMRMLScalarVolumeNode", "empty CT")
    with pytest.raises(ValueError, match="'empty CT' has no image data"):
        runner.segment(demo, [empty], RunSettings())
    ended = []
    job = runner.segment(demo, [volume], RunSettings(device="cpu"), on_finished=ended.append)
    runner.shutdown()
    assert ended == [job] and job.finished and job.monitor.outcome == "cancelled"
    assert not os.path.exists(job.tempDir) and runner.jobs == []

    def broken(job):
        raise RuntimeError("a bug in the panel")

    failing = runner.segment(demo, [volume], RunSettings(device="cpu", checkpointPath=str(tmp_path / "no.pt")),
                             on_finished=broken)
    second = runner.segment(demo, [volume], RunSettings(device="cpu", checkpointPath=str(tmp_path / "no.pt")))
    runner.wait_for(second, timeout=120)
    runner.wait_for(failing, timeout=120)
    assert failing.finished and second.finished and second.monitor.outcome == "error"
    runner.shutdown()
