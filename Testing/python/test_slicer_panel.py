"""What the panel shows and installs, decided by the library (VolSegSlicerLib.panel/resources/settings)."""

from __future__ import annotations

import sys
from pathlib import Path
from importlib.metadata import version
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT / "VolSegSlicer") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "VolSegSlicer"))

from VolSegSlicerLib.devices import DeviceChoices  # noqa: E402
from VolSegSlicerLib.panel import DEMONSTRATION_NOTICE, model_list_title, model_summary, panel_state, run_end  # noqa: E402
from VolSegSlicerLib.protocol import RunMonitor  # noqa: E402
from VolSegSlicerLib.resources import diagnostics_text, ensure_requirements  # noqa: E402
from VolSegSlicerLib.settings import RunSettings  # noqa: E402

TWO_INPUTS = {"id": "brats", "title": "BraTS", "inputs": [{"name": "T1", "modality": "MR"}, {"name": "FLAIR"}],
              "labels": [{"value": 1, "name": "tumour"}]}


def test_model_texts() -> None:
    assert model_list_title({"id": "demo", "title": "Demo", "demonstration": True}) == "Demo (demonstration)"
    assert model_list_title({"id": "x"}) == "x"
    assert model_summary({"id": "demo", "demonstration": True, "description": "d"}) == DEMONSTRATION_NOTICE
    long = model_summary({"id": "x", "description": "word " * 200})
    assert len(long) <= 305 and long.endswith(" ...")


def test_segment_button_needs_a_model_and_distinct_inputs() -> None:
    idle = dict(running=False, cancel_requested=False, use_model_settings=True, has_output=False,
                output_from_dicom=False)
    assert not panel_state(None, [None], **idle).apply_enabled
    assert panel_state(None, [None], **idle).input_titles == ["Input volume"]
    state = panel_state(TWO_INPUTS, ["vol1", None], **idle)
    assert state.input_titles == ["T1 (MR)", "FLAIR"] and state.input_visible(1) and not state.input_visible(2)
    assert not state.apply_enabled and "Select a model" in state.apply_tooltip
    same = panel_state(TWO_INPUTS, ["vol1", "vol1"], **idle)
    assert not same.apply_enabled
    assert same.input_warning == "'T1 (MR)' and 'FLAIR' are the same volume; each input needs its own."
    ready = panel_state(TWO_INPUTS, ["vol1", "vol2"], **idle)
    assert ready.apply_enabled and ready.apply_text == "Segment" and ready.advanced_enabled is False
    assert not ready.export_enabled and not ready.replace_enabled


def test_running_turns_segment_into_cancel_and_locks_exports() -> None:
    running = panel_state(TWO_INPUTS, ["a", "b"], running=True, cancel_requested=False, use_model_settings=False,
                          has_output=True, output_from_dicom=True)
    assert (running.apply_text, running.apply_enabled, running.advanced_enabled) == ("Cancel", True, True)
    assert not running.export_enabled and not running.dicom_export_enabled
    cancelling = panel_state(TWO_INPUTS, ["a", "b"], running=True, cancel_requested=True, use_model_settings=True,
                             has_output=True, output_from_dicom=True)
    assert not cancelling.apply_enabled
    done = panel_state(TWO_INPUTS, ["a", "b"], running=False, cancel_requested=False, use_model_settings=True,
                       has_output=True, output_from_dicom=False)
    assert done.export_enabled and done.replace_enabled and not done.dicom_export_enabled


def _job(outcome: str, node=None, error: str = "", hint: str = "", abandon: str = ""):
    monitor = RunMonitor()
    monitor.outcome, monitor.error, monitor.hint = outcome, error, hint
    return SimpleNamespace(monitor=monitor, segmentationNode=node, elapsed=65.0, abandonReason=abandon)


def test_end_of_run_messages() -> None:
    segmentation = SimpleNamespace(GetNumberOfSegments=lambda: 7)
    node = SimpleNamespace(GetSegmentation=lambda: segmentation, GetName=lambda: "CT demo")
    done = run_end(_job("done", node))
    assert done.status == "Done in 1 min 05 s: 7 segments in 'CT demo'. Review and edit them in Segment Editor."
    assert not done.error
    cancelled = run_end(_job("cancelled"))
    assert cancelled.status == "Cancelled; nothing was changed." and not cancelled.progress_visible
    failed = run_end(_job("error", error="no such file", hint="check the path"))
    assert failed.status == "Failed: no such file" and failed.error == "no such file\nHint: check the path"
    removed = run_end(_job("cancelled", error="an input volume was removed", abandon="removed"))
    assert removed.error == "an input volume was removed"


