"""What a new install gets: Slicer's requirements file and pyproject agree, demo output is ignored."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Left to Slicer: torch comes from the PyTorch extension; numpy, scipy, SimpleITK are bundled.
PROVIDED_BY_SLICER = {"torch", "numpy", "scipy", "simpleitk"}


def _names(lines: list[str]) -> set[str]:
    return {re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line).group(1).lower() for line in lines}


def test_slicer_requirements_cover_every_engine_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    needed = _names(project["dependencies"]) - PROVIDED_BY_SLICER
    lines = [line.split("#", 1)[0].strip()
             for line in (REPO / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    listed = _names([line for line in lines if line and not line.startswith("-")])
    assert "einops" in listed  # MONAI's SwinUNETR and UNETR import it
    assert needed - listed == set()


def test_demo_results_are_ignored_by_git():
    patterns = (REPO / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert any(p.strip("/").startswith("volseg-demo") for p in patterns)
