"""What `volseg segment` refuses, and that a refused or failed run leaves nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_card
from monai.networks.nets import UNet

from volseg.cli.main import main

SCALE = {"name": "ScaleIntensityRange", "args": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}}


@pytest.fixture
def ct(tmp_path):
    a = np.zeros((12, 20, 24), np.float32) - 1000
    a[2:8, 5:12, 6:14] = 800
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(a), str(path))
    return path


def run(ct, card, ckpt, out, *extra):
    return main(["segment", str(ct), "--model", str(card), "--checkpoint", str(ckpt), "-o", str(out),
                 "--progress", "none", *extra])


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".volseg"))


def test_card_cannot_write_files_through_preprocessing(tmp_path, ct, threshold_torchscript, capsys):
    target = tmp_path / "written_by_card"
    target.mkdir()
    save = {"name": "SaveImage", "args": {"output_dir": str(target), "separate_folder": False}}
    card = make_card(tmp_path, "sneaky", preprocessing=[save])
    assert run(ct, card, threshold_torchscript, tmp_path / "o.nrrd") == 2
    assert "not allowed" in capsys.readouterr().err
    assert list(target.iterdir()) == []


class NaNNet(torch.nn.Module):
    def forward(self, x):
        return torch.cat([x, x], 1) * float("nan")


def test_nan_output_is_an_error_not_an_empty_segmentation(tmp_path, ct, capsys):
    ckpt = tmp_path / "nan.pt"
    torch.jit.save(torch.jit.script(NaNNet()), str(ckpt))
    out = tmp_path / "o.nrrd"
    assert run(ct, make_card(tmp_path, preprocessing=[SCALE]), ckpt, out) == 2
    assert "NaN" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


def test_memory_estimate_counts_padding_to_the_window(tmp_path, ct, threshold_torchscript, monkeypatch, capsys):
    import volseg.pipeline

    monkeypatch.setattr(volseg.pipeline, "_available_memory", lambda: 8 * 2**30)
    card = make_card(tmp_path, preprocessing=[SCALE])
    assert run(ct, card, threshold_torchscript, tmp_path / "big.nrrd", "--roi-size", "1000", "1000", "1000") == 3
    assert "memory" in capsys.readouterr().err
    assert run(ct, card, threshold_torchscript, tmp_path / "ok.nrrd", "--roi-size", "16", "16", "16") == 0


@pytest.fixture
def unet_checkpoint(tmp_path):
    cfg = dict(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=1)
    path = tmp_path / "unet.pt"
    torch.save(UNet(**cfg).state_dict(), path)
    return path, cfg


def test_window_that_does_not_fit_the_network_is_explained(tmp_path, ct, unet_checkpoint, capsys):
    path, cfg = unet_checkpoint
    args = ["segment", str(ct), "--arch", "unet", "--num-labels", "2", "--checkpoint", str(path),
            "-o", str(tmp_path / "o.nrrd"), "--progress", "none", "--roi-size", "15", "15", "15"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "window" in err and "--roi-size" in err and "internal error" not in err


def test_wrong_input_count_fails_on_the_first_window(tmp_path, ct, unet_checkpoint, capsys):
    path, cfg = unet_checkpoint
    card = make_card(tmp_path, "two", inputs=[{"name": "a"}, {"name": "b"}],
                     architecture={"name": "unet", "config": cfg}, labels=[{"value": 1, "name": "x"}, {"value": 2, "name": "y"}])
    rc = main(["segment", str(ct), str(ct), "--model", str(card), "--checkpoint", str(path),
               "-o", str(tmp_path / "o.nrrd"), "--progress", "none", "--roi-size", "16", "16", "16"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "2 input channel(s)" in err and "internal error" not in err


def test_label_count_mismatch_is_found_from_the_checkpoint_before_any_work(tmp_path, ct, unet_checkpoint, capsys,
                                                                          monkeypatch):
    path, cfg = unet_checkpoint
    card = make_card(tmp_path, "five", architecture={"name": "unet", "config": {**cfg, "out_channels": 3}},
                     labels=[{"value": v, "name": f"l{v}"} for v in range(1, 5)])
    import volseg.pipeline

    monkeypatch.setattr(volseg.pipeline, "preprocess", lambda *a, **k: pytest.fail("preprocessing ran"))
    rc = main(["segment", str(ct), "--model", str(card), "--checkpoint", str(path), "-o", str(tmp_path / "o.nrrd"),
               "--progress", "none", "--roi-size", "8", "8", "8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "output layer has 3 channels, but the card 'five' describes 5 (4 labels" in err
    assert "--num-labels" not in err  # a run with a card is told about its card


def test_num_labels_mismatch_names_the_right_count_before_any_work(tmp_path, ct, unet_checkpoint, capsys, monkeypatch):
    path, cfg = unet_checkpoint  # 3 softmax channels: background + 2 labels
    import volseg.pipeline

    monkeypatch.setattr(volseg.pipeline, "preprocess", lambda *a, **k: pytest.fail("preprocessing ran"))
    rc = main(["segment", str(ct), "--arch", "unet", "--num-labels", "4", "--checkpoint", str(path),
               "-o", str(tmp_path / "o.nrrd"), "--progress", "none"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "output layer has 3 channels, but --num-labels 4 gives 5 for unet" in err
    assert "pass --num-labels 2" in err and "card" not in err


def test_num_labels_hint_for_a_sigmoid_family():
    from volseg.cards import card_from_arguments
    from volseg.errors import CheckpointError
    from volseg.pipeline import check_output_count

    card = card_from_arguments("segformer3d", 7, in_channels=4, config={"num_heads": [1, 2, 5, 8]}, activation="sigmoid")
    check_output_count(card, 7)  # sigmoid: one channel per label
    check_output_count(card, None)  # cannot tell: the first window checks
    with pytest.raises(CheckpointError, match="8 channels, but --num-labels 7 gives 7 for segformer3d") as info:
        check_output_count(card, 8)
    assert info.value.hint == "pass --num-labels 8"


def test_torchscript_label_count_mismatch_is_found_on_the_first_window(tmp_path, ct, threshold_torchscript, capsys,
                                                                       monkeypatch):
    card = make_card(tmp_path, "three", labels=[{"value": v, "name": f"l{v}"} for v in (1, 2)])  # 3 channels
    import volseg.inference.window_predictor

    calls = []
    real = volseg.inference.window_predictor.WindowPredictor.__call__

    def counting(self, patches):
        calls.append(1)
        return real(self, patches)

    monkeypatch.setattr(volseg.inference.window_predictor.WindowPredictor, "__call__", counting)
    assert run(ct, card, threshold_torchscript, tmp_path / "o.nrrd", "--roi-size", "8", "8", "8",
               "--sw-batch-size", "1") == 2
    assert "returns 2 channels but the card (or --num-labels) describes 3" in capsys.readouterr().err
    assert len(calls) == 1


def test_preprocessing_that_removes_everything_is_an_input_error(tmp_path, threshold_torchscript, capsys):
    empty = tmp_path / "zeros.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 8), np.float32)), str(empty))
    card = make_card(tmp_path, preprocessing=[{"name": "CropForeground", "args": {}}])
    assert run(empty, card, threshold_torchscript, tmp_path / "o.nrrd") == 2
    assert "left nothing of the volume" in capsys.readouterr().err


def test_probabilities_path_is_checked_before_any_work(tmp_path, ct, threshold_torchscript, capsys):
    card = make_card(tmp_path, preprocessing=[SCALE])
    out = tmp_path / "s.seg.nrrd"
    assert run(ct, card, threshold_torchscript, out, "--probabilities", str(tmp_path / "p.mha"), "--progress", "json") == 2
    assert "infer" not in capsys.readouterr().out and not out.exists()
    lab = tmp_path / "same.nrrd"
    assert run(ct, card, threshold_torchscript, lab, "--probabilities", str(lab), "--overwrite") == 2
    assert "file of the segmentation" in capsys.readouterr().err and not lab.exists()


def test_failed_probabilities_write_leaves_no_segmentation(tmp_path, ct, threshold_torchscript, monkeypatch):
    import volseg.pipeline
    from volseg.errors import OutputError

    def full_disk(*a, **k):
        raise OutputError("writing p.nii.gz failed: No space left on device")

    monkeypatch.setattr(volseg.pipeline, "write_probabilities", full_disk)
    out = tmp_path / "s.nii.gz"
    assert run(ct, make_card(tmp_path, preprocessing=[SCALE]), threshold_torchscript, out,
               "--probabilities", str(tmp_path / "p.nii.gz")) == 2
    assert not out.exists() and not (tmp_path / "s.csv").exists()
    assert leftovers(tmp_path) == []


def test_grouped_write_puts_both_files_in_place(tmp_path, ct, threshold_torchscript):
    out, prob = tmp_path / "s.nii.gz", tmp_path / "p.nii.gz"
    assert run(ct, make_card(tmp_path, preprocessing=[SCALE]), threshold_torchscript, out,
               "--probabilities", str(prob)) == 0
    assert out.exists() and (tmp_path / "s.csv").exists() and prob.exists()
    assert leftovers(tmp_path) == []
    import nibabel as nib

    image = nib.load(str(prob))
    assert image.shape[-1] == 2  # background and the one label, named in the file
    assert json.loads(image.header.extensions[0].get_content()) == {"volseg_channel_names": ["background", "bright"]}


def test_overwrite_never_replaces_an_input(tmp_path, ct, threshold_torchscript, capsys):
    card = make_card(tmp_path, preprocessing=[SCALE])
    before = ct.read_bytes()
    assert run(ct, card, threshold_torchscript, ct, "--overwrite") == 2
    assert run(ct, card, threshold_torchscript, tmp_path / "o.nii.gz", "--probabilities", str(ct), "--overwrite") == 2
    assert "input" in capsys.readouterr().err
    assert ct.read_bytes() == before and not (tmp_path / "o.nii.gz").exists()


def test_batch_into_the_cases_folder_keeps_the_cases(tmp_path, threshold_torchscript, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    a = np.zeros((6, 8, 8), np.float32)
    for name in ("p1.nrrd", "p2.nrrd"):
        sitk.WriteImage(sitk.GetImageFromArray(a), str(cases / name))
    before = {p.name: p.read_bytes() for p in cases.iterdir()}
    card = make_card(tmp_path, preprocessing=[SCALE])
    main(["batch", str(cases / "p1.nrrd"), str(cases / "p2.nrrd"), "--model", str(card), "--checkpoint",
          str(threshold_torchscript), "-o", str(cases), "--format", ".nrrd", "--overwrite", "--progress", "none"])
    assert {p.name: p.read_bytes() for p in cases.iterdir() if p.name in before} == before


# -- issue 18 (5): a card allocates nothing before its sizes are checked ------------------------
def _no_real_build(monkeypatch):
    """Make building a network anywhere but on the meta device a test failure (a hostile config
    would allocate gigabytes there)."""
    import volseg.models.registry as registry

    real = registry.create

    def create(name, **config):
        if torch.get_default_device().type != "meta":
            pytest.fail(f"{name} was built for real before its size was checked")
        return real(name, **config)

    monkeypatch.setattr(registry, "create", create)


@pytest.mark.parametrize(("step", "grid"), [
    ({"name": "Resize", "args": {"spatial_size": [700, 700, 700]}}, "(700, 700, 700)"),
    ({"name": "Spacing", "args": {"pixdim": 0.02}}, "(1151, 951, 551)"),
    ({"name": "Zoom", "args": {"zoom": 40}}, "(24, 20, 12)"),  # keeps the size, zooms in memory first
], ids=["Resize-700", "Spacing-0.02mm", "Zoom-40"])
def test_a_preprocessing_step_that_would_not_fit_is_refused_before_it_runs(tmp_path, ct, threshold_torchscript,
                                                                           capsys, monkeypatch, step, grid):
    import volseg.memory
    import volseg.pipeline

    monkeypatch.setattr(volseg.memory, "available_memory", lambda: 2 * 2**30)
    monkeypatch.setattr(volseg.pipeline, "preprocess", lambda *a, **k: pytest.fail("preprocessing ran"))
    card = make_card(tmp_path, preprocessing=[SCALE, step])
    assert run(ct, card, threshold_torchscript, tmp_path / "o.nrrd") == 3
    err = capsys.readouterr().err
    assert f"preprocessing step 1 ({step['name']}, grid (24, 20, 12) -> {grid}) needs about" in err
    assert "check the card's steps" in err


def test_the_final_grid_is_checked_before_preprocessing_and_loading(tmp_path, ct, threshold_torchscript, capsys,
                                                                    monkeypatch):
    """A grid every step can make but the run cannot hold: refused before the model is loaded."""
    import volseg.pipeline

    monkeypatch.setattr(volseg.pipeline, "_available_memory", lambda: 64 * 2**20)
    monkeypatch.setattr(volseg.pipeline, "preprocess", lambda *a, **k: pytest.fail("preprocessing ran"))
    monkeypatch.setattr(volseg.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    card = make_card(tmp_path, preprocessing=[SCALE, {"name": "Resize", "args": {"spatial_size": [160, 160, 160]}}])
    assert run(ct, card, threshold_torchscript, tmp_path / "o.nrrd") == 3
    assert "grid (160, 160, 160)" in capsys.readouterr().err


def test_a_huge_architecture_config_is_never_built_for_real(tmp_path, ct, unet_checkpoint, capsys, monkeypatch):
    """Today the card's config is built (gigabytes for these channels) before the checkpoint's
    shapes are compared with it."""
    path, cfg = unet_checkpoint
    _no_real_build(monkeypatch)
    card = make_card(tmp_path, "huge", architecture={"name": "unet", "config": {**cfg, "channels": [4096, 8192]}},
                     labels=[{"value": 1, "name": "a"}, {"value": 2, "name": "b"}])
    assert run(ct, card, path, tmp_path / "o.nrrd", "--roi-size", "8", "8", "8") == 2
    err = capsys.readouterr().err
    assert "internal error" not in err and "unet" in err and "shape" in err


def test_a_network_too_large_for_the_memory_is_refused_from_its_parameter_count(tmp_path, ct, capsys, monkeypatch):
    from volseg import models

    cfg = dict(spatial_dims=3, in_channels=1, out_channels=3, channels=(32, 64), strides=(2,), num_res_units=1)
    real = UNet(**cfg)
    count = sum(t.numel() for t in (*real.parameters(), *real.buffers()))
    assert models.parameter_count("unet", **cfg) == count  # exact, and found without allocating
    path = tmp_path / "unet.pt"
    torch.save(real.state_dict(), path)
    import volseg.memory
    import volseg.models.registry as registry

    free = {"bytes": 8 * 2**30}
    monkeypatch.setattr(volseg.memory, "available_memory", lambda: free["bytes"])
    skeleton = registry._skeleton

    def short_of_memory_from_now_on(arch, config):  # the checkpoint was read: now half the weights' bytes are left
        free["bytes"] = count * 4 // 2
        return skeleton(arch, config)

    monkeypatch.setattr(registry, "_skeleton", short_of_memory_from_now_on)
    _no_real_build(monkeypatch)
    card = make_card(tmp_path, "mid", architecture={"name": "unet", "config": cfg},
                     labels=[{"value": 1, "name": "a"}, {"value": 2, "name": "b"}])
    assert run(ct, card, path, tmp_path / "o.nrrd", "--roi-size", "8", "8", "8") == 3
    err = capsys.readouterr().err
    assert f"the network unet ({count:,} parameters) needs about" in err and "smaller ROI does not help" in err


def test_planned_grids_match_what_preprocessing_makes(ct):
    """The plan is an upper bound, tight: within one voxel per axis of the real grids."""
    from volseg.io import read_volume
    from volseg.preprocessing.card_steps import preprocess
    from volseg.preprocessing.planning import plan_preprocessing

    volume = read_volume(ct)
    chains = [
        [{"name": "Spacing", "args": {"pixdim": [0.7, 1.3, 2.1], "mode": "bilinear"}},
         {"name": "Orientation", "args": {"axcodes": "RAS"}}, SCALE],
        [{"name": "Orientation", "args": {"axcodes": "SPL"}}, {"name": "Resize", "args": {"spatial_size": [30, -1, 7]}}],
        [{"name": "Resize", "args": {"spatial_size": 40, "size_mode": "longest"}}, {"name": "DivisiblePad", "args": {"k": 16}}],
        [{"name": "SpatialPad", "args": {"spatial_size": [32, 8, 32]}}, {"name": "CenterSpatialCrop", "args": {"roi_size": [20, 20, 20]}},
         {"name": "SwapSpatialAxes", "args": {"axes": [0, 2]}}, {"name": "BorderPad", "args": {"spatial_border": 2}}],
        [{"name": "Zoom", "args": {"zoom": 1.5, "keep_size": False}}],
    ]
    for steps in chains:
        planned = plan_preprocessing(volume.spatial_shape, volume.ijk_to_ras, steps)[-1].shape_out
        actual = tuple(preprocess(volume.array[None], volume.ijk_to_ras, steps).image.shape[1:])
        assert all(0 <= p - a <= 1 for p, a in zip(planned, actual)), (steps, planned, actual)
