"""`volseg segment` through the torch stages (the default) and through today's exact path
(``VOLSEG_EXACT_STAGES=1``): the same label maps; a GPU failing mid-run is exit 3 with no output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_card
from test_pipeline_geometry import REORIENT, SCALE, box_volume, rotation, write_nifti

import volseg.pipeline as pipeline
from volseg.cli.main import main
from volseg.errors import ResourceError
from volseg.io import read_volume

SPACING_LINEAR = [{"name": "Spacing", "args": {"pixdim": [1.5, 1.5, 1.5], "mode": "bilinear"}}]
SPACING_SPLINE = [{"name": "Spacing", "args": {"pixdim": [1.3, 1.4, 1.5], "mode": 3}}]


@pytest.mark.parametrize("spacing", [SPACING_LINEAR, SPACING_SPLINE], ids=["linear", "spline"])
@pytest.mark.parametrize("z_deg", [0, 20])
def test_torch_stages_give_the_exact_paths_labels(tmp_path, threshold_torchscript, monkeypatch, spacing, z_deg):
    # 830 HU boxes: interpolated edges cross the model's threshold (0.5 after scaling) away from a
    # sample's exact midpoint, where float32 and float64 would round a tie differently
    src = write_nifti(tmp_path / "in.nii.gz", 0.83 * box_volume(), rotation(z_deg, 0), (1.0, 0.9, 2.0), (0, 0, 0))
    card = make_card(tmp_path, preprocessing=spacing + REORIENT + SCALE + [{"name": "CropForeground", "args": {}}])
    got = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("VOLSEG_EXACT_STAGES", mode)
        out = tmp_path / f"out{mode}.nii.gz"
        assert main(["segment", str(src), "--model", str(card), "--checkpoint", str(threshold_torchscript),
                     "-o", str(out), "--progress", "none"]) == 0
        got[mode] = read_volume(out).array
    assert (got["1"] == 1).sum() > 100  # the box is found
    assert np.mean(got["0"] != got["1"]) <= 1e-4


def test_device_failure_is_one_clear_error():
    with pytest.raises(ResourceError) as info, pipeline.device_failures(torch.device("cuda:0")):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    assert info.value.exit_code == 3 and "cuda:0" in info.value.message
    with pytest.raises(ValueError), pipeline.device_failures(torch.device("cuda:0")):
        raise ValueError("not the device")
    with pytest.raises(torch.OutOfMemoryError), pipeline.device_failures(torch.device("cuda:0")):
        raise torch.OutOfMemoryError("CUDA out of memory")


def test_gpu_lost_in_the_way_back_exits_3_without_output(tmp_path, threshold_torchscript, monkeypatch, capsys):
    src = write_nifti(tmp_path / "in.nii.gz", box_volume(), rotation(0, 0), (1.0, 1.0, 2.0), (0, 0, 0))
    card = make_card(tmp_path, preprocessing=SPACING_LINEAR + SCALE)

    def lost(*args, **kwargs):
        raise RuntimeError("CUDA error: unspecified launch failure")

    monkeypatch.setattr(pipeline, "labelmap_on_input_grid", lost)
    monkeypatch.delenv("VOLSEG_EXACT_STAGES", raising=False)
    out = tmp_path / "out.nii.gz"
    code = main(["segment", str(src), "--model", str(card), "--checkpoint", str(threshold_torchscript),
                 "-o", str(out), "--progress", "none"])
    assert code == 3
    assert "failed during the run" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []


def test_gpu_out_of_memory_in_the_way_in_falls_back_to_the_cpu(monkeypatch):
    """Out of GPU memory while preprocessing: the exact CPU path, and a warning saying so."""
    from test_export_prediction import _affine, _ct

    calls = []
    real = pipeline.preprocess

    def flaky(array, affine, steps, device=None):
        calls.append(device)
        if device is not None:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(array, affine, steps)

    monkeypatch.setattr(pipeline, "preprocess", flaky)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.delenv("VOLSEG_EXACT_STAGES", raising=False)

    class Volume:
        array = _ct((20, 18, 12))
        ijk_to_ras = _affine("axis")

    class Card:
        preprocessing = tuple(SPACING_LINEAR)

    logged = []

    class Rep:
        def log(self, message, level="info"):
            logged.append((level, message))

    pre = pipeline.preprocess_on(torch.device("cuda"), Volume, Card, Rep())
    assert calls == [torch.device("cuda"), None]
    assert logged and logged[0][0] == "warning" and "on the CPU" in logged[0][1]
    assert pre.image.shape[1:] == (10, 11, 10) or pre.image.ndim == 4


def test_warm_worker_loads_the_model_once(tmp_path, threshold_torchscript, monkeypatch):
    """``volseg serve``'s cache: a second run on the same model loads nothing; the module (and so
    its device copy: ``model.to(device)`` moves it in place) is the one of the first run."""
    from volseg.cards import load_card
    from volseg.progress import Reporter
    from volseg.request import SegmentRequest

    class Quiet(Reporter):
        def emit(self, event):
            pass

    src = write_nifti(tmp_path / "in.nii.gz", 0.83 * box_volume(), rotation(0, 0), (1.0, 1.0, 2.0), (0, 0, 0))
    card = load_card(make_card(tmp_path, preprocessing=SPACING_LINEAR + SCALE))
    loads = []
    real = pipeline.load_model
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    cache = pipeline.ModelCache()
    for n in range(2):
        request = SegmentRequest(inputs=[src], card=card, output=tmp_path / f"o{n}.nii.gz",
                                 checkpoint=threshold_torchscript, device="cpu")
        pipeline.segment(request, Quiet(), cache=cache)
    assert loads == [1]
    assert read_volume(tmp_path / "o0.nii.gz").array.sum() == read_volume(tmp_path / "o1.nii.gz").array.sum() > 0


@pytest.mark.parametrize("exact", ["0", "1"])
def test_a_stored_int16_volume_segments_as_its_float32_copy(tmp_path, threshold_torchscript, monkeypatch, exact):
    """The way in takes the volume as stored (an int16 NRRD crosses as int16) and gives the label
    map its float32 copy gives, on the torch stages and on the exact path."""
    from test_pipeline_geometry import write_nrrd_lps

    from volseg.preprocessing import on_device

    crossed = []
    real = on_device.upload
    monkeypatch.setattr(on_device, "upload", lambda host, device: crossed.append(host.dtype) or real(host, device))
    monkeypatch.setenv("VOLSEG_EXACT_STAGES", exact)
    card = make_card(tmp_path, preprocessing=SPACING_LINEAR + REORIENT + SCALE)
    hu = np.round(0.83 * box_volume() + np.random.default_rng(0).normal(0, 30, box_volume().shape))
    got = {}
    for dtype in (np.int16, np.float32):
        src = write_nrrd_lps(tmp_path / f"in-{np.dtype(dtype).name}.nrrd", hu.astype(dtype), rotation(20, 0),
                             (1.0, 0.9, 2.0), (0, 0, 0))
        out = tmp_path / f"out-{np.dtype(dtype).name}.nii.gz"
        assert main(["segment", str(src), "--model", str(card), "--checkpoint", str(threshold_torchscript),
                     "-o", str(out), "--progress", "none"]) == 0
        got[dtype] = read_volume(out).array
    assert crossed == ([] if exact == "1" else [torch.int16, torch.float32])
    assert (got[np.int16] == 1).sum() > 100
    assert np.array_equal(got[np.int16], got[np.float32])