def test_run_settings_copy_a_parameter_node_by_field_name() -> None:
    node = SimpleNamespace(device="cuda:0", overlap=0.8, keepWarm=True, inputVolume0="ignored")
    settings = RunSettings.of(node)
    assert (settings.device, settings.overlap, settings.keepWarm, settings.amp) == ("cuda:0", 0.8, True, True)


class _TorchLogic:
    def __init__(self, installed: bool, accept: bool) -> None:
        self.installed, self.accept, self.asked = installed, accept, []

    def torchInstalled(self) -> bool:
        return self.installed

    def installTorch(self, askConfirmation: bool, torchVersionRequirement: str):
        self.asked.append(torchVersionRequirement)
        return object() if self.accept else None


def test_dependencies_pytorch_extension_first_then_requirements(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    requirements = tmp_path / "requirements.txt"
    requirements.write_text("numpy>=1.0\nsurely-not-installed-package>=1\n")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real_find_spec(name, *a))

    def missing_extension():
        raise ImportError("No module named PyTorchUtils")

    with pytest.raises(RuntimeError, match="install the 'PyTorch' extension"):
        ensure_requirements(str(requirements), lambda text: True, lambda pkgs: None, missing_extension, None)
    declined = _TorchLogic(installed=False, accept=False)
    assert ensure_requirements(str(requirements), lambda text: True, lambda pkgs: None, lambda: declined, None) is False
    assert declined.asked == [">=2.1"]
    installed, asked, reports = [], [], []

    def pip_install(args):  # what slicer.util.pip_install gets: pip arguments after "install"
        installed.append((list(args), Path(args[1]).read_text(encoding="utf-8")))

    ok = ensure_requirements(str(requirements), lambda text: asked.append(text) or True, pip_install,
                             lambda: _TorchLogic(True, True), None, report=reports.append)
    (args, constraints), = installed
    # The torch that is there is pinned (pip must not replace the extension's build); only the missing package asked.
    assert ok and args[0] == "-c" and args[2:] == ["surely-not-installed-package>=1"]
    assert f"torch=={version('torch')}" in constraints.splitlines()
    assert not Path(args[1]).exists()  # the constraints file lived in a private temporary folder
    assert "surely-not-installed-package" in asked[0] and f"torch=={version('torch')} kept as installed" in asked[0]
    assert reports == [f"Python packages for VolSegSlicer, chosen to work with torch {version('torch')} (kept as the "
                       f"PyTorch extension installed it): numpy {version('numpy')}, surely-not-installed-package "
                       "(not installed)."]
    assert ensure_requirements(str(requirements), lambda text: False, pip_install, lambda: _TorchLogic(True, True),
                               None) is False
    ensured = []
    packaging = SimpleNamespace(
        load_requirements=lambda path: ["from " + path],
        pip_ensure=lambda reqs, constraints, requester: ensured.append((reqs, Path(constraints).read_text(), requester)))
    assert ensure_requirements(str(requirements), lambda t: False, None, lambda: _TorchLogic(True, True), packaging)
    assert ensured == [([f"from {requirements}"], f"torch=={version('torch')}\n", "VolSegSlicer")]


def test_module_asks_the_pytorch_extension_for_pyprojects_torch() -> None:
    import tomllib

    from VolSegSlicerLib.resources import TORCH_REQUIREMENT

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    torch = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert torch == "torch" + TORCH_REQUIREMENT


def test_diagnostics_name_versions_devices_and_log() -> None:
    text = diagnostics_text("/m", "5.10.0", "/py", DeviceChoices([("auto", "Automatic"), ("cpu", "CPU")], "cpu",
                                                                  "no GPU"), "line 1")
    assert "Slicer: 5.10.0" in text and "Devices: Automatic; CPU" in text and "Automatic device: cpu (no GPU)" in text
    assert text.endswith("line 1")


def test_scalar_volumes_and_temporary_additions_on_slicer_core() -> None:
    pytest.importorskip("slicer", reason="slicer-core is part of the [test] extra")
    from VolSegSlicerLib.mrml import create_core_context, scalar_volumes

    context = create_core_context()
    image = context.add_node("vtkMRMLScalarVolumeNode", "CT")
    context.add_node("vtkMRMLLabelMapVolumeNode", "labels")
    assert scalar_volumes(context) == [image]
    count = context.scene.GetNumberOfNodes()
    with pytest.raises(RuntimeError):
        with context.temporary_additions() as keep:
            kept = context.add_node("vtkMRMLSegmentationNode", "kept")
            keep.add(kept.GetID())
            context.add_node("vtkMRMLColorTableNode", "helper").CreateDefaultStorageNode()
            raise RuntimeError("fails half-way")
    assert context.scene.GetNumberOfNodes() == count + 1 and context.scene.IsNodePresent(kept)
