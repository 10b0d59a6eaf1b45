"""Packaging hook: copy the built-in model cards (and the demo weights beside them) from the
repository's top-level ``Resources/ModelCards`` into the wheel as ``volseg/resources/ModelCards``,
so a non-editable install finds them too. Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithCards(build_py):
    def run(self):
        super().run()
        source = ROOT / "Resources" / "ModelCards"
        target = Path(self.build_lib) / "volseg" / "resources" / "ModelCards"
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithCards})
