"""The MRML objects the module works on, and small helpers over them.

Every function of the library that touches MRML takes an :class:`MRMLContext`: the scene and the
logic objects it uses. In Slicer the module builds it from ``slicer.mrmlScene`` and
``slicer.modules.segmentations.logic()`` (:meth:`MRMLContext.from_application`); tests and
headless scripts build one on slicer-core's libraries with :func:`create_core_context`, which
sets up what Slicer's application does at start-up. Only calls that both have are used here
(storage nodes instead of ``slicer.util.loadVolume``, ``vtk.util.numpy_support`` instead of
``slicer.util.arrayFromVolume``), so the same code runs in both.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np


#: Segment tag: the segment's label value in the model card.
TAG_LABEL_VALUE = "VolSegSlicer.LabelValue"
#: Segment tag and node attribute: the id of the model card that made the segment / node.
TAG_MODEL_ID = "VolSegSlicer.ModelId"
#: Node attributes with the run's provenance are named ``VolSegSlicer.<key>``.
PROVENANCE_PREFIX = "VolSegSlicer."


@dataclass
class MRMLContext:
    """The scene and the logics the library's MRML work needs.

    Attributes:
        scene: the ``vtkMRMLScene``.
        segmentations_logic: a ``vtkSlicerSegmentationsModuleLogic`` (import, export, editing).
    """

    scene: Any
    segmentations_logic: Any

    @classmethod
    def from_application(cls, slicer_module: Any) -> "MRMLContext":
        """The running Slicer's scene and Segmentations logic (``slicer`` is passed in)."""
        return cls(slicer_module.mrmlScene, slicer_module.modules.segmentations.logic())

    @property
    def subject_hierarchy(self) -> Any:
        """The scene's ``vtkMRMLSubjectHierarchyNode`` (created if the scene has none yet)."""
        import slicer

        return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)

    def add_node(self, class_name: str, name: str, hidden: bool = False) -> Any:
        """Add a node of ``class_name`` with a unique name built from ``name``."""
        node = self.scene.AddNewNodeByClass(class_name, self.scene.GenerateUniqueName(name))
        if hidden:
            node.SetHideFromEditors(True)
        return node

    @contextlib.contextmanager
    def temporary_additions(self) -> Iterator[set]:
        """Every node added to the scene inside the block (helper nodes, and the display, storage
        and colour nodes Slicer's logics add for them) is removed at its end, whether the block
        succeeds or fails, except those whose IDs the block puts in the yielded set."""
        before = {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
        keep: set = set()
        try:
            yield keep
        finally:
            added = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
            for node in reversed(added):
                if node.GetID() not in before and node.GetID() not in keep:
                    self.scene.RemoveNode(node)


_CONVERTERS_REGISTERED = False


def register_segmentation_converters() -> None:
    """Register the binary labelmap <-> closed surface converter rules, once per process.

    Slicer's Segmentations module does this at start-up; without it, every segment import fails
    with "Unable to construct empty representation type 'Binary labelmap'"."""
    global _CONVERTERS_REGISTERED
    if _CONVERTERS_REGISTERED:
        return
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule(),
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule()):
        factory.RegisterConverterRule(rule)
    _CONVERTERS_REGISTERED = True


