"""nnU-Net v1 sliding-window inference (``mode="nnunet"``): the official ``predict_3D`` golden,
window positions, the Gaussian, padding, mirroring order, batching and the pipeline's use of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from volseg import models
from volseg.inference.sliding_window import InferenceOptions, count_windows, predict
from volseg.inference.nnunet import (
    ALL_FLIPS,
    _nnunet_order,
    nnunet_gaussian,
    nnunet_steps,
)


@pytest.fixture(scope="module")
def golden(shared_golden_dir):
    g = torch.load(shared_golden_dir / "mednext_nnunet_predict.pt", weights_only=True)
    net = models.create("mednext", **g["config"])
    net.load_state_dict(g["state_dict"], strict=True)
    net.eval()
    net.do_ds = False
    return g, net


def _options(g, mirroring: bool, **kw) -> InferenceOptions:
    return InferenceOptions(roi_size=tuple(g["patch_size"]), overlap=1.0 - g["step_size"], mode="nnunet",
                            flips=ALL_FLIPS if mirroring else (), activation="softmax", **kw)


@pytest.mark.parametrize("case", range(4))
def test_official_predict_3d_golden(golden, case):
    """Probabilities of nnU-Net's predict_3D (MedNeXt @0b78ed8), with and without mirroring, padding on one input."""
    g, net = golden
    c = g["cases"][case]
    probs = predict(net, c["input"], _options(g, c["do_mirroring"]), torch.device("cpu"))
    assert probs.shape == c["probabilities"].shape
    assert float((probs - c["probabilities"]).abs().max()) <= 1e-5
    assert torch.equal(probs.argmax(0), c["argmax"])


def test_golden_differs_from_monai_blending(golden):
    """The golden is not reachable with MONAI's sliding window (the reason this mode exists)."""
    g, net = golden
    c = g["cases"][0]

    def softmax_net(x):
        return torch.softmax(net(x), 1)

    with torch.no_grad():
        monai = sliding_window_inference(c["input"][None], g["patch_size"], 1, softmax_net, overlap=0.5,
                                         mode="gaussian")[0]
    assert float((monai - c["probabilities"]).abs().max()) > 0.1


def test_window_batch_gives_the_same_answer(golden):
    g, net = golden
    c = g["cases"][2]  # the padded input
    one = predict(net, c["input"], _options(g, False), torch.device("cpu"))
    four = predict(net, c["input"], _options(g, False, sw_batch_size=4), torch.device("cpu"))
    assert float((one - four).abs().max()) <= 1e-6


@pytest.mark.parametrize("size,patch,expected", [(28, 16, [0, 6, 12]), (57, 32, [0, 12, 25]), (30, 16, [0, 7, 14]),
                                                 (53, 32, [0, 10, 21]), (83, 48, [0, 18, 35]), (16, 16, [0]),
                                                 (40, 32, [0, 8])])
def test_steps_follow_nnunet_rule(size, patch, expected):
    """REFERENCE.md section 9 examples: evenly spread, round half to even (12.5 -> 12, 17.5 -> 18)."""
    assert nnunet_steps((size,) * 3, (patch,) * 3, 0.5)[0] == expected


def test_steps_reject_small_images():
    with pytest.raises(ValueError):
        nnunet_steps((10, 40, 40), (16, 16, 16), 0.5)


def test_gaussian_peak_centre_and_floor():
    w = nnunet_gaussian((16, 32, 32))
    assert w.dtype == torch.float32 and float(w.max()) == 1.0
    assert float(w[8, 16, 16]) == 1.0  # peak at k // 2, not (k - 1) / 2
    assert float(w[15, 16, 16]) > float(w[0, 16, 16])  # not symmetric about the geometric centre (7.5)
    assert float(w.min()) == pytest.approx(float(np.exp(-8.0) ** 3), rel=1e-3)  # corner, no 1e-3 clamp
    narrow = nnunet_gaussian((16, 16, 16), sigma_scale=1 / 32)  # radius 2: zeros replaced by the minimum
    assert float(narrow.min()) > 0 and int((narrow == narrow.min()).sum()) > 1000


def test_mirroring_order_is_nnunet():
    assert _nnunet_order(list(reversed(ALL_FLIPS))) == [(), (2,), (1,), (1, 2), (0,), (0, 2), (0, 1), (0, 1, 2)]
    assert _nnunet_order([(0,), (0,)]) == [(), (0,)]


def test_padding_is_cropped_and_single_window_has_unit_weight():
    """An image smaller than the window: one window, weight 1, the zero padding cropped off."""

    class Ramp(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x, -x], 1)

    image = torch.randn(1, 5, 16, 7)
    out = predict(Ramp(), image, InferenceOptions(roi_size=(8, 16, 8), mode="nnunet", activation="none"),
                  torch.device("cpu"))
    torch.testing.assert_close(out, torch.cat([image, -image]), rtol=0, atol=0)


def test_count_windows_uses_nnunet_tiling():
    assert count_windows((28, 40, 57), (16, 32, 32), 0.5, mode="nnunet") == 3 * 2 * 3
    assert count_windows((11, 40, 57), (16, 32, 32), 0.5, mode="nnunet") == 1 * 2 * 3
    assert count_windows((100, 16, 16), (16, 16, 16), 0.5, mode="nnunet") == 12  # ceil(84 / 8) + 1


def test_progress_counts_every_window_and_flip(golden):
    g, net = golden
    events = []

    class Rec:
        def progress(self, done, total, stage="infer"):
            events.append((done, total))

        def log(self, *a, **k):
            pass

    c = g["cases"][2]
    predict(net, c["input"], _options(g, True), torch.device("cpu"), Rec())
    assert events[-1] == (6 * 8, 6 * 8)


def test_nnunet_card_segments_like_official_predict_3d(golden, tmp_path, capsys):
    """The command line with a card selecting ``mode: nnunet`` gives the official argmax."""
    import nibabel as nib
    from conftest import make_card
    from volseg.cli.main import main
    from volseg.io import read_volume

    g, _ = golden
    c = g["cases"][3]  # 11 x 40 x 57 (padded to the window) with mirroring: 6 windows x 8 flips
    ckpt = tmp_path / "model_final_checkpoint.model"
    torch.save({"epoch": 1, "state_dict": g["state_dict"]}, ckpt)
    image = tmp_path / "case_0000.nii.gz"
    nib.save(nib.Nifti1Image(c["input"][0].numpy(), np.eye(4)), str(image))
    card = make_card(tmp_path, "mednext-golden", architecture={"name": "mednext", "config": g["config"]},
                     labels=[{"value": 1, "name": "one"}, {"value": 2, "name": "two"}],
                     inference={"mode": "nnunet", "roi_size": g["patch_size"], "overlap": 0.5,
                                "flips": [list(f) for f in ALL_FLIPS]})
    out = tmp_path / "labels.nii.gz"
    rc = main(["segment", str(image), "--model", str(card), "--checkpoint", str(ckpt), "-o", str(out),
               "--progress", "none", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert np.array_equal(read_volume(out).array, c["argmax"].numpy())
