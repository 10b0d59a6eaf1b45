"""The Slicer panel (Resources/UI/VolSegSlicer.ui) against the module that uses it, outside Slicer.

The .ui is loaded with PySide6's QUiLoader off-screen. QUiLoader cannot create Slicer's CTK/MRML
widget classes (qMRMLNodeComboBox, ctkCollapsibleButton, ...), so the test loads a COPY of the
XML in which each of those classes is rewritten to the Qt class it stands in for
(:data:`QT_STAND_IN_FOR`), the <customwidgets> declarations are removed, and the MRML signal
connections (mrmlSceneChanged -> setMRMLScene, which plain Qt widgets lack) are dropped. The
original class names are checked separately against the widget names the module uses.
"""

from __future__ import annotations

import ast
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

#: Qt class used to load each Slicer/CTK/MRML class of the .ui with plain QUiLoader.
QT_STAND_IN_FOR = {
    "qMRMLWidget": "QWidget",
    "qMRMLNodeComboBox": "QComboBox",
    "qMRMLSegmentationShow3DButton": "QPushButton",
    "ctkMenuButton": "QPushButton",
    "ctkCollapsibleButton": "QGroupBox",
    "ctkPathLineEdit": "QLineEdit",
    "ctkSearchBox": "QLineEdit",
    "ctkSliderWidget": "QDoubleSpinBox",
}

#: Plausible original classes for a widget, by the end of its objectName.
CLASSES_BY_SUFFIX = {
    "3DButton": {"qMRMLSegmentationShow3DButton"},
    "CollapsibleButton": {"ctkCollapsibleButton"},
    "Button": {"QPushButton", "QToolButton"},
    "CheckBox": {"QCheckBox"},
    "SpinBox": {"QSpinBox", "QDoubleSpinBox"},
    "SliderWidget": {"ctkSliderWidget"},
    "Label": {"QLabel"},
    "Selector": {"qMRMLNodeComboBox"},
    "ComboBox": {"QComboBox"},
    "PathLineEdit": {"ctkPathLineEdit"},
    "ListWidget": {"QListWidget"},
    "TextEdit": {"QPlainTextEdit", "QTextEdit"},
    "ProgressBar": {"QProgressBar"},
    "SearchBox": {"ctkSearchBox"},
    "LineEdit": {"QLineEdit"},
    "Frame": {"QFrame"},
}