def create_core_context() -> MRMLContext:
    """A new scene with Slicer's application and module logics, without Qt (slicer-core).

    What Slicer's application sets up at start-up for the modules used here: the application
    logic with its colour logic and default colour nodes, the converter rules, and the
    Subject hierarchy, Volumes and Segmentations logics, registered by module name."""
    import slicer

    register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetSingletonTag("default")
    scene.AddNode(crosshair)
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    application.GetColorLogic().SetMRMLScene(scene)
    application.GetColorLogic().AddDefaultColorNodes()
    application.SetModuleLogic("Colors", application.GetColorLogic())
    logics = {}
    for name, cls in (("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                      ("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(application)
        logic.SetMRMLScene(scene)
        application.SetModuleLogic(name, logic)
        logics[name] = logic
    context = MRMLContext(scene, logics["Segmentations"])
    # Keep the application logic (and through it the module logics) alive with the context.
    context.application_logic = application  # type: ignore[attr-defined]
    context.volumes_logic = logics["Volumes"]  # type: ignore[attr-defined]
    return context


# ---------------------------------------------------------------------------------------- volumes
def volume_array(volume_node: Any) -> np.ndarray:
    """The voxels of a volume node as a (K, J, I) array (a copy)."""
    from vtk.util import numpy_support

    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"volume '{volume_node.GetName()}' has no voxels")
    dims = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return array.reshape(dims[2], dims[1], dims[0]).copy()


def ijk_to_ras(volume_node: Any) -> np.ndarray:
    """The volume's IJK-to-RAS matrix (4x4, local coordinates: parent transforms not applied)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_array(matrix)


def matrix_array(matrix: Any) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a 4x4 numpy array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def write_volume_file(volume_node: Any, path: str | os.PathLike, compress: bool = False) -> None:
    """Write a volume node to ``path`` (format by extension) in its local coordinates.

    A storage node of its own is used, so the volume's own storage node (the file it was loaded
    from, its "modified since read" state) is left alone, as ``slicer.util.exportNode`` does."""
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(volume_node) or not os.path.isfile(path):
        raise OSError(f"could not write volume '{volume_node.GetName()}' to {path}")


def read_labelmap_node(context: MRMLContext, path: str | os.PathLike, name: str) -> Any:
    """Load a label map file into a new, hidden ``vtkMRMLLabelMapVolumeNode`` (no display node).

    Raises:
        OSError: the file is missing or Slicer cannot read it.
    """
    import slicer

    if not os.path.isfile(path):
        raise OSError(f"the result file {path} is missing")
    node = context.add_node("vtkMRMLLabelMapVolumeNode", name, hidden=True)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    if not storage.ReadData(node) or node.GetImageData() is None:
        context.scene.RemoveNode(node)
        raise OSError(f"Slicer could not read the label map {path}")
    return node


def string_array(values) -> Any:
    """A ``vtkStringArray`` holding ``values``."""
    import vtk

    array = vtk.vtkStringArray()
    for value in values:
        array.InsertNextValue(str(value))
    return array


def scalar_volumes(context: MRMLContext) -> list:
    """The scene's scalar volumes that are images (label map volumes left out), in scene order."""
    nodes = [context.scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
             for i in range(context.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    return [node for node in nodes if not node.IsA("vtkMRMLLabelMapVolumeNode")]


# ---------------------------------------------------------------------------------------- segments
def terminology_tag_name() -> str:
    """The name of Slicer's segment terminology tag (``TerminologyEntry``)."""
    import slicer

    return slicer.vtkSegment.GetTerminologyEntryTagName()


def node_in_scene(context: MRMLContext, node: Any) -> bool:
    """Whether ``node`` is (still) in the context's scene."""
    return node is not None and node.GetScene() is context.scene and context.scene.IsNodePresent(node)


def reference_volume(segmentation_node: Any) -> Any:
    """The volume a segmentation node takes its geometry from (None if it has none)."""
    if segmentation_node is None:
        return None
    return segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())


def segment_tag(segment: Any, name: str) -> str:
    """A segment's tag value ('' when the segment has no such tag)."""
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else ""


def subject_hierarchy_item(context: MRMLContext, node: Any) -> int:
    """The subject hierarchy item of ``node``, made (under the scene) if it has none yet. Slicer's
    subject hierarchy plugins make one for every data node; a scene without them may not."""
    hierarchy = context.subject_hierarchy
    item = hierarchy.GetItemByDataNode(node)
    if not item:
        item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)
    return item


def place_beside(context: MRMLContext, node: Any, volume: Any) -> None:
    """Put ``node`` in the same folder/study as ``volume`` in the subject hierarchy (where DICOM
    SEG export looks for the study it belongs to)."""
    hierarchy = context.subject_hierarchy
    parent = hierarchy.GetItemParent(subject_hierarchy_item(context, volume))
    hierarchy.SetItemParent(subject_hierarchy_item(context, node), parent)
