"""Writing results: formats, colour tables, Slicer segmentations, no clobbering, atomic writes."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from volseg.cards import Label
from volseg.errors import OutputError
from volseg.io import (
    Volume,
    atomic_output,
    atomic_outputs,
    check_not_an_input,
    check_segmentation_output,
    check_writable,
    color_table_path,
    read_volume,
    write_probabilities,
    write_segmentation,
    write_volume,
)
from volseg.io import writers
from volseg.io.atomic import full_suffix
from volseg.terminology import slicer_terminology_tag

LIVER = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}
LEFT_KIDNEY = {
    "category": ["SCT", "123037004", "Anatomical Structure"],
    "type": ["SCT", "64033007", "Kidney"],
    "type_modifier": ["SCT", "7771000", "Left"],
}
MASS = {
    "category": ["SCT", "49755003", "Morphologically Altered Structure"],
    "type": ["SCT", "4147007", "Mass"],
    "region": ["SCT", "64033007", "Kidney"],
    "region_modifier": ["SCT", "7771000", "Left"],
}
SEGMENTS = [
    Label(1, "liver", (221, 130, 101), 1, LIVER),
    Label(2, "left kidney", (185, 102, 83), 2, LEFT_KIDNEY),
    Label(5, "kidney mass, left", (144, 238, 144), 3, MASS),
    Label(7, "other", (10, 20, 30), 4, None),
]


def _reference(shape=(10, 9, 8)) -> Volume:
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    return Volume(np.zeros(shape, np.float32), spacing=[0.8, 1.1, 2.5], origin=[-12.5, 30.25, 4.0], direction=rotation)


def _labels(shape=(10, 9, 8)) -> np.ndarray:
    labels = np.zeros(shape, np.int64)
    labels[1:4, 2:5, 1:3] = 1
    labels[5:8, 1:3, 4:7] = 2
    labels[6, 6, 6] = 5  # label 7 is described but absent
    return labels


def _assert_grid(image: sitk.Image, ref: Volume, atol=1e-5):
    np.testing.assert_allclose(image.GetSpacing(), ref.spacing, atol=atol)
    np.testing.assert_allclose(image.GetOrigin(), ref.origin, atol=atol)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), ref.direction, atol=atol)


@pytest.mark.parametrize("name", ["seg.nii.gz", "seg.nii", "seg.nrrd", "seg.mha"])
def test_labelmap_with_colour_table(tmp_path, name):
    ref, labels = _reference(), _labels()
    out = write_segmentation(tmp_path / name, labels, ref, SEGMENTS)
    assert out == tmp_path / name
    image = sitk.ReadImage(str(out))
    assert image.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), labels)
    _assert_grid(image, ref)

    table = color_table_path(out)
    assert table == tmp_path / "seg.csv"
    rows = list(csv.DictReader(table.open()))
    assert list(rows[0])[:6] == ["LabelValue", "Name", "Color_R", "Color_G", "Color_B", "Color_A"]
    assert [(r["LabelValue"], r["Name"]) for r in rows] == [(str(s.value), s.name) for s in SEGMENTS]
    assert (rows[1]["Color_R"], rows[1]["Color_G"], rows[1]["Color_B"], rows[1]["Color_A"]) == ("185", "102", "83", "255")
    assert (rows[1]["Type_CodingScheme"], rows[1]["Type_CodeValue"], rows[1]["Type_CodeMeaning"]) == ("SCT", "64033007", "Kidney")
    assert rows[1]["TypeModifier_CodeMeaning"] == "Left"
    assert (rows[2]["Region_CodeValue"], rows[2]["RegionModifier_CodeMeaning"]) == ("64033007", "Left")
    assert rows[3]["Category_CodeValue"] == "" and rows[3]["Type_CodeValue"] == ""
    assert not [p for p in tmp_path.iterdir() if "volseg-tmp" in p.name]


def test_labelmap_uses_uint16_above_255_and_keeps_values(tmp_path):
    labels = _labels()
    labels[0, 0, 0] = 300
    segments = [*SEGMENTS, Label(300, "big", (1, 2, 3), 5, None)]
    out = write_segmentation(tmp_path / "big.nrrd", labels, _reference(), segments)
    data, header = nrrd.read(str(out), index_order="F")
    assert data.dtype == np.uint16 and header["type"] == "unsigned short"
    np.testing.assert_array_equal(data, labels)


def test_nrrd_labelmap_carries_provenance(tmp_path):
    provenance = {"model": "demo-liver", "volseg_version": "0.1.0", "inputs": ["ct.nii.gz"], "odd key:=x": "a\nb"}
    out = write_segmentation(tmp_path / "seg.nrrd", _labels(), _reference(), SEGMENTS, provenance=provenance)
    header = nrrd.read_header(str(out))
    assert header["VolSeg_model"] == "demo-liver"
    assert json.loads(header["VolSeg_inputs"]) == ["ct.nii.gz"]
    assert header["VolSeg_odd_key__x"] == "a b"


def test_seg_nrrd_segment_names_stay_on_one_line(tmp_path):
    segments = [Label(1, "two\nlines", (1, 2, 3), 1, None)]
    labels = np.zeros((10, 9, 8), np.uint8)
    out = write_segmentation(tmp_path / "a.seg.nrrd", labels, _reference(), segments)
    assert [s["name"] for s in slicerio.read_segmentation(str(out))["segments"]] == ["two lines"]


def test_seg_nrrd_read_back_with_slicerio(tmp_path):
    ref, labels = _reference(), _labels()
    provenance = {"model": "demo-liver", "checkpoint_sha256": "ab" * 32}
    out = write_segmentation(tmp_path / "result.seg.nrrd", labels, ref, SEGMENTS, provenance=provenance)
    seg = slicerio.read_segmentation(str(out))
    np.testing.assert_array_equal(seg["voxels"], labels)
    assert seg["voxels"].dtype == np.uint8
    np.testing.assert_allclose(seg["ijkToLPS"], ref.ijk_to_lps, atol=1e-9)
    by_name = {s["name"]: s for s in seg["segments"]}
    assert list(by_name) == [s.name for s in SEGMENTS]  # absent label 7 still gets its segment
    for label in SEGMENTS:
        segment = by_name[label.name]
        assert segment["labelValue"] == label.value and segment["layer"] == 0
        assert segment["id"] == f"Segment_{label.value}"
        np.testing.assert_allclose(segment["color"], np.array(label.color) / 255, atol=1e-6)
        assert not segment["colorAutoGenerated"] and not segment["nameAutoGenerated"]
        mask = slicerio.segment_mask(seg, label.name)
        np.testing.assert_array_equal(mask, labels == label.value)
    kidney = by_name["left kidney"]["terminology"]
    assert kidney["type"] == LEFT_KIDNEY["type"] and kidney["typeModifier"] == LEFT_KIDNEY["type_modifier"]
    mass = by_name["kidney mass, left"]["terminology"]
    assert mass["anatomicRegion"] == MASS["region"] and mass["anatomicRegionModifier"] == MASS["region_modifier"]
    assert "terminology" not in by_name["other"]
    # the raw tag is exactly Slicer's TerminologyEntry format
    header = nrrd.read_header(str(out))
    assert f"TerminologyEntry:{slicer_terminology_tag(LIVER)}|" in header["Segment0_Tags"]
    assert header["VolSeg_model"] == "demo-liver"
    assert header["VolSeg_checkpoint_sha256"] == "ab" * 32


@pytest.mark.parametrize("name", ["p.nii.gz", "p.nrrd"])
def test_probabilities_channels_last_on_reference_grid(tmp_path, name):
    ref = _reference()
    probs = np.random.default_rng(0).random((3, *ref.spatial_shape)).astype(np.float32)
    out = write_probabilities(tmp_path / name, probs, ref)
    if name.endswith(".nrrd"):
        data, header = nrrd.read(str(out), index_order="F")
        assert header["kinds"] == ["domain", "domain", "domain", "list"]
        np.testing.assert_allclose(np.asarray(header["space directions"])[:3].T, ref.ijk_to_lps[:3, :3], atol=1e-9)
        np.testing.assert_allclose(header["space origin"], ref.origin, atol=1e-9)
    else:
        image = nib.load(str(out))
        data = image.get_fdata(dtype=np.float32)
        np.testing.assert_allclose(image.affine, ref.ijk_to_ras, atol=1e-5)
        itk = sitk.ReadImage(str(out))  # ITK (Slicer) sees the same spatial grid
        np.testing.assert_allclose(itk.GetOrigin()[:3], ref.origin, atol=1e-4)
        np.testing.assert_allclose(np.reshape(itk.GetDirection(), (4, 4))[:3, :3], ref.direction, atol=1e-5)
    assert data.shape == (*ref.spatial_shape, 3)
    np.testing.assert_array_equal(np.moveaxis(data, -1, 0), probs)


def test_write_volume_round_trip(tmp_path):
    ref = _reference()
    vol = ref.with_array(np.arange(np.prod(ref.spatial_shape), dtype=np.float32).reshape(ref.spatial_shape))
    for name in ["v.nii.gz", "v.nrrd", "v.mha"]:
        back = read_volume(write_volume(tmp_path / name, vol))
        np.testing.assert_array_equal(back.array, vol.array)
        assert back.same_grid(vol, tol=1e-5)
    with pytest.raises(OutputError, match="one channel"):
        write_volume(tmp_path / "two.nrrd", ref.with_array(np.zeros((2, *ref.spatial_shape))))


# ---------------------------------------------------------------- refusals


def test_no_overwrite_without_flag(tmp_path):
    ref, labels = _reference(), _labels()
    for name in ["a.seg.nrrd", "a.nii.gz", "p.nrrd"]:
        target = tmp_path / name
        target.write_bytes(b"precious")
        with pytest.raises(OutputError, match="exists; pass --overwrite"):
            if name == "p.nrrd":
                write_probabilities(target, np.zeros((2, *ref.spatial_shape)), ref)
            else:
                write_segmentation(target, labels, ref, SEGMENTS)
        assert target.read_bytes() == b"precious"
    write_segmentation(tmp_path / "a.seg.nrrd", labels, ref, SEGMENTS, overwrite=True)
    assert slicerio.read_segmentation(str(tmp_path / "a.seg.nrrd"))["voxels"].shape == labels.shape


def test_existing_colour_table_blocks_the_labelmap_too(tmp_path):
    (tmp_path / "out.csv").write_text("mine")
    with pytest.raises(OutputError, match="out.csv exists"):
        check_segmentation_output(tmp_path / "out.nii.gz")
    with pytest.raises(OutputError, match="out.csv exists"):
        write_segmentation(tmp_path / "out.nii.gz", _labels(), _reference(), SEGMENTS)
    assert not (tmp_path / "out.nii.gz").exists()  # refused before writing anything
    assert (tmp_path / "out.csv").read_text() == "mine"
    assert check_segmentation_output(tmp_path / "out.nii.gz", overwrite=True) == [tmp_path / "out.nii.gz", tmp_path / "out.csv"]


@pytest.mark.parametrize("name", ["out.png", "out", "out.nii.zip", "out.nhdr"])
def test_unknown_extension_lists_supported(tmp_path, name):
    with pytest.raises(OutputError, match="unknown extension") as info:
        write_segmentation(tmp_path / name, _labels(), _reference(), SEGMENTS)
    for suffix in (".seg.nrrd", ".nii.gz", ".nrrd", ".mha", ".dcm"):
        assert suffix in info.value.hint
    assert list(tmp_path.iterdir()) == []


def test_dicom_seg_needs_dicom_input(tmp_path):
    with pytest.raises(OutputError, match="DICOM series input") as info:
        write_segmentation(tmp_path / "seg.dcm", _labels(), _reference(), SEGMENTS)
    assert ".seg.nrrd" in info.value.hint


def test_label_map_must_fit_grid_and_labels(tmp_path):
    ref = _reference()
    with pytest.raises(OutputError, match="differs from the reference grid"):
        write_segmentation(tmp_path / "a.nrrd", np.zeros((3, 3, 3), np.uint8), ref, SEGMENTS)
    labels = _labels()
    labels[0, 0, 0] = 9
    with pytest.raises(OutputError, match=r"label value\(s\) \[9\]"):
        write_segmentation(tmp_path / "a.nrrd", labels, ref, SEGMENTS)
    with pytest.raises(OutputError, match="integers"):
        write_segmentation(tmp_path / "a.nrrd", labels.astype(np.float32), ref, SEGMENTS)
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_and_folder_target(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        check_writable(tmp_path / "nope" / "a.nrrd")
    (tmp_path / "dir.nrrd").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_writable(tmp_path / "dir.nrrd", overwrite=True)


# ---------------------------------------------------------------- atomic writes


def test_atomic_output_keeps_suffix_and_commits(tmp_path):
    target = tmp_path / "result.seg.nrrd"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".seg.nrrd") and tmp != target
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.seg.nrrd"]
    assert full_suffix("a.b.NII.GZ") == ".NII.GZ" and full_suffix("x.nrrd") == ".nrrd"


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_output_cleans_up_on_failure(tmp_path, error):
    target = tmp_path / "a.nii.gz"
    target.write_text("old")
    with pytest.raises(type(error)):
        with atomic_output(target, overwrite=True) as tmp:
            tmp.write_text("half")
            raise error
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


def test_failed_writer_leaves_no_files(tmp_path, monkeypatch):
    def half_write(image, path, useCompression=False, compressionLevel=-1):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(writers.sitk, "WriteImage", half_write)
    with pytest.raises(OutputError, match="disk full"):
        write_segmentation(tmp_path / "a.nii.gz", _labels(), _reference(), SEGMENTS)
    assert list(tmp_path.iterdir()) == []


def test_colour_table_failure_rolls_back_the_labelmap(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("no space left")

    monkeypatch.setattr(writers, "write_color_table", broken)
    # An OSError while writing is reported as an OutputError naming the file (B13).
    with pytest.raises(OutputError, match="no space left"):
        write_segmentation(tmp_path / "a.nrrd", _labels(), _reference(), SEGMENTS)
    assert list(tmp_path.iterdir()) == []


def test_file_appearing_during_write_is_not_clobbered(tmp_path):
    target = tmp_path / "a.nrrd"
    with pytest.raises(OutputError, match="exists"):
        with atomic_output(target) as tmp:
            tmp.write_text("new")
            target.write_text("someone else's")
    assert target.read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nrrd"]


def test_block_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(OutputError, match="no file was produced"):
        with atomic_output(tmp_path / "a.nrrd"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_output_permissions_follow_umask(tmp_path):
    out = write_segmentation(tmp_path / "a.nrrd", _labels(), _reference(), SEGMENTS)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_replacing_the_input_file_keeps_the_volume_in_memory(tmp_path):
    path = tmp_path / "in.nii"
    ref = _reference()
    write_volume(path, ref.with_array(np.full(ref.spatial_shape, 3.0, np.float32)))
    vol = read_volume(path)  # not memory-mapped: replacing the file must not change it
    write_volume(path, vol.with_array(vol.array * 2), overwrite=True)
    assert float(vol.array.max()) == 3.0
    assert float(read_volume(path).array.max()) == 6.0


# ---------------------------------------------------------------- upper-case extensions


@pytest.mark.parametrize("name", ["UP.MHA", "up.NII.GZ", "up.Nii", "up.NRRD"])
def test_upper_case_labelmap_extension_writes_both_files(tmp_path, name):
    out = write_segmentation(tmp_path / name, _labels(), _reference(), SEGMENTS)
    stem = name.split(".")[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, f"{stem}.csv"])
    # The user's spelling is kept; the content is the format the extension names.
    copy = tmp_path / "check" / f"copy{full_suffix(name).lower()}"
    copy.parent.mkdir()
    copy.write_bytes(out.read_bytes())
    image = sitk.ReadImage(str(copy))
    assert np.array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), _labels())
    _assert_grid(image, _reference())


def test_upper_case_seg_nrrd_and_probabilities(tmp_path):
    write_segmentation(tmp_path / "s.SEG.NRRD", _labels(), _reference(), SEGMENTS)
    assert np.array_equal(slicerio.read_segmentation(str(tmp_path / "s.SEG.NRRD"))["voxels"], _labels())
    probs = np.random.default_rng(0).random((2, 10, 9, 8)).astype(np.float32)
    write_probabilities(tmp_path / "p.NII.GZ", probs, _reference())
    assert nib.load(str(tmp_path / "p.NII.GZ")).shape == (10, 9, 8, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.NII.GZ", "s.SEG.NRRD"]


def test_atomic_temp_file_has_lower_case_suffix(tmp_path):
    with atomic_output(tmp_path / "A.NII.GZ") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.name.startswith(".A.")
        tmp.write_text("x")
    assert (tmp_path / "A.NII.GZ").read_text() == "x"


def test_image_failure_commits_no_colour_table_and_no_sibling(tmp_path, monkeypatch):
    def writes_header_and_data_then_fails(image, path, useCompression=False, compressionLevel=-1):
        # Like ITK's MetaImage writer: a header plus a detached data file, then an error.
        Path(path).write_text("header")
        Path(str(path)[: -len(".mha")] + ".zraw").write_bytes(b"data")
        raise RuntimeError("sitk::ERROR: cannot write")

    monkeypatch.setattr(writers.sitk, "WriteImage", writes_header_and_data_then_fails)
    with pytest.raises(OutputError, match="cannot write"):
        write_segmentation(tmp_path / "up.mha", _labels(), _reference(), SEGMENTS)
    assert list(tmp_path.iterdir()) == []


def test_image_writing_no_file_commits_no_colour_table(tmp_path, monkeypatch):
    monkeypatch.setattr(writers.sitk, "WriteImage", lambda image, path, useCompression=False, compressionLevel=-1: None)
    with pytest.raises(OutputError, match="no file was produced"):
        write_segmentation(tmp_path / "a.nrrd", _labels(), _reference(), SEGMENTS)
    assert list(tmp_path.iterdir()) == []


def test_atomic_outputs_commit_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "a.nrrd", tmp_path / "a.csv"
    with pytest.raises(OutputError, match="a.csv failed: no file was produced"):
        with atomic_outputs([a, b]) as (tmp_a, _tmp_b):
            tmp_a.write_text("image")
    assert list(tmp_path.iterdir()) == []
    with atomic_outputs([a, b]) as (tmp_a, tmp_b):
        tmp_a.write_text("image")
        tmp_b.write_text("table")
    assert a.read_text() == "image" and b.read_text() == "table"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "a.nrrd"]


def test_second_commit_failing_removes_the_first(tmp_path):
    a, b = tmp_path / "a.nrrd", tmp_path / "a.csv"
    with pytest.raises(OutputError, match="exists"):
        with atomic_outputs([a, b]) as (tmp_a, tmp_b):
            tmp_a.write_text("image")
            tmp_b.write_text("table")
            b.write_text("someone else's")  # appears while the block runs
    assert b.read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]


def test_cleanup_spares_unrelated_hidden_files(tmp_path):
    keep = [tmp_path / ".out.keep", tmp_path / ".out.volseg-tmp-notours.nrrd"]
    for path in keep:
        path.write_text("keep")
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "out") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)


# ---------------------------------------------------------------- OS errors (B13)


def test_disk_full_is_an_output_error_naming_the_file(tmp_path, monkeypatch):
    def disk_full(image, path, useCompression=False, compressionLevel=-1):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers.sitk, "WriteImage", disk_full)
    with pytest.raises(OutputError) as err:
        write_volume(tmp_path / "v.nrrd", _reference())
    assert "No space left on device" in err.value.message and "v.nrrd" in err.value.message
    assert err.value.hint
    assert list(tmp_path.iterdir()) == []


def test_os_error_in_block_becomes_output_error(tmp_path):
    with pytest.raises(OutputError, match=r"cannot write .*a\.nii\.gz: No space left on device"):
        with atomic_output(tmp_path / "a.nii.gz") as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- outputs must not be inputs


def test_output_that_is_an_input_is_refused(tmp_path):
    image = tmp_path / "ct.nrrd"
    image.write_text("ct")
    (tmp_path / "sub").mkdir()
    for output in [image, tmp_path / "sub" / ".." / "ct.nrrd"]:
        with pytest.raises(OutputError, match="would overwrite the input"):
            check_not_an_input([tmp_path / "seg.nii.gz", output], [image])
    check_not_an_input([tmp_path / "seg.nrrd", tmp_path / "seg.csv"], [image])


def test_colour_table_or_probabilities_over_an_input_is_refused(tmp_path):
    table_input = tmp_path / "seg.csv"
    table_input.write_text("x")
    outputs = writers.segmentation_outputs(tmp_path / "seg.nrrd")
    with pytest.raises(OutputError, match="seg.csv"):
        check_not_an_input(outputs, [table_input])
    with pytest.raises(OutputError, match="would overwrite the input"):
        check_not_an_input([tmp_path / "out.seg.nrrd", table_input], [table_input])


def test_links_and_dicom_files_count_as_inputs(tmp_path):
    image = tmp_path / "ct.nii"
    image.write_text("ct")
    (tmp_path / "link.nii").symlink_to(image)
    os.link(image, tmp_path / "hard.nii")
    for output in ["link.nii", "hard.nii"]:
        with pytest.raises(OutputError, match="would overwrite the input"):
            check_not_an_input([tmp_path / output], [image])
    series = tmp_path / "series"
    series.mkdir()
    slices = [series / f"{i}.dcm" for i in range(3)]
    for path in slices:
        path.write_text("dcm")
    with pytest.raises(OutputError, match="1.dcm"):
        check_not_an_input([series / "1.dcm"], [series], dicom_files=slices)
    check_not_an_input([series / "seg.dcm"], [series], dicom_files=slices)


def test_output_differing_only_in_case_is_refused_where_the_file_system_ignores_case(tmp_path):
    image = tmp_path / "ct.nrrd"
    image.write_text("ct")
    upper = tmp_path / "CT.NRRD"
    if upper.exists():  # case-insensitive file system: the same file
        with pytest.raises(OutputError, match="would overwrite the input"):
            check_not_an_input([upper], [image])
    else:  # case-sensitive: a different file
        check_not_an_input([upper], [image])
        upper.write_text("other")
        check_not_an_input([upper], [image])


def test_colour_table_of_another_result_is_named_as_such(tmp_path):
    write_segmentation(tmp_path / "ct.nii.gz", _labels(), _reference(), SEGMENTS)
    with pytest.raises(OutputError) as info:  # ct.nrrd would share ct.csv with ct.nii.gz
        check_segmentation_output(tmp_path / "ct.nrrd")
    assert "colour table ct.csv that goes with ct.nrrd would replace the one of ct.nii.gz" in info.value.message
    assert "--overwrite" in info.value.hint
    assert check_segmentation_output(tmp_path / "ct.seg.nrrd") == [tmp_path / "ct.seg.nrrd"]  # no table: fine


@pytest.mark.parametrize("name", ["p.nii.gz", "p.nrrd"])
def test_probabilities_store_their_channel_names(tmp_path, name):
    ref = _reference()
    names = ["background", "liver", "tumour, enhancing"]
    probs = np.random.default_rng(0).random((3, *ref.spatial_shape)).astype(np.float32)
    out = write_probabilities(tmp_path / name, probs, ref, channel_names=names)
    if name.endswith(".nrrd"):
        _, header = nrrd.read(str(out))
        assert json.loads(header["VolSeg_channel_names"]) == names
        assert [header[f"VolSeg_channel{n}_name"] for n in range(3)] == names
    else:
        image = nib.load(str(out))
        (extension,) = image.header.extensions
        assert json.loads(extension.get_content()) == {"volseg_channel_names": names}
        assert image.header["intent_name"].tobytes().rstrip(b"\0") == b"probabilities"
        assert image.header["descrip"].tobytes().startswith(b"channels: background, liver")
    with pytest.raises(OutputError, match="2 channel names for 3"):
        write_probabilities(tmp_path / ("q" + name[1:]), probs, ref, channel_names=names[:2])


def _gzip_streams(data: bytes) -> list[int]:
    """The XFL byte of every gzip member in ``data``: 4 = fastest (level 1), 2 = best (level 9), 0 = other."""
    flags, start = [], data.find(b"\x1f\x8b\x08")
    while start >= 0:
        flags.append(data[start + 8])
        start = data.find(b"\x1f\x8b\x08", start + 10)
    return flags


@pytest.mark.parametrize("name", ["seg.seg.nrrd"])
def test_labels_are_written_with_fast_compression(tmp_path, name):
    """gzip level 9 took 4.5 s (10 s on the H200 machine) for one noisy 512x512x100 label map:
    volseg writes level 1 (writers.COMPRESSION_LEVEL), and the file still reads back exactly.
    (ITK's writers get the same level; their gzip headers do not record it, so only the .seg.nrrd,
    written through zlib, is checked here.)"""
    ref, labels = _reference(), _labels()
    out = write_segmentation(tmp_path / name, labels, ref, SEGMENTS)
    raw = out.read_bytes()
    if name.endswith(".nrrd"):
        assert b"encoding: gzip" in raw[:4096]
    xfl = _gzip_streams(raw)
    assert xfl and all(flag == 4 for flag in xfl), xfl  # zlib marks level 1 with XFL 4
    if name == "seg.seg.nrrd":
        back = slicerio.read_segmentation(str(out))["voxels"]
    else:
        back = sitk.GetArrayFromImage(sitk.ReadImage(str(out))).transpose(2, 1, 0)
    np.testing.assert_array_equal(back, labels)
