"""End to end through `volseg segment`: a known shape in the input comes back at the same place.

The model is a TorchScript threshold (label 1 where the scaled intensity > 0.5), so the right
answer is known exactly. The inputs are RAS, LPS and oblique files; the card reorients to RAS
(and in one test resamples), runs sliding windows, then inverts onto the input grid.
"""

from __future__ import annotations

import math

import nibabel as nib
import nrrd
import numpy as np
import pytest
from conftest import make_card

from volseg.cli.main import main
from volseg.io import read_volume

SHAPE = (40, 36, 24)
SCALE = [{"name": "ScaleIntensityRange", "args": {"a_min": 0, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}}]
REORIENT = [{"name": "Orientation", "args": {"axcodes": "RAS", "labels": None}}]


def box_volume() -> np.ndarray:
    a = np.zeros(SHAPE, np.float32)
    a[5:17, 20:30, 3:9] = 1000.0  # off-centre and asymmetric, so a flip or swap would show
    a[30:34, 4:8, 15:20] = 1000.0
    return a


def rotation(z_deg: float, x_deg: float) -> np.ndarray:
    cz, sz = math.cos(math.radians(z_deg)), math.sin(math.radians(z_deg))
    cx, sx = math.cos(math.radians(x_deg)), math.sin(math.radians(x_deg))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ rx


def write_nifti(path, array, direction_ras, spacing, origin_ras):
    affine = np.eye(4)
    affine[:3, :3] = direction_ras @ np.diag(spacing)
    affine[:3, 3] = origin_ras
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def write_nrrd_lps(path, array, direction_lps, spacing, origin_lps):
    header = {"space": "left-posterior-superior", "space directions": (direction_lps @ np.diag(spacing)).T,
              "space origin": np.asarray(origin_lps, float), "kinds": ["domain"] * 3}
    nrrd.write(str(path), array, header)
    return path


@pytest.fixture(params=["ras-nifti", "flipped-nifti", "lps-nrrd", "oblique-nifti", "oblique-nrrd"])
def box_input(request, tmp_path):
    a = box_volume()
    kind = request.param
    if kind == "ras-nifti":
        return write_nifti(tmp_path / "in.nii.gz", a, np.eye(3), (1.2, 0.8, 2.0), (-20, 10, 5))
    if kind == "flipped-nifti":  # LPI-stored data in a NIfTI
        return write_nifti(tmp_path / "in.nii.gz", a, np.diag([-1.0, -1.0, -1.0]), (1.0, 1.0, 1.5), (30, 20, 10))
    if kind == "lps-nrrd":
        return write_nrrd_lps(tmp_path / "in.nrrd", a, np.eye(3), (0.9, 0.9, 2.5), (-10, -5, 40))
    if kind == "oblique-nifti":
        return write_nifti(tmp_path / "in.nii", a, rotation(30, 10), (1.0, 1.1, 1.7), (3, -4, 8))
    return write_nrrd_lps(tmp_path / "in.nrrd", a, rotation(-25, 15)[:, [1, 0, 2]], (1.3, 0.7, 2.0), (0, 0, 0))


@pytest.mark.parametrize("out_name", ["out.seg.nrrd", "out.nii.gz", "out.nrrd"])
def test_known_box_returns_to_the_same_voxels(box_input, out_name, tmp_path, threshold_torchscript):
    card = make_card(tmp_path, preprocessing=REORIENT + SCALE)
    out = tmp_path / out_name
    rc = main(["segment", str(box_input), "--model", str(card), "--checkpoint", str(threshold_torchscript),
               "-o", str(out), "--progress", "none", "--device", "cpu"])
    assert rc == 0
    source = read_volume(box_input)
    if out_name.endswith(".seg.nrrd"):
        import slicerio

        seg = slicerio.read_segmentation(str(out))
        labels = np.asarray(seg["voxels"])
        assert np.allclose(seg["ijkToLPS"], source.ijk_to_lps, atol=1e-4)
    else:
        result = read_volume(out)
        assert result.same_grid(source)
        labels = result.array
    assert labels.shape == SHAPE
    np.testing.assert_array_equal(labels == 1, box_volume() > 500)


def test_resampling_card_puts_the_box_back_in_place(tmp_path, threshold_torchscript):
    """With a Spacing step the output is resampled twice: borders may move by a voxel, the box may not."""
    src = write_nifti(tmp_path / "in.nii.gz", box_volume(), rotation(20, 0), (1.0, 1.0, 2.0), (0, 0, 0))
    spacing = [{"name": "Spacing", "args": {"pixdim": [1.5, 1.5, 1.5], "mode": "bilinear"}}]
    card = make_card(tmp_path, preprocessing=REORIENT + spacing + SCALE)
    out = tmp_path / "out.nii.gz"
    assert main(["segment", str(src), "--model", str(card), "--checkpoint", str(threshold_torchscript),
                 "-o", str(out), "--progress", "none"]) == 0
    got = read_volume(out).array == 1
    want = box_volume() > 500
    dice = 2 * (got & want).sum() / (got.sum() + want.sum())
    assert dice > 0.9
    centroid_got = np.argwhere(got).mean(axis=0)
    centroid_want = np.argwhere(want).mean(axis=0)
    assert np.abs(centroid_got - centroid_want).max() < 0.5
