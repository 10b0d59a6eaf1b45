"""Hostile and broken inputs found by review (issue 8): each is refused up front, in one line,
without reading or allocating what its header claims, and without hanging."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import os
import struct
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from volseg.checkpoints.reading import read_checkpoint
from volseg.cli.main import main
from volseg.errors import CheckpointError, InputError
from volseg.io import read_inputs
from volseg.checkpoints.pickle_scan import PickleBombError, scan_pickle


@pytest.fixture
def no_voxel_reads(monkeypatch):
    """Fail the test if any reader starts on the voxels."""
    def forbidden(*args, **kwargs):
        raise AssertionError("voxel data was read before the declared size was checked")

    monkeypatch.setattr(nib, "load", forbidden)
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", forbidden)
    monkeypatch.setattr(sitk, "ReadImage", forbidden)


def _nifti_claiming(path: Path, dims: tuple[int, int, int], gz: bool = False) -> Path:
    raw = bytearray(nib.Nifti1Image(np.zeros((16, 16, 16), np.int16), np.eye(4)).to_bytes())
    struct.pack_into("<8h", raw, 40, 3, *dims, 1, 1, 1, 1)
    data = gzip.compress(bytes(raw) + bytes(60000)) if gz else bytes(raw) + bytes(60000)
    path.write_bytes(data)
    return path


def _nrrd_claiming(path: Path, sizes: str, encoding: str, payload: bytes) -> Path:
    header = ("NRRD0004\ntype: float\nendian: little\ndimension: 3\nspace: left-posterior-superior\n"
              f"sizes: {sizes}\nencoding: {encoding}\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n\n")
    path.write_bytes(header.encode() + payload)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_nifti_claiming_a_gigavoxel_is_refused_before_reading(tmp_path, no_voxel_reads, gz):
    path = _nifti_claiming(tmp_path / ("big.nii.gz" if gz else "big.nii"), (1024, 1024, 1024), gz)
    assert path.stat().st_size < 100_000
    with pytest.raises(InputError, match=r"declares 1024x1024x1024 voxels \(2.0 GiB of data\) but the file") as info:
        read_inputs([path])
    assert "\n" not in info.value.message and "truncated" in info.value.hint


@pytest.mark.parametrize("encoding,compress", [("gzip", gzip.compress), ("raw", lambda b: b), ("bzip2", bz2.compress)])
def test_nrrd_claiming_16_gib_is_refused_before_reading(tmp_path, no_voxel_reads, encoding, compress):
    path = _nrrd_claiming(tmp_path / "big.nrrd", "2048 2048 1024", encoding, compress(bytes(36000)))
    with pytest.raises(InputError, match="declares 2048x2048x1024 voxels"):
        read_inputs([path])


def test_mha_claiming_more_than_its_file_is_refused(tmp_path, no_voxel_reads):
    path = tmp_path / "big.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 512 512 512\nElementType = MET_FLOAT\n"
                     b"ElementDataFile = LOCAL\n" + bytes(30000))
    with pytest.raises(InputError, match="declares 512x512x512 voxels"):
        read_inputs([path])


@pytest.mark.parametrize("header", [b"NDims = -1\nDimSize = 3 2 10\n", b"NDims = 3\nDimSize = 3 -2 10\n",
                                    b"NDims = 3\nDimSize = 3 2 10\nCompressedData = True\nCompressedDataSize = -5\n"])
def test_mha_impossible_dimension_fields_are_refused_before_itk_parses_them(tmp_path, header):
    path = tmp_path / "bad.mha"
    path.write_bytes(b"ObjectType = Image\n" + header + b"ElementType = MET_SHORT\nElementDataFile = LOCAL\n" + bytes(200))
    with pytest.raises(InputError, match="bad.mha"):  # ITK's MetaIO segfaults on NDims = -1
        read_inputs([path])


def _mha_header(dims: str, data_file: str) -> bytes:
    return (f"ObjectType = Image\nNDims = 3\nDimSize = {dims}\nElementType = MET_SHORT\n"
            f"ElementDataFile = {data_file}\n").encode()


def test_detached_data_files_are_counted_list_and_pattern(tmp_path, no_voxel_reads):
    for i in range(6):
        (tmp_path / f"s{i}.raw").write_bytes(bytes(40))  # 4x5 int16 slices
    (tmp_path / "empty_list.mha").write_bytes(_mha_header("4 5 6", "LIST 2D") + b"\x18" * 300)
    with pytest.raises(InputError, match="not a file name"):
        read_inputs([tmp_path / "empty_list.mha"])
    (tmp_path / "no_names.mha").write_bytes(_mha_header("4 5 65535", "LIST 2D"))  # ITK zero-filled 1.3 MB
    with pytest.raises(InputError, match="names no files"):
        read_inputs([tmp_path / "no_names.mha"])
    (tmp_path / "pattern.mha").write_bytes(_mha_header("4 5 600", "s%d.raw 0 5 1 2"))
    with pytest.raises(InputError, match="declares 4x5x600 voxels"):
        read_inputs([tmp_path / "pattern.mha"])


def test_detached_data_files_in_a_list_or_pattern_are_read(tmp_path):
    for i in range(6):
        (tmp_path / f"s{i}.raw").write_bytes(np.full(20, i, np.int16).tobytes())
    (tmp_path / "list.mha").write_bytes(_mha_header("4 5 6", "LIST 2D") + "".join(f"s{i}.raw\n" for i in range(6)).encode())
    (tmp_path / "pattern.mha").write_bytes(_mha_header("4 5 6", "s%d.raw 0 5 1 2"))
    for name in ("list.mha", "pattern.mha"):
        volume = read_inputs([tmp_path / name])
        assert volume.array.shape == (1, 4, 5, 6) and volume.array[0, 0, 0, 5] == 5


def test_a_compressed_volume_within_the_deflate_bound_is_still_read(tmp_path):
    a = np.zeros((64, 64, 64), np.int16)  # compresses about 500:1
    image = sitk.GetImageFromArray(a)
    sitk.WriteImage(image, str(tmp_path / "zeros.nrrd"), useCompression=True)
    assert read_inputs([tmp_path / "zeros.nrrd"]).array.shape == (1, 64, 64, 64)


def test_sheared_direction_is_refused_for_every_format(tmp_path):
    path = tmp_path / "sheared.mha"  # MetaIO accepts a non-orthonormal matrix silently
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nTransformMatrix = 1 1 0 0 1 0 0 0 1\nDimSize = 4 4 4\n"
                     b"ElementType = MET_UCHAR\nElementDataFile = LOCAL\n" + bytes(64))
    with pytest.raises(InputError, match="not orthonormal"):
        read_inputs([path])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX special files")
@pytest.mark.parametrize("special", ["device", "fifo"])
def test_special_files_are_refused_as_inputs_and_checkpoints(tmp_path, special):
    path = tmp_path / "x.nrrd"
    if special == "device":
        path.symlink_to("/dev/zero")
    else:
        os.mkfifo(path)
    with pytest.raises(InputError, match="not a regular file"):
        read_inputs([path])
    ckpt = tmp_path / "model.pt"
    if special == "device":
        ckpt.symlink_to("/dev/zero")
    else:
        os.mkfifo(ckpt)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_checkpoint(ckpt)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX special files")
def test_dicom_folder_holding_a_fifo_is_refused(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    os.mkfifo(folder / "IM0001.dcm")
    with pytest.raises(InputError, match="not a regular file"):
        read_inputs([folder])


# -- checkpoints ---------------------------------------------------------------------------------
def bomb_pickle(depth: int = 60) -> bytes:
    """A dict keyed by a tuple nested ``depth`` deep whose every level holds the level below twice."""
    b = bytearray(b"\x80\x02}q\x00)q\x01")
    for i in range(1, depth + 1):
        b += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86" + b"q" + bytes([i + 1])
    return bytes(b + b"K\x01s.")


def _torch_zip_with(data_pkl: bytes) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            z.writestr(info.filename, data_pkl if info.filename.endswith("data.pkl") else src.read(info))
    return out.getvalue()


@pytest.mark.parametrize("container", ["zip", "pickle"])
def test_pickle_bomb_is_refused_in_well_under_5_seconds(tmp_path, container):
    path = tmp_path / "bomb.pt"
    path.write_bytes(_torch_zip_with(bomb_pickle()) if container == "zip" else bomb_pickle())
    assert path.stat().st_size < 2000
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="expands to more than") as info:
        read_checkpoint(path)
    assert time.monotonic() - start < 5
    assert "\n" not in info.value.message


def test_deep_nesting_is_refused():
    depth = 5000
    with pytest.raises(PickleBombError, match="nested more than"):
        scan_pickle(b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")


def test_legacy_checkpoint_declaring_more_tensor_data_than_it_holds_is_refused(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"a": torch.zeros(1000), "view": torch.zeros(1000)[:10]}, path, _use_new_zipfile_serialization=False)
    assert sorted(read_checkpoint(path).state_dict) == ["a", "view"]
    data = bytearray(path.read_bytes())
    at = data.find(b"M\xe8\x03")  # BININT2 1000: the storage's element count
    data[at + 1:at + 3] = b"\xff\xff"  # 65535 floats (and 1000 for the view): 260 KiB in an 8 KiB file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"declares 266,140 bytes of tensor data but the file holds"):
        read_checkpoint(path)


def test_real_checkpoints_pass_the_scan(golden_dir):
    for path in sorted(golden_dir.glob("*.pt")):
        assert read_checkpoint(path).state_dict  # nothing refused


def test_damaged_central_directory_is_one_clear_refusal(tmp_path, threshold_torchscript):
    data = threshold_torchscript.read_bytes()
    at = data.rfind(b"PK\x01\x02")
    damaged = bytearray(data)
    damaged[at + 20: at + 28] = b"\xff" * 8  # sizes of the last member in the central directory
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="damaged.pt") as info:
        read_checkpoint(path)
    assert "\n" not in info.value.message


def _loops_while_loading():
    """The fuzz generator's TorchScript whose ``__setstate__`` (run by torch.jit.load) never returns."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fuzz_cases", Path(__file__).resolve().parents[2] / "bench" /
                                                  "fuzz_cases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._loops_while_loading_class()()


