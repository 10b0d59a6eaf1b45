"""DICOM: reading a CT series folder and writing a DICOM SEG that references it.

The series is made here with pydicom from a small crop of slicerio's CTChest4 (CT Image
Storage, one file per slice, files named in reverse slice order so sorting is exercised).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SegmentationStorage, generate_uid

from volseg.cards import Label
from volseg.errors import InputError, OutputError
from volseg.io import check_segmentation_output, read_inputs, read_volume, write_segmentation
from volseg.io.volume import Volume

CROP = (slice(40, 72), slice(50, 74), slice(10, 16))  # 32 x 24 x 6 voxels of CTChest4

LIVER = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}
RIGHT_LUNG = {
    "category": ["SCT", "123037004", "Anatomical Structure"],
    "type": ["SCT", "39607008", "Lung"],
    "type_modifier": ["SCT", "24028007", "Right"],
}
NODULE = {
    "category": ["SCT", "49755003", "Morphologically Altered Structure"],
    "type": ["SCT", "4147007", "Mass"],
    "region": ["SCT", "39607008", "Lung"],
    "region_modifier": ["SCT", "24028007", "Right"],
}
SEGMENTS = [
    Label(2, "right lung", (197, 165, 145), 1, RIGHT_LUNG),
    Label(4, "soft tissue", (221, 130, 101), 2, LIVER),
    Label(9, "nodule", (144, 238, 144), 3, NODULE),
]


def _crop_grid(ct: Volume) -> Volume:
    start = np.array([CROP[0].start, CROP[1].start, CROP[2].start, 1.0])
    origin = (ct.ijk_to_lps @ start)[:3]
    return Volume(ct.array[CROP].astype(np.int16), spacing=ct.spacing, origin=origin, direction=ct.direction)


def write_ct_series(folder: Path, volume: Volume, series_uid: str | None = None, study_uid: str | None = None,
                    frame_uid: str | None = None, prefix: str = "IM") -> list[Path]:
    """Write ``volume`` (I, J, K int16) as a CT series, one file per k slice; returns the files by k."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    n_slices = volume.spatial_shape[2]
    row_dir, col_dir = volume.direction[:, 0], volume.direction[:, 1]
    files = []
    for k in range(n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Chest", "VS0001", "19700101", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.StudyDate, ds.StudyTime = study_uid, "1", "20240101", "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series_uid, 3, "CT"
        ds.SeriesDescription = "chest crop"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.Manufacturer = "volseg-tests"
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [float(v) for v in volume.ijk_to_lps @ [0, 0, k, 1]][:3]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(volume.spacing[1]), float(volume.spacing[0])]  # row spacing (j), column spacing (i)
        ds.SliceThickness = float(volume.spacing[2])
        ds.Rows, ds.Columns = volume.spatial_shape[1], volume.spatial_shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = np.ascontiguousarray(volume.array[:, :, k].T.astype(np.int16)).tobytes()  # rows x columns
        path = folder / f"{prefix}{n_slices - k:04d}.dcm"  # reverse order on disk
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return files


@pytest.fixture(scope="module")
def ct_crop(ct_path) -> Volume:
    return _crop_grid(read_volume(ct_path))


@pytest.fixture()
def series(tmp_path, ct_crop):
    folder = tmp_path / "series"
    files = write_ct_series(folder, ct_crop)
    return folder, files


def _labels(ct: np.ndarray) -> np.ndarray:
    labels = np.zeros(ct.shape, np.uint8)
    labels[ct < -500] = 2
    labels[(ct > 0) & (ct < 200)] = 4
    labels[3:6, 4:7, 2:4] = 9
    return labels


def test_reads_series_folder_in_slice_order(series, ct_crop):
    folder, files = series
    vol = read_volume(folder)
    assert vol.source.format == "dicom"
    assert vol.source.dicom_files == files  # ordered along k, not by file name
    assert vol.source.series_description == "chest crop"
    assert vol.array.shape == ct_crop.spatial_shape
    np.testing.assert_array_equal(vol.array, ct_crop.array)
    assert vol.same_grid(ct_crop, tol=1e-5), vol.grid_differences(ct_crop, tol=1e-5)
    both = read_inputs([folder])
    assert both.array.shape == (1, *ct_crop.spatial_shape) and both.source.dicom_files == files


