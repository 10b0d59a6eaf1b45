"""Finding the module's resources, reading requirements, a capped log (pure Python)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

#: The panel's log keeps at most this many characters (the oldest text is dropped first).
LOG_LIMIT_CHARS = 256 * 1024


def resource_dir(module_dir: str | os.PathLike) -> Path:
    """Where the module's ``Resources`` folder is.

    In the CMake-built extension the resources are installed beside the module file
    (``<module dir>/Resources``). In a source checkout added with "Add module path" the module
    file is ``VolSegSlicer/VolSegSlicer.py`` and the resources are the repository's top-level
    ``Resources`` folder (``<module dir>/../Resources``). The first one holding ``UI/`` wins.
    """
    module_dir = Path(module_dir)
    candidates = [module_dir / "Resources", module_dir.parent / "Resources"]
    for candidate in candidates:
        if (candidate / "UI").is_dir():
            return candidate
    raise FileNotFoundError(
        "VolSegSlicer resources not found; looked in " + ", ".join(str(c) for c in candidates))


def read_requirements(path: str | os.PathLike) -> list[str]:
    """Requirement lines of a requirements.txt (comments, blanks and pip options removed)."""
    requirements = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#") or line.startswith("-"):
            continue
        requirements.append(line)
    return requirements


def requirement_name(requirement: str) -> str:
    """The distribution name of a requirement line: ``"monai[nibabel]>=1.3"`` -> ``"monai"``."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(1)


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements whose distribution is not installed or whose version does not satisfy
    the specifier (checked with importlib.metadata and packaging when available)."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging ships with pip/setuptools
        Requirement = None
    missing = []
    for req in requirements:
        name = requirement_name(req)
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(req)
            continue
        if Requirement is not None:
            spec = Requirement(req).specifier
            if spec and not spec.contains(version, prereleases=True):
                missing.append(req)
    return missing


class LogBuffer:
    """Text of the panel's log, capped at ``limit`` characters (oldest lines dropped)."""

    def __init__(self, limit: int = LOG_LIMIT_CHARS) -> None:
        self.limit = limit
        self._lines: list[str] = []
        self._size = 0
        self.dropped = 0

    def append(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line) + 1
        while self._size > self.limit and len(self._lines) > 1:
            old = self._lines.pop(0)
            self._size -= len(old) + 1
            self.dropped += 1

    def text(self) -> str:
        head = f"[... {self.dropped} older lines not shown ...]\n" if self.dropped else ""
        return head + "\n".join(self._lines)

    def clear(self) -> None:
        self._lines, self._size, self.dropped = [], 0, 0


def diagnostics_text(module_dir: str, slicer_version: str, engine_python: str, devices: Any, log_text: str) -> str:
    """The text the panel's "Copy log" puts on the clipboard for bug reports: versions, the
    devices the engine sees (a :class:`~VolSegSlicerLib.devices.DeviceChoices`) and the log."""
    import sys

    lines = [f"VolSegSlicer module: {module_dir}",
             f"Slicer: {slicer_version}",
             f"Python: {sys.version.split()[0]}",
             f"Engine Python: {engine_python}",
             "Devices: " + "; ".join(text for _id, text in devices.items),
             f"Automatic device: {devices.auto} ({devices.reason})",
             "", log_text]
    return "\n".join(lines)


def _pytorch_utils_logic() -> Any:
    import PyTorchUtils  # the PyTorch extension's module (ImportError when it is not installed)

    return PyTorchUtils.PyTorchUtilsLogic()


def _slicer_packaging() -> Any:
    """Slicer's package helper with ``pip_ensure``: ``slicer.pydeps`` (5.11+) or ``slicer.packaging``."""
    import importlib

    for name in ("slicer.pydeps", "slicer.packaging"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


#: What the module asks the PyTorch extension for (pyproject.toml's torch requirement; a test
#: keeps the two equal).
TORCH_REQUIREMENT = ">=2.1"
#: Packages the PyTorch extension installs, kept exactly as they are when the requirements are
#: installed (pip picks versions of the others that work with them).
TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")


def torch_pins() -> list[str]:
    """``name==version`` of each installed :data:`TORCH_PACKAGES` (e.g. ``torch==2.4.1+cu121``)."""
    from importlib import metadata

    pins = []
    for name in TORCH_PACKAGES:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def installed_versions(requirements: list[str]) -> list[str]:
    """``"name version"`` of each requirement as installed now (``"name (not installed)"`` if not)."""
    from importlib import metadata

    versions = []
    for requirement in requirements:
        name = requirement_name(requirement)
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return versions


def ensure_requirements(requirements_path: str, confirm: Any, pip_install: Any, torch_installer: Any = None,
                        packaging: Any = "slicer", report: Any = None) -> bool:
    """Make sure PyTorch and the engine's packages are installed; False if the user declined.

    PyTorch comes first, from the PyTorch extension's installer (``torch_installer()`` returns
    its ``PyTorchUtilsLogic``, or raises ImportError when the extension is missing), which picks
    the build that fits the GPU driver. The rest comes from ``requirements_path`` with the
    installed torch (and torchvision/torchaudio) **pinned** by a pip constraints file, so pip
    never replaces the extension's torch build: it picks versions of the other packages that
    work with it (MONAI 1.6 needs torch 2.8+; with torch 2.4 or 2.6 pip picks MONAI 1.5.2, with
    torch 2.1 MONAI 1.4.0). Slicer's ``pip_ensure`` (``slicer.pydeps``, 5.11+) is used where
    there is one, else ``confirm(text)`` is asked and ``pip_install(["-c", constraints,
    *missing])`` called. ``report(text)`` is told which versions are installed afterwards.

    Raises:
        RuntimeError: the PyTorch extension is missing (the message says what to install).
    """
    import importlib.util
    import tempfile

    if importlib.util.find_spec("torch") is None:
        try:
            torch_logic = (torch_installer or _pytorch_utils_logic)()
        except ImportError:
            raise RuntimeError("VolSegSlicer needs PyTorch: install the 'PyTorch' extension with the "
                               "Extensions Manager, restart Slicer and try again.") from None
        if not torch_logic.torchInstalled():
            if torch_logic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT) is None:
                return False
    packaging = _slicer_packaging() if packaging == "slicer" else packaging
    requirements = read_requirements(requirements_path)
    pins = torch_pins()
    with tempfile.TemporaryDirectory(prefix="VolSegSlicer-pip-") as folder:  # private (0700)
        constraints = os.path.join(folder, "constraints.txt")
        Path(constraints).write_text("".join(pin + "\n" for pin in pins), encoding="utf-8")
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(packaging.load_requirements(requirements_path), constraints=constraints,
                                 requester="VolSegSlicer")
        else:
            missing = missing_requirements(requirements)
            if not missing:
                return True
            kept = f" ({', '.join(pins)} kept as installed)" if pins else ""
            if not confirm("VolSegSlicer needs these Python packages:\n" + "\n".join(missing) +
                           f"\n\nInstall them now{kept}?"):
                return False
            pip_install(["-c", constraints, *missing])
    if report is not None:
        report(install_report(requirements, pins))
    return True


def install_report(requirements: list[str], pins: list[str]) -> str:
    """What is installed now, for the user: the kept torch build and the versions pip chose."""
    kept = ", ".join(pin.replace("==", " ") for pin in pins) or "no torch"
    return (f"Python packages for VolSegSlicer, chosen to work with {kept} (kept as the PyTorch extension "
            f"installed it): " + ", ".join(installed_versions(requirements)) + ".")