def test_torchscript_running_its_own_code_at_load_is_refused(tmp_path):
    path = tmp_path / "loops.pt"
    torch.jit.save(torch.jit.script(_loops_while_loading()), str(path))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="__setstate__") as info:
        read_checkpoint(path)  # torch.jit.load would hang here, holding the interpreter lock
    assert time.monotonic() - start < 5 and "--trust-pickle" in info.value.hint


# -- DICOM positions -----------------------------------------------------------------------------
def _series(folder: Path, positions: list) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    for k, position in enumerate(positions):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.InstanceNumber, ds.PatientID = "CT", k + 1, "X"
        ds.ImagePositionPatient = position
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.zeros((4, 4), np.int16).tobytes()
        ds.save_as(str(folder / f"IM{k:04d}.dcm"), enforce_file_format=True)
    return folder


@pytest.mark.parametrize("positions", [
    [[0.0, 0.0], [0.0, 2.0], [0.0, 4.0]],                 # matmul: size 3 is different from 2
    [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 4.0, 1.0]],
    [[0.0, 0.0, 0.0], [0.0, 2.0], [0.0, 0.0, 4.0]],       # ragged: setting an array element with a sequence
])
def test_dicom_positions_that_are_not_three_numbers_are_refused(tmp_path, positions):
    folder = _series(tmp_path / "series", positions)
    with pytest.raises(InputError) as info:
        read_inputs([folder])
    assert "\n" not in info.value.message and str(folder) in info.value.message


