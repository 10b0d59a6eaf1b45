"""Geometry is exact: a result lands at the same physical place as its input, whatever the
input's orientation (RAS or LPS header, axis-aligned or oblique, flipped axes) and whatever
the output format. Physical positions are computed with each file's own library (nibabel,
pynrrd, slicerio, SimpleITK), not with volseg's code.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from volseg.cards import Label
from volseg.io import read_inputs, read_volume, write_segmentation

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
SHAPE = (20, 16, 12)
BOX = (slice(3, 8), slice(4, 9), slice(2, 5))  # asymmetric, so any flip or swap shows
SEGMENTS = [Label(1, "box", (250, 10, 10), 1, None)]
OUTPUTS = ["o1.nii.gz", "o2.nrrd", "o3.seg.nrrd", "o4.mha"]


def _rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    x, y, z = axis
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    angle = np.deg2rad(degrees)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _box_image() -> np.ndarray:
    data = np.zeros(SHAPE, np.float32)
    data[BOX] = 100.0
    return data


def _positions(ijk_to_xyz: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, 3) physical positions of the voxels in ``mask``, sorted, given a 4x4 ijk->LPS matrix."""
    ijk = np.argwhere(mask)
    xyz = ijk @ ijk_to_xyz[:3, :3].T + ijk_to_xyz[:3, 3]
    return xyz[np.lexsort(xyz.T[::-1].round(3))]


# ---- inputs, each with its expected ijk->LPS matrix computed from its own header


def _nifti_input(tmp_path: Path, linear: np.ndarray, name: str):
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [12.5, -40.0, 17.25]
    path = tmp_path / name
    nib.save(nib.Nifti1Image(_box_image(), affine), str(path))
    ras = nib.load(str(path)).affine
    lps = np.eye(4)
    lps[:3] = np.diag([-1, -1, 1, 1])[:3] @ ras
    return path, lps


def _nrrd_input(tmp_path: Path, linear: np.ndarray, space: str, name: str):
    path = tmp_path / name
    header = {"space": space, "space directions": linear.T, "space origin": np.array([-7.5, 22.0, 101.0])}
    nrrd.write(str(path), _box_image(), header, index_order="F")
    header = nrrd.read_header(str(path))
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(header["space directions"], float).T
    matrix[:3, 3] = header["space origin"]
    if space == "right-anterior-superior":
        matrix[:3] = LPS_FROM_RAS @ matrix[:3]
    return path, matrix


def _mha_input(tmp_path: Path, linear: np.ndarray, name: str):
    spacing = np.linalg.norm(linear, axis=0)
    image = sitk.GetImageFromArray(_box_image().transpose(2, 1, 0).copy())
    image.SetSpacing(spacing.tolist())
    image.SetDirection((linear / spacing).ravel().tolist())
    image.SetOrigin([3.0, -4.0, 5.0])
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    corner = np.array(image.TransformIndexToPhysicalPoint((0, 0, 0)))
    matrix = np.eye(4)
    matrix[:3, 3] = corner
    for axis in range(3):
        index = [0, 0, 0]
        index[axis] = 1
        matrix[:3, axis] = np.array(image.TransformIndexToPhysicalPoint(index)) - corner
    return path, matrix


SPACING = np.diag([0.9, 1.3, 2.7])
OBLIQUE = _rotation([1, 2, 3], 27) @ SPACING
OBLIQUE_FLIPPED = _rotation([-2, 1, 0.5], 41) @ np.diag([-1, 1, 1]) @ SPACING
INPUTS = {
    "nifti-ras-axis-aligned": lambda d: _nifti_input(d, SPACING, "ras.nii.gz"),
    "nifti-oblique": lambda d: _nifti_input(d, OBLIQUE, "oblique.nii.gz"),
    "nifti-oblique-flipped": lambda d: _nifti_input(d, OBLIQUE_FLIPPED, "flipped.nii"),
    "nrrd-lps-oblique": lambda d: _nrrd_input(d, OBLIQUE, "left-posterior-superior", "lps.nrrd"),
    "nrrd-ras-oblique": lambda d: _nrrd_input(d, OBLIQUE_FLIPPED, "right-anterior-superior", "ras.nrrd"),
    "nrrd-ras-axis-aligned": lambda d: _nrrd_input(d, SPACING, "right-anterior-superior", "ras2.nrrd"),
    "mha-oblique": lambda d: _mha_input(d, OBLIQUE_FLIPPED, "oblique.mha"),
}


