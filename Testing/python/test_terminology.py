"""Slicer terminology tags: exact format, round trips, and agreement with slicerio's parser."""

from __future__ import annotations

from dataclasses import dataclass

import nrrd
import pytest
import slicerio.segmentation as sio_seg

from volseg.terminology import (
    DEFAULT_ANATOMIC_CONTEXT,
    DEFAULT_CONTEXT,
    parse_slicer_terminology_tag,
    segment_table,
    slicer_terminology_tag,
    to_slicerio_terminology,
)

LIVER = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}
RIGHT_KIDNEY_MASS = {
    "category": ["SCT", "49755003", "Morphologically Altered Structure"],
    "type": ["SCT", "4147007", "Mass"],
    "region": ["SCT", "64033007", "Kidney"],
    "region_modifier": ["SCT", "24028007", "Right"],
}
LEFT_LUNG = {
    "category": ["SCT", "123037004", "Anatomical Structure"],
    "type": ["SCT", "39607008", "Lung"],
    "type_modifier": ["SCT", "7771000", "Left"],
}


@dataclass
class _Label:  # duck-typed like volseg.cards.Label
    value: int
    name: str
    color: tuple[int, int, int]
    channel: int = 0
    terminology: dict | None = None


def test_tag_has_slicers_seven_part_layout():
    tag = slicer_terminology_tag(LIVER)
    assert tag == (
        "Segmentation category and type - DICOM master list"
        "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^"
        "~Anatomic codes - DICOM master list~^^~^^"
    )
    parts = tag.split("~")
    assert len(parts) == 7 and parts[0] == DEFAULT_CONTEXT and parts[4] == DEFAULT_ANATOMIC_CONTEXT


@pytest.mark.parametrize("terminology", [LIVER, RIGHT_KIDNEY_MASS, LEFT_LUNG])
def test_round_trip_and_slicerio_parses_our_tag(terminology):
    tag = slicer_terminology_tag(terminology)
    parsed = parse_slicer_terminology_tag(tag)
    assert {k: v for k, v in parsed.items() if not k.endswith("context_name")} == terminology
    assert parse_slicer_terminology_tag("TerminologyEntry:" + tag) == parsed

    by_slicerio = sio_seg.terminology_entry_from_string(tag)
    assert by_slicerio["category"] == terminology["category"]
    assert by_slicerio["type"] == terminology["type"]
    assert by_slicerio.get("typeModifier") == terminology.get("type_modifier")
    assert by_slicerio.get("anatomicRegion") == terminology.get("region")
    assert by_slicerio.get("anatomicRegionModifier") == terminology.get("region_modifier")
    # slicerio writing the converted dict gives back exactly our tag
    assert sio_seg.terminology_entry_to_string(to_slicerio_terminology(terminology)) == tag


def test_parses_tags_written_by_slicer(ct_segmentation_path):
    header = nrrd.read_header(str(ct_segmentation_path))
    tags = {}
    for index in range(7):
        name = header[f"Segment{index}_Name"]
        fields = dict(item.split(":", 1) for item in header[f"Segment{index}_Tags"].split("|") if item)
        tags[name] = fields["TerminologyEntry"]
    right_lung = parse_slicer_terminology_tag(tags["right lung"])
    assert right_lung["type"] == ["SCT", "39607008", "Lung"]
    assert right_lung["type_modifier"] == ["SCT", "24028007", "Right"]
    assert "region" not in right_lung
    # re-serialising with the file's own context names reproduces Slicer's string exactly
    for tag in tags.values():
        parsed = parse_slicer_terminology_tag(tag)
        codes = {k: v for k, v in parsed.items() if not k.endswith("context_name")}
        assert slicer_terminology_tag(codes, parsed["context_name"], parsed["anatomic_context_name"]) == tag


@pytest.mark.parametrize(
    "terminology, message",
    [
        ({"type": ["SCT", "1", "x"]}, "category"),
        ({"category": ["SCT", "1", "x"]}, "type"),
        ({**LIVER, "type": ["SCT", "10200004"]}, "triplet"),
        ({**LIVER, "type": ["SCT", "1~2", "x"]}, "reserves"),
        ({**LIVER, "region": ["SCT", "1", "a^b"]}, "reserves"),
        ({**LIVER, "organ": ["SCT", "1", "x"]}, "unknown"),
    ],
)
def test_bad_terminology_is_refused(terminology, message):
    with pytest.raises(ValueError, match=message):
        slicer_terminology_tag(terminology)


def test_bad_tag_is_refused():
    with pytest.raises(ValueError, match="7"):
        parse_slicer_terminology_tag("ctx~SCT^1^a~SCT^2^b")
    with pytest.raises(ValueError, match="scheme"):
        parse_slicer_terminology_tag("ctx~SCT^1~SCT^2^b~^^~a~^^~^^")


def test_segment_table():
    labels = [_Label(1, "liver", (255, 0, 51), terminology=LIVER), _Label(3, "mass", (0, 128, 255))]
    table = segment_table(labels)
    assert [row["value"] for row in table] == [1, 3]
    assert [row["id"] for row in table] == ["Segment_1", "Segment_3"]
    assert table[0]["name"] == "liver"
    assert table[0]["color"] == pytest.approx((1.0, 0.0, 0.2))
    assert table[1]["color"] == pytest.approx((0.0, 128 / 255, 1.0))
    assert table[0]["terminology"] == slicer_terminology_tag(LIVER)
    assert table[1]["terminology"] is None


@pytest.mark.parametrize(
    "labels, message",
    [
        ([_Label(0, "bg", (0, 0, 0))], "> 0"),
        ([_Label(1, "a", (1, 2, 3)), _Label(1, "b", (1, 2, 3))], "twice"),
        ([_Label(1, "a", (1, 2, 300))], "0-255"),
    ],
)
def test_segment_table_refuses_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        segment_table(labels)
