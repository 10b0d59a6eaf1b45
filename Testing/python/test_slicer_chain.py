"""The Slicer half on Slicer's own MRML libraries (slicer-core): segment -> correct -> re-run -> export.

Everything runs for real: the scene and logics are slicer-core's (set up as Slicer's application
does, :func:`VolSegSlicerLib.mrml.create_core_context`), volumes are loaded by Slicer's volumes
logic, the engine runs as a background process (``volseg serve`` kept warm for most runs), the
result is imported by the library code the module uses, edits are made with the call Segment
Editor's effects make, and exports are read back with nibabel and slicerio. The module's
self-test runs the same checks (``VolSegSlicerLib.testing``) inside Slicer.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "VolSegSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

slicer = pytest.importorskip("slicer", reason="slicer-core is part of the [test] extra: pip install -e '.[test]'")

from VolSegSlicerLib import testing  # noqa: E402
from VolSegSlicerLib.dicom import INSTALL_QUANTITATIVE_REPORTING, export_dicom_seg, prepare_dicom_seg_export  # noqa: E402
from VolSegSlicerLib.export import ExportError, export_labelmap, export_segmentation_file  # noqa: E402
from VolSegSlicerLib.mrml import (  # noqa: E402
    ijk_to_ras,
    subject_hierarchy_item,
    volume_array,
)
from VolSegSlicerLib.results import ResultError, import_result, model_for_segmentation  # noqa: E402
from VolSegSlicerLib.runner import EngineRunner  # noqa: E402
from slicer_scene import CHECK, engine_result, in_study, load_ct  # noqa: E402
from VolSegSlicerLib.settings import RunSettings  # noqa: E402



@pytest.fixture(scope="module")
def runner_factory(tmp_path_factory):
    """Runners share one warm ``volseg serve`` worker (the model stays loaded across tests)."""
    made: list[EngineRunner] = []
    shared = {"worker": None}

    def make(context) -> EngineRunner:
        runner = EngineRunner(context, str(MODULE_DIR), temp_root=str(tmp_path_factory.mktemp("runs")))
        if shared["worker"] is None:
            shared["worker"] = runner.ensure_warm_worker()
        runner.warm_worker = shared["worker"]
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.shutdown()


def run(runner, model, volume, wait_s: float = 240.0, **settings):
    settings.setdefault("device", "cpu")
    settings.setdefault("keepWarm", True)
    job = runner.segment(model, [volume], RunSettings(**settings))
    runner.wait_for(job, timeout=wait_s)
    return job


# ------------------------------------------------------------------------------------------ the chain
def test_segment_correct_rerun_export_on_the_chest_ct(context, runner_factory, demo, tmp_path) -> None:
    """The module's self-test chain (VolSegSlicerLib.testing.run_user_chain) on slicer-core."""
    runner = runner_factory(context)
    volume = load_ct(context)
    in_study(context, volume)
    runs = []

    def segment(outputSegmentation=None, replaceOutput=False):  # the first run in a process of its own
        runs.append(run(runner, demo, volume, keepWarm=bool(runs), outputSegmentation=outputSegmentation,
                        replaceOutput=replaceOutput))
        return runs[-1]

    node = testing.run_user_chain(CHECK, context, segment, lambda n, p: export_labelmap(context, n, p, demo),
                                  lambda n, p: export_segmentation_file(context, n, p), volume, demo, str(tmp_path))
    assert len(runs) == 3 and model_for_segmentation(node, [demo]) is demo
    assert node.GetAttribute("VolSegSlicer.Device") == "cpu"


