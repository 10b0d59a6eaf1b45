"""Sliding-window inference: window counting, flips, per-window activation, OOM fallback, cancel."""

from __future__ import annotations

import threading

import pytest
import torch
from monai.inferers import sliding_window_inference

from volseg.errors import Cancelled, ResourceError
from volseg.inference.sliding_window import InferenceOptions, count_windows, predict, predict_with_fallback


class Recorder:
    def __init__(self):
        self.events = []

    def progress(self, done, total, stage="infer"):
        self.events.append((done, total))

    def log(self, message, level="info"):
        self.events.append((level, message))


class AsymmetricNet(torch.nn.Module):
    """Output depends on position (a ramp along I), so a wrongly undone flip would show."""

    def forward(self, x):
        ramp = torch.linspace(0, 1, x.shape[2]).view(1, 1, -1, 1, 1).expand_as(x[:, :1])
        return torch.cat([x[:, :1] + ramp, -x[:, :1]], dim=1)


@pytest.mark.parametrize("size,roi,overlap", [((40, 36, 24), (16, 16, 16), 0.25), ((10, 10, 10), (16, 16, 16), 0.5),
                                              ((64, 33, 17), (32, 16, 16), 0.5), ((20, 20, 20), (8, 8, 8), 0.0)])
def test_window_count_matches_monai(size, roi, overlap):
    calls = []

    def predictor(x):
        calls.append(x.shape[0])
        return x

    sliding_window_inference(torch.zeros(1, 1, *size), roi, 1, predictor, overlap=overlap)
    assert count_windows(size, roi, overlap) == sum(calls)


def test_progress_reaches_total_and_flips_are_undone():
    image = torch.randn(1, 20, 18, 12)
    rec = Recorder()
    opts = InferenceOptions(roi_size=(8, 8, 8), overlap=0.25, activation="none", flips=((0,), (1, 2)), sw_batch_size=3)
    out = predict(AsymmetricNet(), image, opts, torch.device("cpu"), rec)
    plain = predict(AsymmetricNet(), image, InferenceOptions(roi_size=(8, 8, 8), overlap=0.25, activation="none"),
                    torch.device("cpu"))
    assert out.shape == (2, 20, 18, 12)
    # The ramp restarts in each window, so flipped passes give other numbers -- but channel 1 (-x)
    # is position independent: averaging correctly undone flips must give exactly -x.
    torch.testing.assert_close(out[1], -image[0], atol=1e-5, rtol=0)
    assert not torch.allclose(out[0], plain[0])
    done, total = rec.events[-1]
    assert done == total == 3 * count_windows((20, 18, 12), (8, 8, 8), 0.25)


def test_softmax_after_blending_sums_to_one():
    out = predict(AsymmetricNet(), torch.randn(1, 12, 12, 12), InferenceOptions(roi_size=(8, 8, 8)), torch.device("cpu"))
    torch.testing.assert_close(out.sum(0), torch.ones(12, 12, 12))


def test_activation_per_window_differs_from_after_blending():
    image = torch.randn(1, 16, 16, 16) * 5
    per = predict(AsymmetricNet(), image, InferenceOptions(roi_size=(8, 8, 8), activation_per_window=True), torch.device("cpu"))
    torch.testing.assert_close(per.sum(0), torch.ones(16, 16, 16))


def test_deep_supervision_list_selects_an_output():
    class DS(torch.nn.Module):
        def forward(self, x):
            return [x.repeat(1, 2, 1, 1, 1), x[:, :, ::2, ::2, ::2]]

    out = predict(DS(), torch.randn(1, 8, 8, 8), InferenceOptions(roi_size=(8, 8, 8), activation="none"), torch.device("cpu"))
    assert out.shape == (2, 8, 8, 8)


def test_cancel_stops_between_windows():
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        predict(AsymmetricNet(), torch.randn(1, 16, 16, 16), InferenceOptions(roi_size=(8, 8, 8)), torch.device("cpu"),
                cancel=cancel)


def test_oom_fallback_steps_down_and_says_what_it_did():
    tried = []

    def fake_run(model, image, opts, device, reporter, cancel, stitch_device=None):
        tried.append((opts.sw_batch_size, device.type, None if stitch_device is None else stitch_device.type))
        if device.type == "cuda" and stitch_device is None:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return torch.zeros(1)

    rec = Recorder()
    opts = InferenceOptions(sw_batch_size=4)
    _, what = predict_with_fallback(None, None, opts, torch.device("cuda:0"), rec, run=fake_run)
    assert tried == [(4, "cuda", None), (2, "cuda", None), (1, "cuda", None), (1, "cuda", "cpu")]
    assert "stitched on the CPU" in what
    assert any(e[0] == "warning" and "stitched" in e[1] for e in rec.events)


def test_oom_everywhere_is_a_resource_error():
    def always_oom(*a, **k):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(ResourceError):
        predict_with_fallback(None, None, InferenceOptions(), torch.device("cpu"), run=always_oom)
