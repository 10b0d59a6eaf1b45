"""Shared fixtures for the VolSegSlicer test suite (CPU only, tiny networks, small volumes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO_ROOT / "Testing" / "golden"
SHARED_GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden"

# Two cores in CI: keep torch from oversubscribing them when pytest runs alongside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Golden vectors and manifests copied into the repository (always present)."""
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def shared_golden_dir() -> Path:
    """The large golden files beside the checkout; tests using this skip (visibly) where absent."""
    if not SHARED_GOLDEN_DIR.is_dir():
        pytest.skip("../shared/golden is not beside this checkout (large golden files are tested only there)")
    return SHARED_GOLDEN_DIR


@pytest.fixture(scope="session")
def slicerio_data() -> Path:
    """slicerio's bundled sample data folder: CTChest4.nrrd (128x128x34) and Segmentation.seg.nrrd."""
    import slicerio

    return Path(slicerio.__file__).parent / "data"


@pytest.fixture(scope="session")
def ct_path(slicerio_data: Path) -> Path:
    return slicerio_data / "CTChest4.nrrd"


@pytest.fixture(scope="session")
def ct_segmentation_path(slicerio_data: Path) -> Path:
    return slicerio_data / "Segmentation.seg.nrrd"