def test_exports_never_overwrite_and_refuse_bad_names(context, demo, tmp_path) -> None:
    volume = load_ct(context)
    node = context.add_node("vtkMRMLSegmentationNode", "manual")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), volume.GetID())
    with pytest.raises(ExportError, match="no segments"):
        export_labelmap(context, node, tmp_path / "x.nii.gz")
    segment = node.GetSegmentation().AddEmptySegment("", "right lung", [1, 0, 0])
    mask = np.zeros(volume_array(volume).shape, bool)
    mask[10:12, 40:60, 40:60] = True
    testing.set_segment_voxels(node, segment, volume, mask, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    before = testing.scene_snapshot(context)
    (tmp_path / "taken.nii.gz").write_bytes(b"user data")
    with pytest.raises(ExportError, match="exists already"):
        export_labelmap(context, node, tmp_path / "taken.nii.gz", demo)
    assert (tmp_path / "taken.nii.gz").read_bytes() == b"user data"
    assert not (tmp_path / "taken.csv").exists()
    with pytest.raises(ExportError, match=r"\.nii\.gz"):
        export_labelmap(context, node, tmp_path / "labels.png", demo)
    with pytest.raises(ExportError, match=r"\.seg\.nrrd"):
        export_segmentation_file(context, node, tmp_path / "labels.nrrd")
    assert testing.scene_snapshot(context) == before, "a refused export left nodes behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.nii.gz"]
    # A user segment named like a card label takes that label's value.
    written = export_labelmap(context, node, tmp_path / "taken.nii.gz", demo, overwrite=True)
    labels = testing.check_labelmap_export(CHECK, written, demo, volume)
    assert set(np.unique(labels)) == {0, 5}


