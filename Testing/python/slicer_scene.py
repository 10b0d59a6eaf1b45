"""A Slicer scene on slicer-core for the tests: the sample CT, studies, engine-like results."""

from __future__ import annotations

import unittest
from pathlib import Path

import numpy as np

from VolSegSlicerLib import testing
from VolSegSlicerLib.mrml import subject_hierarchy_item, write_volume_file

CHECK = unittest.TestCase()  # the assertions of the shared checks in VolSegSlicerLib.testing


def load_ct(context, name: str = "CTChest"):
    volume = context.volumes_logic.AddArchetypeVolume(testing.sample_ct_path(), name, 0)
    assert volume is not None and volume.GetImageData() is not None
    return volume


def in_study(context, volume, dicom: bool = False) -> int:
    """Put ``volume`` in a patient/study of the subject hierarchy (as the DICOM module does when
    ``dicom``: UIDs on the items, the instance UIDs attribute on the volume)."""
    hierarchy = context.subject_hierarchy
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Anonymous")
    study = hierarchy.CreateStudyItem(patient, "CT chest")
    hierarchy.SetItemParent(subject_hierarchy_item(context, volume), study)
    if dicom:
        hierarchy.SetItemUID(patient, "DICOM", "PAT-1")
        hierarchy.SetItemUID(study, "DICOM", "1.2.826.0.1.3680043.8.498.1")
        hierarchy.SetItemAttribute(study, "DICOM.StudyDate", "20260101")
        hierarchy.SetItemUID(subject_hierarchy_item(context, volume), "DICOM", "1.2.826.0.1.3680043.8.498.2")
        volume.SetAttribute("DICOM.instanceUIDs", " ".join(f"1.2.826.0.1.3680043.8.498.3.{i}" for i in range(34)))
    return study


def engine_result(tmp_path, demo, volume, values) -> Path:
    """A label map on ``volume``'s grid with the given label values (as the engine would write)."""
    path = tmp_path / "result.nrrd"
    write_volume_file(volume, path)
    import nrrd

    data, header = nrrd.read(str(path))
    labels = np.zeros(data.shape, np.uint8)
    for n, value in enumerate(values):
        labels[10 + 5 * n: 14 + 5 * n, 50:60, 5:8] = value
    nrrd.write(str(path), labels, header)
    return path


def surface_segmentation(context, name: str, centre, radius: float):
    """A segmentation holding one sphere stored as a closed surface (as an imported STL or RT
    structure set is), with "Closed surface" as its source representation."""
    import slicer
    import vtk

    node = context.add_node("vtkMRMLSegmentationNode", name)
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*centre)
    sphere.SetRadius(radius)
    sphere.Update()
    segment = slicer.vtkSegment()
    segment.SetName("implant")
    segment.AddRepresentation("Closed surface", sphere.GetOutput())
    node.GetSegmentation().SetSourceRepresentationName("Closed surface")
    node.GetSegmentation().AddSegment(segment)
    return node
