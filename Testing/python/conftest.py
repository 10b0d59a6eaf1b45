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


# -- engine fixtures: tiny models and cards made by the tests themselves ---------------------------
import json  # noqa: E402

from torch import nn  # noqa: E402


class ThresholdNet(nn.Module):
    """A 'network' whose answer is known: label 1 where the (preprocessed) input exceeds ``t``.

    (B, 1, ...) -> (B, 2, ...) logits. Used to check that geometry survives preprocessing,
    sliding windows and inversion exactly.
    """

    def __init__(self, t: float = 0.5) -> None:
        super().__init__()
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = (x[:, :1] - self.t) * 20.0
        return torch.cat([-d, d], dim=1)


@pytest.fixture(scope="session")
def threshold_torchscript(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "threshold.pt"
    torch.jit.save(torch.jit.script(ThresholdNet()), str(path))
    return path


def make_card(folder: Path, card_id: str = "test-card", **fields) -> Path:
    """Write a valid card JSON into ``folder`` (fields override the defaults) and return its path."""
    raw = {
        "id": card_id,
        "title": "test card",
        "architecture": {"name": "torchscript"},
        "inputs": [{"name": "CT", "modality": "CT"}],
        "labels": [{"value": 1, "name": "bright", "color": [255, 0, 0],
                    "terminology": {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                                    "type": ["SCT", "4147007", "Mass"]}}],
        "output": {"activation": "softmax"},
        "preprocessing": [],
        "inference": {"roi_size": [16, 16, 16], "overlap": 0.25, "sw_batch_size": 2},
    }
    raw.update(fields)
    path = Path(folder) / f"{card_id}.json"
    path.write_text(json.dumps(raw, indent=1))
    return path


@pytest.fixture
def card_factory(tmp_path):
    def factory(card_id: str = "test-card", **fields) -> Path:
        return make_card(tmp_path, card_id, **fields)

    return factory


# -- Slicer half: slicer-core scenes and the bundled model cards ------------------------------------
@pytest.fixture(scope="session")
def demo() -> dict:
    """The ``demo`` card's entry of ``volseg models --json`` (what the Slicer panel lists)."""
    import subprocess
    import sys

    module_dir = REPO_ROOT / "VolSegSlicer"
    text = subprocess.run([sys.executable, "-m", "volseg", "models", "--json"], capture_output=True, text=True,
                          check=True, env=dict(os.environ, PYTHONPATH=str(module_dir))).stdout
    demo = next((m for m in json.loads(text)["models"] if m.get("id") == "demo"), None)
    assert demo is not None, "the 'demo' model card is missing from the model list"
    return demo


@pytest.fixture
def context():
    """A fresh scene with Slicer's logics on slicer-core (as Slicer's application sets them up)."""
    pytest.importorskip("slicer", reason="slicer-core is part of the [test] extra: pip install -e '.[test]'")
    import sys

    if str(REPO_ROOT / "VolSegSlicer") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "VolSegSlicer"))
    from VolSegSlicerLib.mrml import create_core_context

    return create_core_context()
