"""Reading volumes: grids as the files define them, and one clear InputError for each bad input."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from volseg.errors import InputError
from volseg.io import Volume, read_inputs, read_volume

AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 2.0, 0, 5.0], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _ramp(shape=(6, 5, 4), dtype=np.float32) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=dtype).reshape(shape)


def test_reads_ct_nrrd_with_its_native_type_and_header_grid(ct_path):
    vol = read_volume(ct_path)
    data, header = nrrd.read(str(ct_path), index_order="F")
    assert vol.array.shape == data.shape == (128, 128, 34)
    assert vol.array.dtype == data.dtype
    np.testing.assert_array_equal(vol.array, data)
    directions = np.asarray(header["space directions"], dtype=float)  # rows = axes, LPS
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(vol.ijk_to_lps[:3, :3], directions.T, atol=1e-9)
    np.testing.assert_allclose(vol.origin, header["space origin"], atol=1e-9)
    np.testing.assert_allclose(vol.spacing, np.linalg.norm(directions, axis=1), atol=1e-9)
    np.testing.assert_allclose(vol.ijk_to_ras, np.diag([-1, -1, 1, 1]) @ vol.ijk_to_lps)
    assert vol.source.format == "nrrd" and vol.source.paths == [Path(ct_path)]
    assert vol.spatial_shape == (128, 128, 34)


def test_reads_nifti_with_its_affine(tmp_path):
    data = _ramp(dtype=np.int16)
    vol = read_volume(_nifti(tmp_path / "a.nii.gz", data))
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, data)
    np.testing.assert_allclose(vol.ijk_to_ras, AFFINE, atol=1e-6)
    assert vol.source.format == "nifti"


def test_read_inputs_stacks_channels_as_float32(tmp_path):
    a, b = _ramp(), _ramp()[::-1].copy()
    vol = read_inputs([_nifti(tmp_path / "t1.nii.gz", a), _nifti(tmp_path / "t2.nii", b)], expected_channels=2)
    assert vol.array.shape == (2, 6, 5, 4) and vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array[0], a)
    np.testing.assert_array_equal(vol.array[1], b)
    np.testing.assert_allclose(vol.ijk_to_ras, AFFINE, atol=1e-6)
    assert [p.name for p in vol.source.paths] == ["t1.nii.gz", "t2.nii"]


def test_read_inputs_keeps_narrow_stored_dtypes(tmp_path):
    """An int16 CT stays int16 (the way in converts it on the device), without a copy for one channel;
    channels of different dtypes share the narrowest exact one; wider dtypes become float32."""
    ct = _ramp(dtype=np.int16) - 60
    vol = read_inputs([_nifti(tmp_path / "ct.nii.gz", ct)])
    assert vol.array.shape == (1, 6, 5, 4) and vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array[0], ct)
    mask = (_ramp(dtype=np.uint8) % 2).astype(np.uint8)
    both = read_inputs([_nifti(tmp_path / "ct.nii.gz", ct), _nifti(tmp_path / "m.nii.gz", mask)], expected_channels=2)
    assert both.array.dtype == np.int16
    np.testing.assert_array_equal(both.array[1], mask)
    big = read_inputs([_nifti(tmp_path / "u16.nii.gz", _ramp(dtype=np.uint16) + 60000),
                       _nifti(tmp_path / "i16.nii.gz", ct)], expected_channels=2)
    assert big.array.dtype == np.float32  # uint16 and int16 meet in int32: float32, exact for 16 bits
    np.testing.assert_array_equal(big.array[0], _ramp() + 60000)
    wide = read_inputs([_nifti(tmp_path / "f64.nii.gz", _ramp(dtype=np.float64) / 3)])
    assert wide.array.dtype == np.float32
    np.testing.assert_array_equal(wide.array[0], (_ramp(dtype=np.float64) / 3).astype(np.float32))


def test_input_dtype():
    from volseg.io.readers import input_dtype

    assert input_dtype([np.dtype(">i2")]) == np.dtype(np.int16) and input_dtype([np.dtype(">i2")]).isnative
    assert input_dtype([np.dtype(np.uint8), np.dtype(np.int8)]) == np.int16
    assert input_dtype([np.dtype(np.int32)]) == np.float32
    assert input_dtype([np.dtype(np.float16)]) == np.float16
    assert input_dtype([np.dtype(np.float16), np.dtype(np.int16)]) == np.float32


def test_volume_helpers():
    vol = Volume(np.zeros((2, 3, 4)), spacing=[1, 2, 3], origin=[4, 5, 6], direction=np.eye(3))
    other = vol.with_array(np.ones((1, 2, 3, 4), np.float32))
    assert other.same_grid(vol) and other.array.shape == (1, 2, 3, 4)
    assert other.spacing is not vol.spacing  # grids are copied, not shared
    moved = Volume(np.zeros((2, 3, 4)), spacing=[1, 2, 3], origin=[4, 5, 6.1], direction=np.eye(3))
    assert not vol.same_grid(moved) and "origin" in vol.grid_differences(moved)[0]
    with pytest.raises(ValueError, match="spatial shape"):
        vol.with_array(np.zeros((3, 3, 4)))
    np.testing.assert_allclose(vol.ijk_to_lps @ [1, 1, 1, 1], [5, 7, 9, 1])


# ---------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="missing.nii.gz.*does not exist"):
        read_inputs([tmp_path / "missing.nii.gz"])


@pytest.mark.parametrize("name", ["garbage.nii.gz", "garbage.nrrd", "garbage.mha", "notes.txt"])
def test_garbage_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image\n" * 20)
    with pytest.raises(InputError, match=f"cannot read .*{name}") as info:
        read_inputs([path])
    assert "Traceback" not in str(info.value) and len(str(info.value)) < 600


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz", "cut.nrrd", "cut.mha"])
def test_truncated_file(tmp_path, name):
    # ITK alone would zero-fill a truncated NIfTI without a word
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(_ramp((20, 20, 20))), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=name):
        read_inputs([path])


def test_nifti_scaling_is_applied(tmp_path):
    image = nib.Nifti1Image(_ramp(dtype=np.int16), AFFINE)
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, str(tmp_path / "scaled.nii.gz"))
    vol = read_inputs([tmp_path / "scaled.nii.gz"])
    np.testing.assert_allclose(vol.array[0], _ramp() * 2.0 - 1024.0)


def test_2d_image(tmp_path):
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 9), np.float32), np.eye(4)), str(path))
    with pytest.raises(InputError, match="2D image"):
        read_inputs([path])


def test_4d_image_suggests_splitting(tmp_path):
    path = _nifti(tmp_path / "multi.nii.gz", np.zeros((6, 5, 4, 2), np.float32))
    with pytest.raises(InputError, match="4D image") as info:
        read_inputs([path])
    assert "split" in info.value.hint


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_vector_image(tmp_path, suffix):
    path = tmp_path / f"rgb{suffix}"
    sitk.WriteImage(sitk.Image([6, 5, 4], sitk.sitkVectorFloat32, 3), str(path))
    with pytest.raises(InputError, match="vector/multi-component image \\(3 components"):
        read_inputs([path])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_nan_and_inf_voxels_are_counted(tmp_path, suffix):
    data = _ramp()
    data[0, 0, 0] = data[1, 2, 3] = np.nan
    data[2, 2, 2] = -np.inf
    path = tmp_path / f"bad{suffix}"
    image = sitk.GetImageFromArray(data.transpose(2, 1, 0).copy())
    sitk.WriteImage(image, str(path))
    with pytest.raises(InputError, match="has 2 NaN and 1 infinite voxel"):
        read_inputs([path])


def test_zero_spacing(tmp_path):
    path = tmp_path / "flat.nrrd"
    header = {"space": "left-posterior-superior", "space directions": np.diag([1.0, 0.0, 1.0]), "space origin": [0, 0, 0]}
    nrrd.write(str(path), np.zeros((4, 5, 6), np.int16), header)
    with pytest.raises(InputError, match="spacing of 0 mm"):
        read_inputs([path])


@pytest.mark.parametrize("spacings", [[1.0, -2.0, 1.0], [1.0, 0.0, 1.0]])
def test_non_positive_nrrd_spacings(tmp_path, spacings):
    path = tmp_path / "neg.nrrd"
    nrrd.write(str(path), np.zeros((4, 5, 6), np.int16), {"spacings": spacings})
    with pytest.raises(InputError, match="spacings must be > 0"):
        read_inputs([path])


def test_sheared_grid(tmp_path):
    affine = np.eye(4)
    affine[0, 1] = 0.5
    with pytest.raises(InputError, match="sheared"):
        read_inputs([_nifti(tmp_path / "shear.nii.gz", _ramp(), affine)])


@pytest.mark.parametrize(
    "shape, affine, what",
    [
        ((6, 5, 3), AFFINE, "shape"),
        ((6, 5, 4), np.diag([1.5, 2.0, 3.0, 1.0]) + np.array([[0, 0, 0, -10.0], [0, 0, 0, 5], [0, 0, 0, 7], [0] * 4]), "spacing"),
        ((6, 5, 4), AFFINE + np.array([[0, 0, 0, 1.0], [0] * 4, [0] * 4, [0] * 4]), "origin"),
        ((6, 5, 4), np.diag([-1, 1, 1, 1]) @ AFFINE, "direction"),
    ],
)
def test_inputs_on_different_grids(tmp_path, shape, affine, what):
    first = _nifti(tmp_path / "t1.nii.gz", _ramp())
    second = _nifti(tmp_path / "flair.nii.gz", _ramp(shape), affine)
    expected = f"flair.nii.gz \\(channel 1 \\(FLAIR\\)\\) is not on the grid of .*t1.nii.gz.*{what}"
    with pytest.raises(InputError, match=expected) as info:
        read_inputs([first, second], channel_names=["T1", "FLAIR"])
    assert "resample" in info.value.hint


def test_wrong_channel_count_names_the_channels(tmp_path):
    path = _nifti(tmp_path / "t1.nii.gz", _ramp())
    with pytest.raises(InputError, match="takes 4 input channel\\(s\\): T1, T1ce, T2, FLAIR; 1 input file"):
        read_inputs([path], channel_names=["T1", "T1ce", "T2", "FLAIR"])
    with pytest.raises(InputError, match="takes 2 input channel"):
        read_inputs([path], expected_channels=2)
    with pytest.raises(InputError, match="no input"):
        read_inputs([])


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(InputError, match="without a DICOM series"):
        read_volume(tmp_path)


def test_single_dicom_file_points_to_its_folder(tmp_path):
    path = tmp_path / "IM0001.dcm"
    path.write_bytes(b"\0" * 200)
    with pytest.raises(InputError, match="single DICOM file") as info:
        read_volume(path)
    assert str(tmp_path) in info.value.hint


@pytest.mark.parametrize("name", ["UP.MHA", "up.NRRD", "Up.Nii.Gz", "up.NII"])
def test_upper_case_extensions_are_read(tmp_path, name):
    import SimpleITK as sitk

    from volseg.io import read_volume

    a = np.arange(4 * 5 * 6, dtype=np.float32).reshape(6, 5, 4)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((1.0, 2.0, 3.0))
    lower = tmp_path / ("x" + name[name.index("."):].lower())
    sitk.WriteImage(img, str(lower))
    path = tmp_path / name
    lower.rename(path)
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.array, a.transpose(2, 1, 0))
    np.testing.assert_allclose(vol.spacing, (1.0, 2.0, 3.0))


def test_a_volume_under_another_extension_says_the_name_is_the_problem(tmp_path, ct_path):
    """A NRRD named ct.jpg (or ct.nii): the extension is named as the problem, with the name to use."""
    import shutil

    for name, want in (("ct.jpg", "ct.nrrd"), ("ct.nii", "ct.nrrd"), ("ct", "ct.nrrd")):
        path = tmp_path / name
        shutil.copy(ct_path, path)
        with pytest.raises(InputError) as info:
            read_inputs([path])
        assert "holds a NRRD volume" in info.value.message and "the extension is the problem" in info.value.message
        assert f"rename it to {want}" in info.value.hint
    nifti = _nifti(tmp_path / "scan.nii.gz", _ramp())
    shutil.copy(nifti, tmp_path / "scan.mha")
    with pytest.raises(InputError, match="holds a NIfTI volume but its name ends in '.mha'") as info:
        read_inputs([tmp_path / "scan.mha"])
    assert "scan.nii.gz" in info.value.hint
    assert read_inputs([nifti]).array.shape == (1, *_ramp().shape)  # the right name reads
    pair = tmp_path / "pair.hdr"  # a NIfTI pair (.hdr + .img) is read under its own name
    nib.save(nib.Nifti1Pair(_ramp(), AFFINE), str(pair))
    assert read_inputs([pair]).array.shape == (1, *_ramp().shape)


def test_a_picture_is_called_a_picture(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "photo.png")
    Image.new("L", (64, 48)).save(tmp_path / "slice.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "photo.jpg")
    expected = {"photo.png": "a PNG picture (64x48, RGB colour): a colour photo or screenshot",
                "slice.png": "a PNG picture (64x48, greyscale): a 2D picture",
                "photo.jpg": "a JPEG picture: a photo or 2D picture"}
    for name, words in expected.items():
        with pytest.raises(InputError) as info:
            read_inputs([tmp_path / name])
        assert words in info.value.message and "not a 3D CT or MRI volume" in info.value.message
        assert "multi-component" not in info.value.message and "NRRD" in info.value.hint


def test_a_cut_short_gzip_nrrd_is_called_truncated(tmp_path, ct_path):
    """The first 300,000 bytes of CTChest4 gave teem's '_nrrdEncodingGzip_read: expected 2228224
    bytes but received 896392': say in words that the file is cut short, and what to do."""
    path = tmp_path / "cut.nrrd"
    path.write_bytes(ct_path.read_bytes()[:300_000])
    with pytest.raises(InputError, match=r"cut.nrrd is truncated: its header promises 2,228,224 bytes") as info:
        read_inputs([path])
    assert "_nrrdEncoding" not in info.value.message and "copy or export it again" in info.value.hint