#: Widget classes that can be bound to a parameter of each Python type (parameterNodeWrapper).
CLASSES_FOR_TYPE = {
    "bool": {"QCheckBox"},
    "int": {"QSpinBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "str": {"QLineEdit", "QComboBox"},
}


@pytest.fixture(scope="module")
def ui_path(repo_root: Path) -> Path:
    return repo_root / "Resources" / "UI" / "VolSegSlicer.ui"


@pytest.fixture(scope="module")
def module_path(repo_root: Path) -> Path:
    return repo_root / "VolSegSlicer" / "VolSegSlicer.py"


@pytest.fixture(scope="module")
def ui_widgets(ui_path: Path) -> dict[str, ET.Element]:
    """objectName -> <widget> element of the original .ui."""
    root = ET.parse(ui_path).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def _string_property(widget: ET.Element, name: str) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            node = prop.find("string")
            return node.text if node is not None else None
    return None


def _stringlist_property(widget: ET.Element, name: str) -> list[str]:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return [s.text for s in prop.iter("string")]
    return []


def ui_names_used_by_module(module_path: Path) -> set[str]:
    """Widget names the module reads from the .ui: every ``self.ui.<name>`` attribute, plus string
    literals that look like widget names (used with ``getattr(self.ui, name)``)."""
    tree = ast.parse(module_path.read_text(encoding="utf-8"))
    names = set()
    suffixes = tuple(s.lower() for s in CLASSES_BY_SUFFIX)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and re.fullmatch(r"[a-z][A-Za-z0-9]*", node.value) \
                and re.sub(r"\d+$", "", node.value).lower().endswith(suffixes):
            names.add(node.value)
    return names


def parameter_fields(module_path: Path) -> dict[str, str]:
    """Annotated fields of VolSegSlicerParameterNode -> their annotation source text."""
    tree = ast.parse(module_path.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VolSegSlicerParameterNode")
    return {stmt.target.id: ast.unparse(stmt.annotation) for stmt in cls.body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}


def qt_loadable_copy(ui_path: Path, out_path: Path) -> dict[str, str]:
    """Write a copy of the .ui that plain QUiLoader can load (see the module docstring);
    returns objectName -> the Qt class it is loaded as."""
    tree = ET.parse(ui_path)
    root = tree.getroot()
    declared = {cw.findtext("class") for cw in root.iter("customwidget")}
    unknown = declared - set(QT_STAND_IN_FOR)
    assert not unknown, f"custom widget classes without a Qt stand-in for this test: {unknown}"
    loaded_as = {}
    for widget in root.iter("widget"):
        cls = widget.get("class")
        if cls in QT_STAND_IN_FOR:
            widget.set("class", QT_STAND_IN_FOR[cls])
        loaded_as[widget.get("name")] = widget.get("class")
    for tag in ("customwidgets", "connections"):
        for element in root.findall(tag):
            root.remove(element)
    tree.write(out_path, encoding="UTF-8", xml_declaration=True)
    return loaded_as


def test_ui_loads_offscreen_with_every_widget(ui_path: Path, ui_widgets: dict, tmp_path: Path) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtCore = pytest.importorskip("PySide6.QtCore")
    QtWidgets = pytest.importorskip("PySide6.QtWidgets")
    QtUiTools = pytest.importorskip("PySide6.QtUiTools")
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    copy = tmp_path / "VolSegSlicer-qt.ui"
    loaded_as = qt_loadable_copy(ui_path, copy)
    ui_file = QtCore.QFile(str(copy))
    assert ui_file.open(QtCore.QFile.ReadOnly)
    top = QtUiTools.QUiLoader().load(ui_file)
    ui_file.close()
    assert top is not None, "QUiLoader could not load the panel"
    assert top.objectName() == "VolSegSlicer"
    for name, qt_class in loaded_as.items():
        if name == "VolSegSlicer":
            continue
        child = top.findChild(QtWidgets.QWidget, name)
        assert child is not None, f"{name} was not created"
        assert child.metaObject().className() == qt_class, name
        expected_parameter = _string_property(ui_widgets[name], "SlicerParameterName")
        if expected_parameter:
            assert child.property("SlicerParameterName") == expected_parameter, name
    # Top-level layout renders off-screen without errors.
    top.resize(420, 900)
    top.show()
    app.processEvents()
    assert top.findChild(QtWidgets.QPushButton, "applyButton").text() == "Segment"
    top.close()


def test_every_widget_the_module_uses_exists_with_a_plausible_class(module_path: Path, ui_widgets: dict) -> None:
    used = ui_names_used_by_module(module_path)
    # The extraction itself must find the widgets the module obviously uses.
    assert {"applyButton", "modelListWidget", "inputSelector3", "overlapSliderWidget", "show3DButton"} <= used
    missing = sorted(used - set(ui_widgets))
    assert not missing, f"VolSegSlicer.py uses widgets that the .ui lacks: {missing}"
    for name in used:
        cls = ui_widgets[name].get("class")
        stem = re.sub(r"\d+$", "", name)  # inputSelector0 -> inputSelector
        suffix = next((s for s in CLASSES_BY_SUFFIX if stem.lower().endswith(s.lower())), None)
        assert suffix is not None, f"{name}: no class expectation for this name"
        assert cls in CLASSES_BY_SUFFIX[suffix], f"{name} is a {cls}, expected one of {CLASSES_BY_SUFFIX[suffix]}"


def test_parameter_names_match_parameter_node_fields(module_path: Path, ui_widgets: dict) -> None:
    fields = parameter_fields(module_path)
    bound = {}
    for name, widget in ui_widgets.items():
        parameter = _string_property(widget, "SlicerParameterName")
        if parameter:
            assert parameter not in bound, f"{parameter} is bound to two widgets ({bound.get(parameter)}, {name})"
            bound[parameter] = widget
    assert bound, "no widget has a SlicerParameterName"
    unknown = sorted(set(bound) - set(fields))
    assert not unknown, f"SlicerParameterName values that are not parameter-node fields: {unknown}"
    for parameter, widget in bound.items():
        annotation = fields[parameter]
        cls = widget.get("class")
        if annotation.startswith("vtkMRML"):
            assert cls == "qMRMLNodeComboBox", parameter
            assert _stringlist_property(widget, "nodeTypes") == [annotation], parameter
            continue
        base = re.sub(r"^Annotated\[(\w+),.*\]$", r"\1", annotation)
        assert cls in CLASSES_FOR_TYPE[base], f"{parameter}: {cls} cannot hold a {base}"
    # Every input selector and every advanced setting is bound (state lives in the parameter node).
    for expected in [f"inputVolume{i}" for i in range(4)] + ["outputSegmentation", "overlap", "roiX", "roiY",
                                                              "roiZ", "swBatchSize", "flips", "amp", "keepWarm"]:
        assert expected in bound, expected


def test_volume_selectors_and_output_selector_are_configured(ui_widgets: dict) -> None:
    for i in range(4):
        selector = ui_widgets[f"inputSelector{i}"]
        assert _stringlist_property(selector, "nodeTypes") == ["vtkMRMLScalarVolumeNode"]
    output = ui_widgets["outputSegmentationSelector"]
    assert _stringlist_property(output, "nodeTypes") == ["vtkMRMLSegmentationNode"]
    assert _string_property(output, "noneDisplay") == "Create new segmentation"


def test_mrml_selectors_get_the_scene(ui_path: Path, ui_widgets: dict) -> None:
    """Every qMRMLNodeComboBox is connected to the top-level qMRMLWidget's mrmlSceneChanged."""
    root = ET.parse(ui_path).getroot()
    assert root.find("widget").get("class") == "qMRMLWidget"
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    selectors = {name for name, w in ui_widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors and selectors <= receivers