def _output_positions(path: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """Physical positions of the label voxels of an output file, read with that format's own library."""
    name = path.name
    if name.endswith(".seg.nrrd"):
        seg = slicerio.read_segmentation(str(path))
        return _positions(np.asarray(seg["ijkToLPS"]), slicerio.segment_mask(seg, "box")), seg["voxels"].shape
    if name.endswith(".nrrd"):
        data, header = nrrd.read(str(path), index_order="F")
        assert header["space"] == "left-posterior-superior"
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(header["space directions"], float).T
        matrix[:3, 3] = header["space origin"]
        return _positions(matrix, data == 1), data.shape
    if name.endswith(".nii.gz"):
        image = nib.load(str(path))
        lps = np.eye(4)
        lps[:3] = np.diag([-1, -1, 1, 1])[:3] @ image.affine
        return _positions(lps, np.asarray(image.dataobj) == 1), image.shape
    image = sitk.ReadImage(str(path))
    mask = sitk.GetArrayFromImage(image).transpose(2, 1, 0) == 1
    points = np.array([image.TransformIndexToPhysicalPoint([int(v) for v in ijk]) for ijk in np.argwhere(mask)])
    return points[np.lexsort(points.T[::-1].round(3))], mask.shape


@pytest.mark.parametrize("case", list(INPUTS))
def test_box_comes_back_at_the_same_physical_place(tmp_path, case):
    path, ijk_to_lps = INPUTS[case](tmp_path)
    expected = _positions(ijk_to_lps, _box_image() > 50)

    vol = read_inputs([path])
    np.testing.assert_allclose(vol.ijk_to_lps, ijk_to_lps, atol=1e-4)
    labels = (vol.array[0] > 50).astype(np.uint8)  # a "segmentation" of the box
    for name in OUTPUTS:
        out = write_segmentation(tmp_path / name, labels, vol, SEGMENTS)
        positions, shape = _output_positions(out)
        assert shape == SHAPE, name
        assert positions.shape == expected.shape, name
        np.testing.assert_allclose(positions, expected, atol=1e-3, err_msg=f"{case} -> {name}")
        # and volseg reads its own output back on the input grid
        assert read_volume(out).same_grid(vol, tol=1e-5), f"{case} -> {name}"


def test_nifti_affine_is_the_volume_ras_affine(tmp_path):
    path, _ = _nifti_input(tmp_path, OBLIQUE_FLIPPED, "a.nii.gz")
    np.testing.assert_allclose(read_volume(path).ijk_to_ras, nib.load(str(path)).affine, atol=1e-5)


@pytest.mark.parametrize("name", OUTPUTS)
def test_ct_grid_survives_a_round_trip(tmp_path, ct_path, name):
    ct = read_volume(ct_path)
    labels = (ct.array > 0).astype(np.uint8)
    out = write_segmentation(tmp_path / name, labels, ct, SEGMENTS)
    reference = sitk.ReadImage(str(ct_path))
    written = sitk.ReadImage(str(out))
    exact = not name.endswith(".nii.gz")  # NIfTI stores the grid in float32
    atol = 1e-9 if exact else 2e-5
    assert written.GetSize() == reference.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), rtol=atol, atol=atol)
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), rtol=atol, atol=atol)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=atol)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), labels.transpose(2, 1, 0))
    if name.endswith("nrrd"):
        seg = slicerio.read_segmentation(str(out))
        original = slicerio.read_segmentation(str(ct_path), skip_voxels=True)
        np.testing.assert_allclose(seg["ijkToLPS"], original["ijkToLPS"], atol=1e-9)
        assert seg["voxels"].shape == ct.spatial_shape