def test_largest_series_is_chosen_with_a_warning(series, ct_crop):
    folder, files = series
    small = Volume(ct_crop.array[:, :, :3].copy(), ct_crop.spacing, ct_crop.origin, ct_crop.direction)
    write_ct_series(folder, small, prefix="SMALL")
    with pytest.warns(UserWarning, match="2 DICOM series; using .*6 files.*3 files"):
        vol = read_volume(folder)
    assert vol.source.dicom_files == files


def test_dicom_seg_round_trip(tmp_path, series):
    folder, files = series
    vol = read_inputs([folder])
    labels = _labels(vol.array[0])
    out = write_segmentation(tmp_path / "seg.dcm", labels, vol, SEGMENTS,
                             provenance={"model": "demo-chest", "volseg_version": "0.1.0"})

    ds = pydicom.dcmread(str(out))
    source = pydicom.dcmread(str(files[0]))
    assert ds.SOPClassUID == SegmentationStorage
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    referenced = {item.ReferencedSOPInstanceUID for item in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(str(f)).SOPInstanceUID for f in files}
    # one frame per (segment, slice) that holds the segment
    expected_frames = sum(int((labels[:, :, k] == s.value).any()) for s in SEGMENTS for k in range(labels.shape[2]))
    assert int(ds.NumberOfFrames) == expected_frames

    segs = ds.SegmentSequence
    assert [s.SegmentLabel for s in segs] == [s.name for s in SEGMENTS]
    assert [s.SegmentNumber for s in segs] == [1, 2, 3]
    lung = segs[0]
    assert lung.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"
    assert lung.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Right"
    assert lung.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    nodule = segs[2]
    assert nodule.AnatomicRegionSequence[0].CodeValue == "39607008"
    assert nodule.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0].CodeValue == "24028007"
    assert lung.SegmentAlgorithmType == "AUTOMATIC" and lung.SegmentAlgorithmName == "demo-chest"
    assert len(lung.RecommendedDisplayCIELabValue) == 3

    # voxels: back through highdicom, frame by source instance, in our slice order
    seg = hd.seg.segread(str(out))
    uids = [pydicom.dcmread(str(f)).SOPInstanceUID for f in files]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, assert_missing_frames_are_empty=True
    )  # (K, rows=J, columns=I) with segment numbers
    numbers_to_values = np.array([0] + [s.value for s in SEGMENTS])
    np.testing.assert_array_equal(numbers_to_values[pixels].transpose(2, 1, 0), labels)


def test_empty_result_still_writes_a_valid_seg(tmp_path, series):
    folder, _ = series
    vol = read_volume(folder)
    out = write_segmentation(tmp_path / "empty.dcm", np.zeros(vol.spatial_shape, np.uint8), vol, SEGMENTS[:1])
    ds = pydicom.dcmread(str(out))
    assert ds.SOPClassUID == SegmentationStorage and len(ds.SegmentSequence) == 1


def test_dicom_seg_refused_when_source_files_vanished(tmp_path, series):
    folder, files = series
    vol = read_volume(folder)
    files[0].unlink()
    with pytest.raises(OutputError, match="cannot re-read the source DICOM"):
        write_segmentation(tmp_path / "seg.dcm", _labels(vol.array), vol, SEGMENTS)
    assert not (tmp_path / "seg.dcm").exists()
    assert not [p for p in tmp_path.iterdir() if "volseg-tmp" in p.name]


def test_segmentation_from_dicom_can_also_be_seg_nrrd(tmp_path, series):
    folder, _ = series
    vol = read_volume(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one series: no warning
        out = write_segmentation(tmp_path / "seg.seg.nrrd", _labels(vol.array), vol, SEGMENTS)
    assert out.exists()


def test_series_with_a_missing_slice_is_refused(series):
    folder, files = series
    files[3].unlink()
    with pytest.raises(InputError, match="not evenly spaced.*slices 2-3: 20 mm"):
        read_volume(folder)


def test_dcm_output_checked_up_front(tmp_path, series, ct_crop):
    folder, _ = series
    assert check_segmentation_output(tmp_path / "s.dcm", reference=read_volume(folder)) == [tmp_path / "s.dcm"]
    with pytest.raises(OutputError, match="needs a DICOM series input"):
        check_segmentation_output(tmp_path / "s.dcm", reference=ct_crop)


def test_single_slice_series_is_refused(tmp_path, ct_crop):
    one = Volume(ct_crop.array[:, :, :1].copy(), ct_crop.spacing, ct_crop.origin, ct_crop.direction)
    write_ct_series(tmp_path / "one", one)
    with pytest.raises(InputError, match="single file"):
        read_volume(tmp_path / "one")
