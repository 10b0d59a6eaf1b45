"""`volseg batch`: many cases, one model load, failures isolated, nothing overwritten."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
from conftest import make_card

from volseg.cli import main


def write_case(path, value=800.0, shape=(20, 16, 12)):
    a = np.zeros(shape[::-1], np.float32) - 1000
    a[2:6, 3:9, 4:12] = value
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((1.0, 1.2, 2.0))
    sitk.WriteImage(img, str(path))
    return path


SCALE = [{"name": "ScaleIntensityRange", "args": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}}]


def test_batch_of_files(tmp_path, threshold_torchscript, capsys):
    cases = [write_case(tmp_path / f"case{n}.nii.gz") for n in range(3)]
    (tmp_path / "broken.nrrd").write_text("not an image")
    out = tmp_path / "results"
    out.mkdir()
    (out / "case1.seg.nrrd").write_bytes(b"keep me")
    card = make_card(tmp_path, "thr", preprocessing=SCALE)
    rc = main(["batch", *map(str, cases), str(tmp_path / "broken.nrrd"), "--model", str(card),
               "--checkpoint", str(threshold_torchscript), "-o", str(out), "--progress", "json"])
    assert rc == 1  # one case failed
    ev = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum(e["event"] == "done" for e in ev) == 2
    assert sum(e["event"] == "stage" and e["stage"] == "load_model" for e in ev) == 2
    errors = [e for e in ev if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["message"].startswith("broken:")
    assert (out / "case1.seg.nrrd").read_bytes() == b"keep me"
    assert (out / "case0.seg.nrrd").exists() and (out / "case2.seg.nrrd").exists()
    assert any(e["event"] == "log" and "1 skipped" in e["message"] for e in ev)


def test_batch_loads_the_model_once(tmp_path, threshold_torchscript, monkeypatch):
    import volseg.pipeline

    calls = []
    real = volseg.pipeline.load_model
    monkeypatch.setattr(volseg.pipeline, "load_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    cases = [write_case(tmp_path / f"c{n}.nrrd") for n in range(3)]
    card = make_card(tmp_path, "thr", preprocessing=SCALE)
    assert main(["batch", *map(str, cases), "--model", str(card), "--checkpoint", str(threshold_torchscript),
                 "-o", str(tmp_path / "o"), "--format", ".nii.gz", "--progress", "none"]) == 0
    assert len(calls) == 1
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o" / "c2.nii.gz")))
    assert labels.sum() == 4 * 6 * 8


def test_multi_input_case_folders_use_name_hints(tmp_path, threshold_torchscript, capsys):
    inputs = [{"name": "T1", "name_hint": "t1"}, {"name": "FLAIR", "name_hint": "flair"}]
    card = make_card(tmp_path, "two", inputs=inputs, preprocessing=SCALE)
    folder = tmp_path / "patient7"
    folder.mkdir()
    write_case(folder / "p7_flair.nii.gz", value=-1000)  # would give no label if taken for channel 0
    write_case(folder / "p7_t1.nii.gz")
    out = tmp_path / "o"
    assert main(["batch", str(folder), "--model", str(card), "--checkpoint", str(threshold_torchscript),
                 "-o", str(out), "--format", ".nrrd", "--progress", "none"]) == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "patient7.nrrd")))
    assert labels.sum() == 4 * 6 * 8  # channel 0 was the T1 file

    lonely = tmp_path / "case.nii.gz"
    write_case(lonely)
    assert main(["batch", str(lonely), "--model", str(card), "--checkpoint", str(threshold_torchscript),
                 "-o", str(out), "--progress", "none"]) == 2
    assert "needs 2 inputs" in capsys.readouterr().err
