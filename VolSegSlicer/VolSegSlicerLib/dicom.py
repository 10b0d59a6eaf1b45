"""The hand-off to DICOM SEG export.

Slicer writes DICOM SEG with the DICOMSegmentationPlugin of the QuantitativeReporting
extension. It exports a segmentation that sits in the study of a volume loaded from DICOM, so
this module checks that (the volume carries the DICOM module's ``DICOM.instanceUIDs``
attribute and lies in a study of the subject hierarchy), puts the segmentation in that study,
and hands it to the plugin; without the extension the message says what to install.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from VolSegSlicerLib.export import ExportError
from VolSegSlicerLib.mrml import MRMLContext, place_beside, reference_volume, subject_hierarchy_item

#: The volume attribute the DICOM module sets: the SOP instance UIDs of the loaded series.
DICOM_INSTANCE_UIDS = "DICOM.instanceUIDs"

INSTALL_QUANTITATIVE_REPORTING = (
    "DICOM SEG export needs the QuantitativeReporting extension: install it with the Extensions Manager "
    "(search 'QuantitativeReporting'), restart Slicer and export again. A label map or .seg.nrrd export "
    "works without it.")


def is_from_dicom(volume_node: Any) -> bool:
    """Whether ``volume_node`` was loaded from the DICOM database."""
    return bool(volume_node is not None and volume_node.GetAttribute(DICOM_INSTANCE_UIDS))


def dicom_reference(context: MRMLContext, segmentation_node: Any) -> Any:
    """The DICOM volume ``segmentation_node`` was made on, once it is known to be in a study.

    Raises:
        ExportError: its reference volume is missing, not from DICOM, or in no study.
    """
    volume = reference_volume(segmentation_node)
    if volume is None:
        raise ExportError(f"'{segmentation_node.GetName()}' has no reference volume; DICOM SEG needs the "
                          "DICOM volume it was made on")
    if not is_from_dicom(volume):
        raise ExportError(f"DICOM SEG needs an input volume loaded from DICOM, and '{volume.GetName()}' was "
                          "not; export a label map or .seg.nrrd instead")
    hierarchy = context.subject_hierarchy
    study = hierarchy.GetItemParent(subject_hierarchy_item(context, volume))
    if not study or hierarchy.GetItemLevel(study) != "Study":
        raise ExportError(f"'{volume.GetName()}' is not in a DICOM study in the subject hierarchy; load it "
                          "with the DICOM module, then segment and export again")
    return volume


def prepare_dicom_seg_export(context: MRMLContext, segmentation_node: Any) -> int:
    """Check that ``segmentation_node`` can become a DICOM SEG (:func:`dicom_reference`) and put
    it in its volume's study. Returns its subject hierarchy item (what the exporter is given)."""
    place_beside(context, segmentation_node, dicom_reference(context, segmentation_node))
    return subject_hierarchy_item(context, segmentation_node)


def load_dicom_seg_exporter() -> Any:
    """The DICOMSegmentationPlugin class of QuantitativeReporting.

    Raises:
        ExportError: the extension is not installed (the message says what to install).
    """
    try:
        import DICOMSegmentationPlugin
    except ImportError:
        raise ExportError(INSTALL_QUANTITATIVE_REPORTING) from None
    return DICOMSegmentationPlugin.DICOMSegmentationPluginClass


def export_dicom_seg(context: MRMLContext, segmentation_node: Any, folder: str,
                     load_exporter: Optional[Callable[[], Any]] = None) -> None:
    """Write ``segmentation_node`` as DICOM SEG into ``folder`` through QuantitativeReporting.

    Everything is checked before the segmentation is moved into the study.

    Raises:
        ExportError: see :func:`dicom_reference` and :func:`load_dicom_seg_exporter`, the folder
            is missing, or the exporter refused.
    """
    dicom_reference(context, segmentation_node)
    if not os.path.isdir(folder):
        raise ExportError(f"the folder {folder} does not exist")
    exporter_class = (load_exporter or load_dicom_seg_exporter)()
    item = prepare_dicom_seg_export(context, segmentation_node)
    exporter = exporter_class()
    exportables = exporter.examineForExport(item)
    if not exportables:
        raise ExportError(f"Slicer found nothing to export as DICOM SEG in '{segmentation_node.GetName()}'")
    for exportable in exportables:
        exportable.directory = folder
    message = exporter.export(exportables)
    if message:
        raise ExportError(f"DICOM SEG export failed: {message}")
