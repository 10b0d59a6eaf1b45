"""FakeSlicerStandIn: a TEST-ONLY stand-in for the few parts of 3D Slicer's Python API that
``VolSegSlicer/VolSegSlicer.py`` touches at import time and in its widget-free logic.

It is not Slicer and does not pretend to be: there is no MRML scene, no Qt event loop, no
rendering. It exists so that pytest (outside Slicer, in CI) can import the module file and
exercise the parts of the logic that do not need Slicer: the parameter-node fields, settings,
command-line construction, the background engine process and its polling. Everything that
needs real Slicer (importing labelmaps into segmentations, export) is tested by the module's
self-test ``VolSegSlicerTest`` inside Slicer.

Use :func:`install_fake_slicer` (with pytest's ``monkeypatch``) before importing the module.
"""

from __future__ import annotations

import shutil
import sys
import types
import typing
import unittest
from pathlib import Path


class FakeStandInQTimer:
    """Stand-in for qt.QTimer: records start/stop; never fires (tests call the slot themselves)."""

    def __init__(self) -> None:
        self.interval = 0
        self.active = False
        self.slots: list = []

    def setInterval(self, ms: int) -> None:
        self.interval = ms

    def connect(self, signal: str, slot) -> None:
        self.slots.append((signal, slot))

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def isActive(self) -> bool:
        return self.active


class FakeStandInQSettings:
    """Stand-in for qt.QSettings: one in-memory store shared by all instances."""

    store: dict = {}

    def value(self, key: str, default=None):
        return self.store.get(key, default)

    def setValue(self, key: str, value) -> None:
        self.store[key] = value


class FakeStandInScriptedModuleNode:
    """Stand-in for vtkMRMLScriptedModuleNode: attributes only."""

    def __init__(self) -> None:
        self.attributes: dict[str, str] = {}

    def GetAttribute(self, name: str):
        return self.attributes.get(name)

    def SetAttribute(self, name: str, value: str) -> None:
        self.attributes[name] = value


class FakeStandInVolumeNode:
    """Stand-in for a volume node whose voxels are a file on disk (exported by copying it)."""

    def __init__(self, path: Path, name: str, node_id: str) -> None:
        self.path, self.name, self.node_id = Path(path), name, node_id

    def GetName(self) -> str:
        return self.name

    def GetID(self) -> str:
        return self.node_id


class FakeStandInWithinRange:
    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum


def fake_parameter_node_wrapper(cls):
    """Stand-in for slicer.parameterNodeWrapper: typed fields (read like the real one, with
    ``typing.get_type_hints(include_extras=True)``) with their defaults, no serialization."""
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: getattr(cls, name, None) for name in hints}

    def __init__(self, parameterNode) -> None:
        self.parameterNode = parameterNode
        for name, value in defaults.items():
            setattr(self, name, value)

    cls.__init__ = __init__
    cls.allParameters = hints
    return cls


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def install_fake_slicer(monkeypatch, temporary_path: Path) -> types.ModuleType:
    """Put the stand-in modules (slicer, qt, ctk, vtk and slicer's submodules) into sys.modules
    for the duration of one test; returns the stand-in ``slicer`` module."""

    class VTKObservationMixin:
        def __init__(self) -> None:
            self.observations: list = []

        def addObserver(self, obj, event, callback) -> None:
            self.observations.append((obj, event, callback))

        def removeObserver(self, obj, event, callback) -> None:
            self.observations.remove((obj, event, callback))

        def removeObservers(self) -> None:
            self.observations.clear()

    def exportNode(node, path, properties=None, world=False) -> bool:
        shutil.copyfile(node.path, path)
        return True

    util = _module("slicer.util", VTKObservationMixin=VTKObservationMixin, exportNode=exportNode)

    class ScriptedLoadableModule:
        def __init__(self, parent) -> None:
            self.parent = parent
            self.moduleName = type(self).__name__

    class ScriptedLoadableModuleLogic:
        def __init__(self) -> None:
            self._parameterNode = FakeStandInScriptedModuleNode()

        def getParameterNode(self):
            return self._parameterNode

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None) -> None:
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message: str, msec: int = 0) -> None:
            pass

    scripted = _module("slicer.ScriptedLoadableModule",
                       ScriptedLoadableModule=ScriptedLoadableModule,
                       ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
                       ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
                       ScriptedLoadableModuleTest=ScriptedLoadableModuleTest)
    i18n = _module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
    wrapper = _module("slicer.parameterNodeWrapper", parameterNodeWrapper=fake_parameter_node_wrapper,
                      WithinRange=FakeStandInWithinRange)
    slicer = _module(
        "slicer",
        util=util, i18n=i18n, parameterNodeWrapper=wrapper, ScriptedLoadableModule=scripted,
        vtkMRMLScalarVolumeNode=type("vtkMRMLScalarVolumeNode", (), {}),
        vtkMRMLSegmentationNode=type("vtkMRMLSegmentationNode", (), {}),
        app=types.SimpleNamespace(temporaryPath=str(temporary_path), processEvents=lambda: None,
                                  applicationVersion="FakeSlicerStandIn"),
        mrmlScene=None,
    )
    slicer.__path__ = []  # a package, so `from slicer.x import y` works
    qt = _module("qt", QTimer=FakeStandInQTimer, QSettings=FakeStandInQSettings,
                 QIcon=lambda path: ("QIcon", path), Qt=types.SimpleNamespace(UserRole=32))
    vtk = _module("vtk", vtkCommand=types.SimpleNamespace(ModifiedEvent=33))
    FakeStandInQSettings.store = {}
    for name, module in {"slicer": slicer, "slicer.util": util, "slicer.i18n": i18n,
                         "slicer.parameterNodeWrapper": wrapper, "slicer.ScriptedLoadableModule": scripted,
                         "qt": qt, "ctk": _module("ctk"), "vtk": vtk}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return slicer