def test_dicom_element_claiming_more_than_its_file_is_refused_before_gdcm_scans(tmp_path):
    folder = _series(tmp_path / "series", [[0.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 4.0]])
    damaged = folder / "IM0001.dcm"
    data = bytearray(damaged.read_bytes())
    at = data.index(b"\x02\x00\x02\x00UI")  # Media Storage SOP Class UID
    data[at + 4] = ord(">")  # an unknown VR: GDCM reads a 4-byte length from the value and allocates it
    damaged.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"IM0001.dcm: meta element \(0002,0002\) claims \d+ bytes") as info:
        read_inputs([folder])
    assert "remove the damaged file" in info.value.hint


# -- one-line messages, nothing on stderr --------------------------------------------------------
def test_library_notes_become_warning_events_not_stderr(tmp_path, threshold_torchscript, card_factory, capfd):
    image = nib.Nifti1Image(np.full((8, 8, 8), 900, np.int16), np.eye(4))
    raw = bytearray(image.to_bytes())
    struct.pack_into("<h", raw, 252, 999)  # qform_code 999: nibabel logs "not valid; setting to 0"
    path = tmp_path / "q.nii"
    path.write_bytes(bytes(raw))
    card = card_factory()
    rc = main(["segment", str(path), "--model", str(card), "--checkpoint", str(threshold_torchscript),
               "-o", str(tmp_path / "out.nrrd"), "--progress", "json"])
    captured = capfd.readouterr()
    assert rc == 0
    assert captured.err == ""
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert any(e["event"] == "log" and e["level"] == "warning" and "qform_code 999" in e["message"] for e in events)


def test_truncated_nifti_message_is_one_line(tmp_path):
    data = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)).to_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gzip.compress(data)[:-30])
    with pytest.raises(InputError) as info:
        read_inputs([path])
    assert "\n" not in info.value.message and "could the file be damaged" not in info.value.message