# ------------------------------------------------------------------------------------------ geometry
def test_oblique_volume_result_and_export_stay_on_its_grid(context, runner_factory, demo, tmp_path) -> None:
    runner = runner_factory(context)
    volume = load_ct(context, "oblique CT")
    angle = np.deg2rad(25.0)
    directions = [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    volume.SetIJKToRASDirections(directions)
    job = run(runner, demo, volume)
    assert job.monitor.outcome == "done", job.monitor.error
    testing.check_result(CHECK, context, job.segmentationNode, demo, volume)
    written = export_labelmap(context, job.segmentationNode, tmp_path / "oblique.nii.gz", demo)
    labels = testing.check_labelmap_export(CHECK, written, demo, volume)
    assert np.allclose(ijk_to_ras(volume)[:3, :3] / np.array(volume.GetSpacing()), directions, atol=1e-6)
    assert (labels > 0).sum() > 1000


def general_transform(context, name: str = "registration"):
    """A linear transform as registration leaves one: rotations by angles that are not right angles
    about two axes, and a translation (``Translate(40, -30, 50) . RotateY(35) . RotateX(-20)``)."""
    import vtk

    transform = vtk.vtkTransform()
    transform.Translate(40.0, -30.0, 50.0)
    transform.RotateY(35.0)
    transform.RotateX(-20.0)
    node = context.add_node("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(transform.GetMatrix())
    return node


def test_volume_under_a_transform_segments_in_place_and_exports_hardened(context, runner_factory, demo,
                                                                         tmp_path) -> None:
    runner = runner_factory(context)
    plain = load_ct(context, "plain CT")
    moved = load_ct(context, "moved CT")
    transform = general_transform(context)
    moved.SetAndObserveTransformNodeID(transform.GetID())
    job_plain, job_moved = run(runner, demo, plain), run(runner, demo, moved)
    assert job_moved.monitor.outcome == "done", job_moved.monitor.error
    node = job_moved.segmentationNode
    assert node.GetTransformNodeID() == transform.GetID()
    testing.check_result(CHECK, context, node, demo, moved)  # reference geometry, Segment Editor's canvas
    # The same voxels as without the transform, placed by it: world bounds follow the volume.
    seg_bounds, vol_bounds = [0.0] * 6, [0.0] * 6
    node.GetRASBounds(seg_bounds)
    moved.GetRASBounds(vol_bounds)
    assert all(vol_bounds[2 * a] - 1e-3 <= seg_bounds[2 * a] <= seg_bounds[2 * a + 1] <= vol_bounds[2 * a + 1] + 1e-3
               for a in range(3))
    plain_masks = testing.all_masks(context, job_plain.segmentationNode, plain)
    moved_masks = testing.all_masks(context, node, moved)
    assert all(np.array_equal(plain_masks[k], moved_masks[k]) for k in plain_masks)
    written = export_labelmap(context, node, tmp_path / "moved.nii.gz", demo)
    testing.check_labelmap_export(CHECK, written, demo, moved)  # affine = transform @ IJK-to-RAS
    assert moved.GetTransformNodeID() == transform.GetID() and node.GetTransformNodeID() == transform.GetID()
    seg_path = export_segmentation_file(context, node, tmp_path / "moved.seg.nrrd")
    reread = context.add_node("vtkMRMLSegmentationNode", "read back")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(seg_path))
    assert storage.ReadData(reread)
    testing.check_seg_nrrd_grid(CHECK, str(seg_path), moved)  # the volume's grid moved by the transform
    hardened = load_ct(context, "hardened CT")  # the moved volume's grid, in world coordinates
    hardened.SetAndObserveTransformNodeID(transform.GetID())
    hardened.HardenTransform()
    for segment_id, mask in moved_masks.items():  # the file holds the segments where they are shown
        assert np.array_equal(testing.segment_mask(context, reread, segment_id, hardened), mask), segment_id
    assert node.GetTransformNodeID() == transform.GetID(), "exporting hardened the user's node"


def test_user_chain_on_a_volume_under_a_general_transform(context, runner_factory, demo, tmp_path) -> None:
    """Segment, correct with Segment Editor's logic, re-run, replace and export a volume under a
    registration-like transform: every step stays on the volume's grid, applied once."""
    runner = runner_factory(context)
    volume = load_ct(context, "registered CT")
    volume.SetAndObserveTransformNodeID(general_transform(context).GetID())

    def segment(outputSegmentation=None, replaceOutput=False):
        return run(runner, demo, volume, outputSegmentation=outputSegmentation, replaceOutput=replaceOutput)

    node = testing.run_user_chain(CHECK, context, segment, lambda n, p: export_labelmap(context, n, p, demo),
                                  lambda n, p: export_segmentation_file(context, n, p), volume, demo, str(tmp_path))
    assert node.GetTransformNodeID() == volume.GetTransformNodeID()


def test_the_demo_gives_the_native_answer_on_a_4x_finer_ct(context, runner_factory, demo) -> None:
    """Slicer's Sample Data CTChest is the full-resolution scan (512 x 512 x ~139) of which
    slicerio's CTChest4 is a 4x downsample; a 4x upsampled CTChest4 stands in for it. The demo card
    resamples to its training spacing and back, so the answer is the native one (Dice per label)."""
    runner = runner_factory(context)
    volume = load_ct(context)
    native = run(runner, demo, volume)
    assert native.monitor.outcome == "done", native.monitor.error
    dice = testing.check_finer_resolution(CHECK, context, lambda fine: run(runner, demo, fine, wait_s=900), demo,
                                          volume, native.segmentationNode)
    assert set(dice) == set(testing.RESOLUTION_DICE)
    print("Dice per label, 4x finer CT against the native run:", {k: round(v, 3) for k, v in dice.items()})


# ------------------------------------------------------------------------------------------ DICOM
def test_dicom_volume_result_is_in_its_study_and_ready_for_dicom_seg(context, runner_factory, demo,
                                                                      tmp_path) -> None:
    runner = runner_factory(context)
    volume = load_ct(context, "CT from DICOM")
    study = in_study(context, volume, dicom=True)
    job = run(runner, demo, volume)
    assert job.monitor.outcome == "done", job.monitor.error
    node = job.segmentationNode
    hierarchy = context.subject_hierarchy
    assert hierarchy.GetItemParent(subject_hierarchy_item(context, node)) == study
    assert prepare_dicom_seg_export(context, node) == subject_hierarchy_item(context, node)
    with pytest.raises(ExportError) as refused:
        export_dicom_seg(context, node, str(tmp_path))
    assert str(refused.value) == INSTALL_QUANTITATIVE_REPORTING and "QuantitativeReporting" in str(refused.value)

    handed = {}

    class Exporter:  # what QuantitativeReporting's plugin receives
        def examineForExport(self, item):
            handed["item"] = item
            return [type("Exportable", (), {"directory": ""})()]

        def export(self, exportables):
            handed["directory"] = exportables[0].directory
            return ""

    export_dicom_seg(context, node, str(tmp_path), load_exporter=lambda: Exporter)
    assert handed == {"item": subject_hierarchy_item(context, node), "directory": str(tmp_path)}


def test_dicom_seg_refuses_a_volume_not_from_dicom(context, demo, tmp_path) -> None:
    volume = load_ct(context)
    node = context.add_node("vtkMRMLSegmentationNode", "manual")
    node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), volume.GetID())
    with pytest.raises(ExportError, match="not from DICOM|was not"):
        export_dicom_seg(context, node, str(tmp_path))


