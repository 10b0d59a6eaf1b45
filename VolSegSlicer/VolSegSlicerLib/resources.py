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
    try:
        import slicer.packaging as packaging  # Slicer 5.12+
    except ImportError:
        return None
    return packaging


def ensure_requirements(requirements_path: str, confirm: Any, pip_install: Any, torch_installer: Any = None,
                        packaging: Any = "slicer") -> bool:
    """Make sure PyTorch and the engine's packages are installed; False if the user declined.

    PyTorch comes first, from the PyTorch extension's installer (``torch_installer()`` returns
    its ``PyTorchUtilsLogic``, or raises ImportError when the extension is missing), which picks
    the build that fits the GPU driver. The rest comes from ``requirements_path`` with Slicer's
    ``packaging.pip_ensure`` (5.12+) where there is one, else by asking ``confirm(text)`` and
    calling ``pip_install(list)`` for the missing ones.

    Raises:
        RuntimeError: the PyTorch extension is missing (the message says what to install).
    """
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        try:
            torch_logic = (torch_installer or _pytorch_utils_logic)()
        except ImportError:
            raise RuntimeError("VolSegSlicer needs PyTorch: install the 'PyTorch' extension with the "
                               "Extensions Manager, restart Slicer and try again.") from None
        if not torch_logic.torchInstalled():
            if torch_logic.installTorch(askConfirmation=True, torchVersionRequirement=">=2.1") is None:
                return False
    packaging = _slicer_packaging() if packaging == "slicer" else packaging
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        packaging.pip_ensure(packaging.load_requirements(requirements_path), requester="VolSegSlicer")
        return True
    missing = missing_requirements(read_requirements(requirements_path))
    if not missing:
        return True
    if not confirm("VolSegSlicer needs these Python packages:\n" + "\n".join(missing) + "\n\nInstall them now?"):
        return False
    pip_install(missing)
    return True
