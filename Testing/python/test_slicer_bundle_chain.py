"""A MONAI bundle in the Slicer half, on slicer-core: Add model... (a zipped bundle copied into the
cards folder), the model list (``volseg models --json`` in a background engine), a segmentation run
through the bundle's translated card in the warm engine (`volseg serve`), and the result imported as segments
named, coloured and coded from the bundle's metadata."""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "VolSegSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

pytest.importorskip("slicer", reason="slicer-core is part of the [test] extra: pip install -e '.[test]'")

from VolSegSlicerLib.bundles import BundleError, add_bundle  # noqa: E402
from VolSegSlicerLib.mrml import segment_tag, terminology_tag_name, volume_array  # noqa: E402
from VolSegSlicerLib.runner import EngineRunner  # noqa: E402
from VolSegSlicerLib.settings import RunSettings  # noqa: E402
from slicer_scene import load_ct  # noqa: E402
from VolSegSlicerLib import testing  # noqa: E402
from volseg.cli.main import main  # noqa: E402
from test_bundles import BUNDLES, copy_bundle, random_weights  # noqa: E402


def small_spleen_bundle(tmp_path: Path) -> Path:
    """The spleen bundle's layout and configs with a smaller UNet, window and grid (CPU seconds), random weights."""
    if not BUNDLES.is_dir():
        pytest.skip("../shared/monai-bundles is not beside this checkout")
    bundle = copy_bundle(BUNDLES, "spleen_ct_segmentation", tmp_path)
    config_path = bundle / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["network_def"].update(channels=[4, 8, 16], strides=[2, 2])
    config["inferer"].update(roi_size=[64, 64, 64])
    config["preprocessing"]["transforms"][3]["pixdim"] = [4.0, 4.0, 6.0]
    config["preprocessing"]["transforms"][4].update(a_min=-1000, a_max=400)
    config_path.write_text(json.dumps(config))
    random_weights(bundle, seed=2)  # a seed whose output is neither all spleen nor none
    return bundle


def test_a_bundle_added_from_a_zip_segments_in_the_scene(context, tmp_path) -> None:
    bundle = small_spleen_bundle(tmp_path / "src")
    archive = tmp_path / "spleen_ct_segmentation.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in bundle.rglob("*"):
            if p.is_file():
                z.write(p, f"spleen_ct_segmentation/{p.relative_to(bundle)}")
    cards = tmp_path / "cards"
    cards.mkdir()
    added = add_bundle(archive, cards)
    assert added == cards / "spleen_ct_segmentation" and (added / "models" / "model.pt").is_file()
    assert sorted(p.name for p in cards.iterdir()) == ["spleen_ct_segmentation"]  # no staging folder left
    with pytest.raises(BundleError, match="already holds"):
        add_bundle(archive, cards)  # nothing replaced

    (tmp_path / "runs").mkdir()
    runner = EngineRunner(context, str(MODULE_DIR), temp_root=str(tmp_path / "runs"))
    try:
        received = {}
        runner.wait_for(runner.query_models(str(cards), lambda models, error: received.update(models=models, error=error)),
                        timeout=120)
        model = next(m for m in received["models"] if m["id"] == "spleen-ct-segmentation")
        assert model["bundle"]["weights"] == "present" and model["card_path"] == str(added)
        volume = load_ct(context)
        job = runner.segment(model, [volume], RunSettings(device="cpu", keepWarm=True), cards_dir=str(cards))
        runner.wait_for(job, timeout=240)
        assert job.monitor.outcome == "done", job.monitor.error
        node = job.segmentationNode
        segmentation = node.GetSegmentation()
        assert segmentation.GetNumberOfSegments() == 1
        segment = segmentation.GetNthSegment(0)
        assert segment.GetName() == "spleen"
        assert "SCT^78961009^Spleen" in segment_tag(segment, terminology_tag_name())  # SNOMED CT code of the spleen
        import nrrd
        import slicer

        labelmap = context.add_node("vtkMRMLLabelMapVolumeNode", "check")
        slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(node, labelmap)
        labels = volume_array(labelmap)  # (K, J, I)
        # the same bundle run by the engine's command line on the same file: the scene holds exactly that
        assert main(["segment", testing.sample_ct_path(), "--bundle", str(added), "-o", str(tmp_path / "cli.nrrd"),
                     "--device", "cpu", "--progress", "none"]) == 0
        expected = nrrd.read(str(tmp_path / "cli.nrrd"))[0].transpose(2, 1, 0)
        assert labels.shape == expected.shape
        np.testing.assert_array_equal(labels != 0, expected == 1)
        assert 0 < int(np.count_nonzero(labels)) < labels.size  # random weights paint part of the CT
    finally:
        runner.shutdown()


def test_adding_refuses_links_and_needs_a_cards_folder(context, tmp_path) -> None:
    if not BUNDLES.is_dir():
        pytest.skip("../shared/monai-bundles is not beside this checkout")
    bundle = copy_bundle(BUNDLES, "spleen_ct_segmentation", tmp_path / "src")
    (bundle / "docs" / "secret").symlink_to("/etc/hostname")
    cards = tmp_path / "cards"
    cards.mkdir()
    with pytest.raises(BundleError, match="link"):
        add_bundle(bundle, cards)
    assert list(cards.iterdir()) == []
    with pytest.raises(BundleError, match="folder for your own models"):
        add_bundle(bundle, "")
    shutil.rmtree(bundle)