# ------------------------------------------------------------------------------------------ failures
def test_a_result_that_does_not_fit_the_card_changes_nothing(context, demo, tmp_path) -> None:
    volume = load_ct(context)
    node = context.add_node("vtkMRMLSegmentationNode", "user's work")
    node.GetSegmentation().AddEmptySegment("", "mine", [0, 1, 0])
    before = testing.scene_snapshot(context)
    with pytest.raises(ResultError, match=r"\[9\].*do not belong together"):
        import_result(context, str(engine_result(tmp_path, demo, volume, [5, 9])), demo, volume)
    with pytest.raises(ResultError, match="do not belong together"):
        import_result(context, str(engine_result(tmp_path, demo, volume, [9])), demo, volume, node, True)
    assert testing.scene_snapshot(context) == before
    other = load_ct(context, "other CT")
    node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), other.GetID())
    before = testing.scene_snapshot(context)
    with pytest.raises(ResultError, match="was made on 'other CT'"):
        import_result(context, str(engine_result(tmp_path, demo, volume, [5])), demo, volume, node, True)
    assert testing.scene_snapshot(context) == before
    with pytest.raises(ResultError, match="could not be read"):
        import_result(context, str(tmp_path / "nothing.nrrd"), demo, volume)
    assert testing.scene_snapshot(context) == before


def test_replace_keeps_a_user_segment_whose_id_clashes_with_the_cards(context, demo, tmp_path) -> None:
    volume = load_ct(context)
    node = import_result(context, str(engine_result(tmp_path, demo, volume, [1, 5])), demo, volume)
    segmentation = node.GetSegmentation()
    segmentation.RemoveSegment("Segment_2")  # the user deleted a model segment...
    segmentation.AddEmptySegment("Segment_2", "my Segment_2", [0, 0, 1])  # ...and made one with its id
    import_result(context, str(engine_result(tmp_path, demo, volume, [1, 2])), demo, volume, node, True)
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    names = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
    assert segmentation.GetSegment("Segment_2").GetName() == "my Segment_2"
    assert len(ids) == len(set(ids)) == 8
    assert names.count("cervical vertebral column") == 1 and "my Segment_2" in names


def test_engine_error_changes_nothing_and_removes_the_run_folder(context, runner_factory, demo, tmp_path) -> None:
    runner = runner_factory(context)
    volume = load_ct(context)
    before = testing.scene_snapshot(context)
    job = run(runner, demo, volume, checkpointPath=str(tmp_path / "missing.safetensors"))
    assert job.monitor.outcome == "error" and "missing.safetensors" in job.monitor.error
    assert job.segmentationNode is None and not os.path.exists(job.tempDir)
    assert testing.scene_snapshot(context) == before


def test_cancel_changes_nothing(context, runner_factory, demo) -> None:
    runner = runner_factory(context)
    volume = load_ct(context)
    before = testing.scene_snapshot(context)
    job = runner.segment(demo, [volume], RunSettings(device="cpu", keepWarm=False))
    job.cancel()
    runner.wait_for(job, timeout=60)
    assert job.monitor.outcome == "cancelled" and job.segmentationNode is None
    assert not os.path.exists(job.tempDir)
    assert testing.scene_snapshot(context) == before


def test_volume_deleted_during_the_run_stops_it_and_imports_nothing(context, runner_factory, demo) -> None:
    runner = runner_factory(context)
    volume = load_ct(context)
    job = runner.segment(demo, [volume], RunSettings(device="cpu", keepWarm=False))
    context.scene.RemoveNode(volume)
    before = testing.scene_snapshot(context)
    runner.wait_for(job, timeout=60)
    assert job.monitor.outcome == "error" and "removed from the scene" in job.monitor.error
    assert job.segmentationNode is None and not os.path.exists(job.tempDir)
    assert testing.scene_snapshot(context) == before


def test_wrong_inputs_are_refused_before_anything_starts(context, runner_factory, demo) -> None:
    runner = runner_factory(context)
    volume = load_ct(context)
    before = testing.scene_snapshot(context)
    with pytest.raises(ValueError, match="needs 1 input"):
        runner.segment(demo, [volume, volume], RunSettings())
    with pytest.raises(ValueError, match="Select a model"):
        runner.segment({}, [volume], RunSettings())
    assert runner.jobs == [] and testing.scene_snapshot(context) == before
