"""Each architecture end to end through `volseg inspect` and `volseg segment`.

The official golden vectors double as tiny checkpoints: their inputs are written as NIfTI files,
their state dicts in the official checkpoint formats, and the label map `volseg segment` writes
(one 32^3 window, no preprocessing, the configuration implied by the checkpoint alone) must equal
the label map of the official output.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from volseg.cli.main import main
from volseg.io import read_volume

GOLDEN = Path(__file__).resolve().parents[1] / "golden"

# golden file -> (architecture, how the official code saves it, expected words in the variant text)
CASES = {
    "uxnet_small": ("uxnet", "plain", "7"),
    "repuxnet_small": ("repuxnet", "plain", "13"),
    "deformuxnet_small": ("deformuxnet", "plain", "1x1x1"),
    "deformuxnet_egg_small": ("deformuxnet", "plain", "3x3x3"),
    "segformer3d_small": ("segformer3d", "accelerate", ""),
    "mednext_small": ("mednext", "nnunet", ""),
    "mednext_small_k5": ("mednext", "nnunet", ""),
}


def save_official(sd: dict, how: str, folder: Path) -> Path:
    if how == "plain":  # torch.save(model.state_dict(), "best_metric_model.pth")
        path = folder / "best_metric_model.pth"
        torch.save(sd, path)
    elif how == "accelerate":  # accelerator.save_state(dir): a folder with pytorch_model.bin
        path = folder / "checkpoint"
        path.mkdir()
        torch.save(sd, path / "pytorch_model.bin")
        torch.save({"state": {}}, path / "optimizer.bin")
    else:  # nnU-Net v1 .model
        path = folder / "model_final_checkpoint.model"
        torch.save({"epoch": 1000, "state_dict": sd, "optimizer_state_dict": {}, "plot_stuff": ([1.0], [0.5], [0.5], [0.1])}, path)
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_checkpoint_segments_like_the_official_code(name, tmp_path, capsys):
    arch, how, variant_word = CASES[name]
    g = torch.load(GOLDEN / f"{name}.pt", weights_only=True)
    ckpt = save_official(g["state_dict"], how, tmp_path)

    assert main(["inspect", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [m["architecture"] for m in info["matches"]] == [arch]
    assert variant_word in info["matches"][0]["variant"]
    sigmoid = arch == "segformer3d"
    assert ("num_heads" in info["matches"][0]["not_in_weights"]) == sigmoid

    x = g["input"][0]  # (C, 32, 32, 32); DeformUX-Net files hold batch 2: take sample 0 alone
    reference = g.get("output_per_sample_batch1", g["output"])
    reference = reference[0][0] if isinstance(reference, list) else reference[0]
    inputs = []
    for c in range(x.shape[0]):
        path = tmp_path / f"in{c}.nii.gz"
        nib.save(nib.Nifti1Image(x[c].numpy(), np.eye(4)), str(path))
        inputs.append(str(path))
    out = tmp_path / "labels.nii.gz"
    n_labels = reference.shape[0] if sigmoid else reference.shape[0] - 1
    # what the weights cannot show (SegFormer3D's heads and activation) is given, as `inspect` asks
    told = ["--activation", "sigmoid", "--arch-config", json.dumps({"num_heads": g["config"]["num_heads"]})] if sigmoid else []
    rc = main(["segment", *inputs, "--arch", arch, "--num-labels", str(n_labels), "--checkpoint", str(ckpt),
               "-o", str(out), "--roi-size", "32", "32", "32", "--progress", "none", "--device", "cpu", *told])
    assert rc == 0, capsys.readouterr().err
    got = read_volume(out).array
    if sigmoid:  # labels painted in order: later channels on top
        want = np.zeros(reference.shape[1:], np.uint16)
        for ch in range(reference.shape[0]):
            want[(reference[ch] > 0).numpy()] = ch + 1
    else:
        want = reference.argmax(0).numpy()
    assert got.shape == want.shape
    assert (got == want).mean() > 0.999  # ties at argmax boundaries are the only tolerated difference


MONAI_CASES = {
    "unet": dict(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1),
    "segresnet": dict(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8, blocks_down=(1, 2, 2), blocks_up=(1, 1)),
    "swinunetr": dict(in_channels=1, out_channels=3, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
    "unetr": dict(in_channels=1, out_channels=3, img_size=(32, 32, 32), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=2),
    "dynunet": dict(spatial_dims=3, in_channels=1, out_channels=3, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                    upsample_kernel_size=[2, 2]),
}


@pytest.mark.parametrize("arch", sorted(MONAI_CASES))
def test_monai_networks_segment(arch, tmp_path, capsys):
    from volseg import models

    cfg = MONAI_CASES[arch]
    torch.manual_seed(0)
    net = models.create(arch, **cfg).eval()
    ckpt = tmp_path / "model.pt"
    torch.save({"state_dict": net.state_dict()}, ckpt)
    # SwinUNETR's bottleneck is 1/32 of the window and its norm needs 2 voxels there: 64 along one axis
    shape = (64, 32, 32) if arch == "swinunetr" else (32, 32, 32)
    x = torch.randn(1, *shape)
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(x[0].numpy(), np.eye(4)), str(src))
    out = tmp_path / "o.nrrd"
    args = ["segment", str(src), "--arch", arch, "--num-labels", "2", "--checkpoint", str(ckpt), "-o", str(out),
            "--roi-size", *map(str, shape), "--progress", "none"]
    if arch not in ("unet", "segresnet"):  # shapes do not reveal these configurations
        args += ["--arch-config", json.dumps(cfg)]
    assert main(args) == 0, capsys.readouterr().err
    with torch.no_grad():
        want = net(x[None])[0].argmax(0).numpy()
    got = read_volume(out).array
    assert (got == want).mean() > 0.999


def test_batch_dependent_deformuxnet_runs_windows_one_at_a_time(tmp_path, capsys):
    """The repository-source DeformUX-Net mixes samples of a batch; the engine must not let the
    sliding-window batch size change the result."""
    g = torch.load(GOLDEN / "deformuxnet_small.pt", weights_only=True)
    ckpt = save_official(g["state_dict"], "plain", tmp_path)
    x = torch.randn(48, 32, 32, generator=torch.Generator().manual_seed(0))
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(x.numpy(), np.eye(4)), str(src))
    outs = []
    for sw in ("1", "4"):
        out = tmp_path / f"o{sw}.nii.gz"
        assert main(["segment", str(src), "--arch", "deformuxnet", "--num-labels", "2", "--checkpoint", str(ckpt),
                     "-o", str(out), "--roi-size", "32", "32", "32", "--overlap", "0.5", "--sw-batch-size", sw,
                     "--progress", "none"]) == 0
        outs.append(read_volume(out).array)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert "one at a time" in capsys.readouterr().err
