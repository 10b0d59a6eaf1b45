"""Same answers as MONAI's own bundle run (issue 20), for the bundles of ../shared/monai-bundles that
volseg runs beyond spleen_ct_segmentation (compared in test_bundles.py): the Swin UNETR BTCV bundle,
BraTS with its four MR inputs and sigmoid labels, and the renal UNesT bundle whose network is its
own code (run with --trust-bundle-code).

Each test gives the bundle seeded random weights built by MONAI's parser from the bundle's own
``network_def``, runs ``monai.bundle run`` with the bundle's own inference config and metadata, and
runs ``volseg segment --bundle`` on the same volume(s): the label maps are identical, and several
labels occur in them, so that the comparison means something, on one grid (shape and affine).
Where a setting is overridden to fit CI's CPUs, it is overridden identically in both runs (MONAI: a
config override; volseg: its option). Also: the probabilities volseg writes are MONAI's before its
labels are taken (spleen, BraTS), and a scanner-like CT (int16, rescaled, oblique) runs the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bundle_helpers import (BUNDLES, assert_same_grid, copy_bundle, monai_bundle_run, probabilities_postprocessing,
                            random_weights, synthetic_ct, synthetic_mr, volseg_run)


@pytest.fixture(scope="session")
def bundles() -> Path:
    if not BUNDLES.is_dir():
        pytest.skip("../shared/monai-bundles is not beside this checkout")
    return BUNDLES


def _classes(labels: np.ndarray) -> set[int]:
    return set(np.unique(labels).astype(np.int64).tolist())


def test_swin_unetr_btcv_bundle_gives_the_same_label_map_as_monais_own_run(bundles, tmp_path) -> None:
    """14 BTCV classes, softmax, Invertd after Spacingd/Orientationd of an LPS-stored CT.

    Two settings differ from the published config, in both runs alike:

    * ``network_def#img_size`` is deleted for MONAI's run and for the random weights: MONAI 1.6.1's
      SwinUNETR no longer takes it (it only checked the input size) and cannot build the network as
      published; the card drops it the same way (test_swin_unetr_card_drops_the_argument_monai_removed).
    * the window is [64, 32, 32] instead of [96, 96, 96] (MONAI: ``inferer#roi_size``; volseg:
      ``--roi-size``): one 96^3 Swin UNETR window takes ~10-30 s on one CI thread, per run. Each side
      must stay a multiple of 32 and the bottleneck must hold more than one voxel (its InstanceNorm: a
      [32, 32, 32] window fails in MONAI's run too); the resampled volume (55 x 43 x 26) then takes two
      overlapping windows along y, so that blending is compared.
    """
    bundle = copy_bundle(bundles, "swin_unetr_btcv_segmentation", tmp_path)
    network = json.loads((bundle / "configs" / "inference.json").read_text())["network_def"]
    del network["img_size"]
    random_weights(bundle, overrides={"network_def": network})
    image = tmp_path / "ct.nii.gz"
    synthetic_ct(image)
    roi = [64, 32, 32]
    expected = monai_bundle_run(bundle, tmp_path / "monai", datalist=[str(image)], network_def=network,
                                **{"inferer#roi_size": roi})
    got = volseg_run(bundle, image, tmp_path / "volseg.nii.gz", "--roi-size", *map(str, roi))
    assert got.shape == expected.shape == (44, 38, 20)
    assert len(_classes(expected)) >= 10  # a random network's argmax spreads over most of the 14 classes
    np.testing.assert_array_equal(got.astype(np.int64), expected.astype(np.int64))
    assert_same_grid(tmp_path / "monai", tmp_path / "volseg.nii.gz")


def test_brats_bundle_gives_the_same_labels_from_four_mr_inputs_as_monais_own_run(bundles, tmp_path) -> None:
    """Four MR inputs (T1c, T1, T2, FLAIR, the order of metadata.json's channel_def): MONAI's
    ``LoadImaged`` stacks the list of four files of a case into channels (``test_datalist`` overridden
    with that one case); volseg takes one file per channel on the command line, in the same order. The
    volumes are stored LPS and the bundle has no Orientationd, so neither run may reorient them.
    ``NormalizeIntensityd`` (nonzero, channel-wise), sigmoid, threshold 0.5 and the bundle's
    ``Lambdad`` channel -> label mapping (ET 4 over TC 1 over WT 2) must give the same 0/1/2/4 map.

    The window is [32, 32, 16] instead of [240, 240, 160] in both runs (MONAI: ``inferer#roi_size``;
    volseg: ``--roi-size``): a 240x240x160 SegResNet window on one CI thread takes minutes, and the
    small window gives four overlapping windows (two along x, two along z) on the 40 x 32 x 20 volume,
    so that blending counts."""
    bundle = copy_bundle(bundles, "brats_mri_segmentation", tmp_path)
    random_weights(bundle)
    images = synthetic_mr(tmp_path, ["t1c", "t1", "t2", "flair"], shape=(40, 32, 20))
    roi = [32, 32, 16]
    expected = monai_bundle_run(bundle, tmp_path / "monai", test_datalist=[{"image": [str(p) for p in images]}],
                                **{"inferer#roi_size": roi})
    got = volseg_run(bundle, images, tmp_path / "volseg.nii.gz", "--roi-size", *map(str, roi))
    assert got.shape == expected.shape == (40, 32, 20)
    assert _classes(expected) == {0, 1, 2, 4}  # every label value of the lambda, and background
    np.testing.assert_array_equal(got.astype(np.int64), expected.astype(np.int64))
    assert_same_grid(tmp_path / "monai", tmp_path / "volseg.nii.gz")


def test_renal_unest_bundle_with_trust_gives_the_same_label_map_as_monais_own_run(bundles, tmp_path) -> None:
    """The network is the bundle's own code (scripts/networks/unest.py): MONAI's run imports it with the
    bundle root on sys.path (the helpers set it aside again afterwards), volseg with
    ``--trust-bundle-code``; without trust volseg refuses it (test_bundles.py's REFUSED table).

    The published window, 96^3, is kept: UNesT's positional embeddings fix its input size (a 64^3 window
    fails its own check, "`block_size` must divide input depth evenly"), so the volume is kept small
    enough that its 1 mm resampling (79 x 71 x 58) fits one window. The config's run section is
    ``evaluating`` (no ``run``) and its weights are loaded by a CheckpointLoader handler (strict)."""
    bundle = copy_bundle(bundles, "renalStructures_UNEST_segmentation", tmp_path)
    random_weights(bundle)
    image = tmp_path / "ct.nii.gz"
    synthetic_ct(image, shape=(40, 36, 24), spacing=(2.0, 2.0, 2.5))
    expected = monai_bundle_run(bundle, tmp_path / "monai", run_id="evaluating", datalist=[str(image)])
    got = volseg_run(bundle, image, tmp_path / "volseg.nii.gz", "--trust-bundle-code")
    assert got.shape == expected.shape == (40, 36, 24)
    assert _classes(expected) == {0, 1, 2, 3}  # background and the three renal structures
    np.testing.assert_array_equal(got.astype(np.int64), expected.astype(np.int64))
    assert_same_grid(tmp_path / "monai", tmp_path / "volseg.nii.gz")


@pytest.mark.parametrize("name", ["spleen_ct_segmentation", "brats_mri_segmentation"])
def test_probabilities_are_monais_within_1e_4(bundles, tmp_path, name) -> None:
    """``volseg segment --probabilities`` writes what MONAI's run has before its labels are taken: the
    bundle's own postprocessing without ``AsDiscreted``/``Lambdad`` (``Activationsd`` and ``Invertd``
    kept: spleen's softmax mapped back through Spacingd/Orientationd of an LPS CT; BraTS's sigmoid of
    four MR channels, in small windows as in the label test above), one channel per network output,
    in the network's channel order; the label map volseg writes beside them is its label map as above."""
    import nibabel as nib

    bundle = copy_bundle(bundles, name, tmp_path)
    random_weights(bundle)
    overrides: dict = {"postprocessing#transforms": probabilities_postprocessing(bundle)}
    options: list[str] = []
    if name == "brats_mri_segmentation":
        inputs = synthetic_mr(tmp_path, ["t1c", "t1", "t2", "flair"], shape=(40, 32, 20))
        overrides.update(test_datalist=[{"image": [str(p) for p in inputs]}], **{"inferer#roi_size": [32, 32, 16]})
        options = ["--roi-size", "32", "32", "16"]
    else:
        inputs = [tmp_path / "ct.nii.gz"]
        synthetic_ct(inputs[0])
        overrides["datalist"] = [str(inputs[0])]
    expected = monai_bundle_run(bundle, tmp_path / "monai", **overrides)
    volseg_run(bundle, inputs, tmp_path / "volseg.nii.gz", "--probabilities", str(tmp_path / "p.nii.gz"), *options)
    got = np.asarray(nib.load(str(tmp_path / "p.nii.gz")).dataobj)
    assert got.shape == expected.shape and expected.shape[-1] in (2, 3)
    assert expected.std() > 0.01  # probabilities that vary, not one constant
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_an_oblique_int16_ct_with_rescale_gives_the_same_label_map_as_monais_own_run(bundles, tmp_path) -> None:
    """A CT as scanners store it: int16 voxels with a NIfTI rescale (slope 1, intercept -3) and a
    direction rotated 0.2 rad about z (oblique). MONAI's LoadImaged reads it as float32 with the
    rescale applied; Orientationd/Spacingd and Invertd resample through the oblique affine; volseg's
    reader and way back must give the same spleen label map (seed 2: both labels well represented)."""
    import nibabel as nib

    bundle = copy_bundle(bundles, "spleen_ct_segmentation", tmp_path)
    random_weights(bundle, seed=2)
    image = tmp_path / "ct.nii.gz"
    data = synthetic_ct(image)
    affine = nib.load(str(image)).affine.copy()
    c, s = np.cos(0.2), np.sin(0.2)
    affine[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ affine[:3, :3]
    stored = nib.Nifti1Image(np.round(data).astype(np.int16), affine)
    stored.header.set_slope_inter(1.0, -3.0)
    nib.save(stored, str(image))
    expected = monai_bundle_run(bundle, tmp_path / "monai", datalist=[str(image)])
    got = volseg_run(bundle, image, tmp_path / "volseg.nii.gz")
    assert got.shape == expected.shape == (44, 38, 20)
    assert 0.05 < (expected == 1).mean() < 0.95  # both labels occur, and not as a few stray voxels
    np.testing.assert_array_equal(got.astype(np.int64), expected.astype(np.int64))
    assert_same_grid(tmp_path / "monai", tmp_path / "volseg.nii.gz")
