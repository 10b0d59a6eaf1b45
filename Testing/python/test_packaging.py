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


def test_slicer_requirements_and_pyproject_ask_for_the_same_versions():
    """One requirement per package: Slicer's requirements.txt and pyproject.toml give each package
    they share the same version specifier (they disagreed on pydicom: >=2.4 vs >=3.0)."""
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    engine = {Requirement(d).name.lower(): str(Requirement(d).specifier) for d in project["dependencies"]}
    lines = [line.split("#", 1)[0].strip()
             for line in (REPO / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    slicer = {Requirement(line).name.lower(): str(Requirement(line).specifier)
              for line in lines if line and not line.startswith("-")}
    assert slicer and {name: spec for name, spec in slicer.items() if engine.get(name) != spec} == {}


def test_readme_test_command_is_what_ci_runs():
    """The developers' command at the top of the README installs and runs what `.ci/run` does."""
    import shlex

    run = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    install = re.search(r"pip install (?:--\S+ )*(torch==\S+ -e \S+)", run).group(1)
    pytest_line = next(line.strip() for line in run.splitlines() if " -m pytest " in line)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    top = readme.split("```bash", 1)[1].split("```", 1)[0]
    developer = next(line for line in top.splitlines() if "pytest" in line)
    assert f"python3 -m pip install {install} && {pytest_line}" == developer.strip()
    assert shlex.split(install)[-1] == '.[test,cluster,onnx]'
