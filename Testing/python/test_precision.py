"""The GPU path's decisions, tested on the CPU: which precision runs (given a compute
capability), TF32 off for fp32 and restored after, the window batch sized from a given free
memory, ``--precision`` from the command line to the ``done`` event, and the CPU (fp32) path
unchanged: bit for bit MONAI's sliding window plus the activation."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import make_card
from monai.inferers import sliding_window_inference
from volseg.cards import load_card
from volseg.cli.main import main
from volseg.inference.gpu_settings import memory_format, resolve_window_batch, run_settings
from volseg.inference.precision import autocast_dtype, choose_precision, exact_fp32, requested_precision
from volseg.inference.sliding_window import InferenceOptions, add_flipped_, predict, predict_with_fallback, run_precision
from volseg.errors import InputError
from volseg.inference.window_batch import official_limit_bytes, stitch_bytes, wants_free_memory, window_batch_size
from volseg.memory import available_bytes
from volseg.inference.window_predictor import WindowPredictor
from volseg.pipeline import inference_options
from volseg.request import Overrides

GiB = 2**30


# -- which precision ---------------------------------------------------------------------------------
@pytest.mark.parametrize("capability", [(9, 0), (8, 0), (8, 9), (7, 5), (6, 1), None])
def test_auto_is_fp16_on_every_gpu(capability):
    """bf16 changed 0.1-0.5 % of the labels on an H200 where fp16 kept 99.9 %: auto never picks it."""
    precision, reason = choose_precision("auto", "cuda", capability)
    assert precision == "fp16" and "fp16" in reason


@pytest.mark.parametrize("requested", ["auto", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("device_type", ["cpu", "mps"])
def test_off_cuda_everything_runs_fp32_and_says_why(requested, device_type):
    precision, reason = choose_precision(requested, device_type)
    assert precision == "fp32"
    if requested in ("fp16", "bf16"):
        assert requested in reason and "CUDA" in reason


def test_explicit_choices_on_cuda():
    assert choose_precision("fp32", "cuda", (9, 0))[0] == "fp32"
    assert "TF32 off" in choose_precision("fp32", "cuda", (9, 0))[1]
    assert choose_precision("fp16", "cuda", (9, 0))[0] == "fp16"
    assert choose_precision("bf16", "cuda", (9, 0))[0] == "bf16"
    precision, reason = choose_precision("bf16", "cuda", (7, 0))  # a V100 has no native bfloat16
    assert precision == "fp16" and "bf16" in reason and "7.0" in reason
    with pytest.raises(ValueError, match="fp8"):
        choose_precision("fp8", "cuda", (9, 0))


def test_devices_say_what_auto_runs_there(monkeypatch):
    from volseg.inference.devices import list_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = list_devices()[-1].as_dict()
    assert cpu["id"] == "cpu" and cpu["auto_precision"] == "fp32"


def test_no_amp_means_fp32():
    assert requested_precision("auto", amp=False) == "fp32"
    assert requested_precision("bf16", amp=False) == "fp32"
    assert requested_precision("fp16", amp=True) == "fp16"
    assert run_precision(InferenceOptions(amp=False), torch.device("cpu"))[0] == "fp32"
    assert autocast_dtype("fp32") is None
    assert autocast_dtype("fp16") is torch.float16 and autocast_dtype("bf16") is torch.bfloat16


# -- fp32 that means fp32 ----------------------------------------------------------------------------
def _tf32_flags():
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def test_exact_fp32_turns_tf32_off_and_restores_the_process_settings():
    saved = _tf32_flags()
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
        with exact_fp32():
            assert _tf32_flags() == (False, False)
        assert _tf32_flags() == (True, True)
        with pytest.raises(KeyError), exact_fp32():  # restored after an error too
            raise KeyError("boom")
        assert _tf32_flags() == (True, True)
        with exact_fp32(enabled=False):
            assert _tf32_flags() == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_exact_fp32_with_the_new_fp32_precision_api():
    """A process that set ``fp32_precision`` (torch refuses legacy reads then) gets it set to ieee and back."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    if not hasattr(conv, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    saved = conv.fp32_precision, matmul.fp32_precision, _tf32_flags()
    try:
        conv.fp32_precision, matmul.fp32_precision = "tf32", "tf32"
        with exact_fp32():
            assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved[0], saved[1]
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[2]


def test_run_settings_touch_nothing_on_the_cpu_and_restore_cudnn_benchmark_on_cuda():
    saved = torch.backends.cudnn.benchmark, _tf32_flags()
    try:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
        with run_settings(torch.device("cpu"), "fp32", InferenceOptions()):
            assert torch.backends.cudnn.benchmark is False and _tf32_flags() == (True, True)
        # the flags are plain process settings: their logic runs without a GPU
        with run_settings(torch.device("cuda"), "fp32", InferenceOptions(cudnn_benchmark=True)):
            assert torch.backends.cudnn.benchmark is True and _tf32_flags() == (False, False)
        with run_settings(torch.device("cuda"), "bf16", InferenceOptions(cudnn_benchmark=True)):
            assert _tf32_flags() == (True, True)  # autocast runs: TF32 left as the process has it
        assert torch.backends.cudnn.benchmark is False and _tf32_flags() == (True, True)
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[1]


# -- the window batch from free memory ---------------------------------------------------------------
def test_batch_fills_half_the_free_memory_up_to_the_cap_and_evens_out():
    # 141 GiB free (an H200), 1 GiB a window, 18 windows (SegFormer3D at 240x240x160, ROI 128):
    # the cap of 16 allows 2 passes, evened to 9 + 9
    assert window_batch_size(141 * GiB, GiB, windows=18) == 9
    # 80 GiB, 0.5 GiB a window, 100 windows: 16 fit (cap); 7 passes of 15 (last 10) -> ceil(100 / 7) = 15
    assert window_batch_size(80 * GiB, GiB // 2, windows=100) == 15
    # a small GPU: 4 GiB free, 1 GiB a window -> half = 2 windows
    assert window_batch_size(4 * GiB, GiB, windows=18) == 2
    # the whole image in one pass when it fits
    assert window_batch_size(141 * GiB, GiB, windows=6) == 6


def test_batch_never_exceeds_what_fits_nor_goes_below_one():
    for free in (0, GiB // 10, GiB, 3 * GiB, 24 * GiB, 141 * GiB):
        for window in (GiB // 8, GiB, 5 * GiB):
            for windows in (1, 7, 18, 64, 1000):
                b = window_batch_size(free, window, windows)
                assert 1 <= b <= min(16, windows)
                assert b == 1 or b * window <= free * 0.5
                fit = max(1, min(16, windows, int(free * 0.5 // window)))
                passes = -(-windows // b)
                assert passes == -(-windows // fit)  # as few forward passes as what fits allows ...
                assert b == 1 or -(-windows // (b - 1)) > passes  # ... with the smallest batch that does it


def test_reserved_memory_comes_off_first():
    assert window_batch_size(10 * GiB, GiB, 32, reserved_bytes=0) == 5
    assert window_batch_size(10 * GiB, GiB, 32, reserved_bytes=4 * GiB) == 3
    assert window_batch_size(10 * GiB, GiB, 32, reserved_bytes=20 * GiB) == 1
    with pytest.raises(ValueError):
        window_batch_size(GiB, 0, 4)


def test_a_memory_limit_caps_the_batch_whatever_is_free():
    # the official recipe's peak: 4 windows of 1 GiB in fp32 = 4 GiB; under bf16 a window takes 0.5 GiB
    assert window_batch_size(141 * GiB, GiB // 2, windows=100, limit_bytes=4 * GiB) == 8
    assert window_batch_size(6 * GiB, GiB // 2, windows=100, limit_bytes=4 * GiB) == 6  # less is free
    assert window_batch_size(141 * GiB, GiB // 2, windows=18, limit_bytes=4 * GiB) == 6  # 3 passes of 6


def test_the_official_limit_uses_the_measured_fp32_window_not_half_of_it():
    # issue 16's H200 run: under fp16 a SegFormer3D window took ~0.7 of its fp32 one; "twice the card's
    # batch" then used 1.4x the official memory. With the fp32 window measured: 4 x 1 GiB = 4 GiB,
    # 0.7 GiB windows -> 5 fit (3.5 GiB), evened over 18 windows -> 4 passes of 5
    limit = official_limit_bytes(4, GiB)
    assert limit == 4 * GiB
    b = window_batch_size(141 * GiB, int(0.7 * GiB), windows=18, limit_bytes=limit)
    assert b == 5 and b * int(0.7 * GiB) <= limit
    # a window that halves under autocast gets twice the card's batch, and no more
    assert window_batch_size(141 * GiB, GiB // 2, windows=100, limit_bytes=official_limit_bytes(4, GiB)) == 8
    # MedNeXt's card runs one window (nnU-Net): the autocast batch stays 1 unless a window halves
    assert window_batch_size(141 * GiB, int(0.6 * GiB), windows=100, limit_bytes=official_limit_bytes(1, GiB)) == 1
    assert official_limit_bytes(0, GiB) == GiB  # a card batch of 0 counts as 1
    with pytest.raises(ValueError):
        official_limit_bytes(4, 0)


def test_the_free_memory_policy_is_an_explicit_opt_in():
    assert wants_free_memory({}) is False
    assert wants_free_memory({"VOLSEG_WINDOW_BATCH": "official"}) is False
    assert wants_free_memory({"VOLSEG_WINDOW_BATCH": " Free "}) is True
    with pytest.raises(InputError, match="VOLSEG_WINDOW_BATCH='max' is not a window batch policy"):
        wants_free_memory({"VOLSEG_WINDOW_BATCH": "max"})


def _fake_gpu(monkeypatch, windows_by_dtype, free=141 * GiB):
    """resolve_window_batch on the CPU: CUDA 'available', the window measurement and the free memory given."""
    import volseg.inference.gpu_settings as gs

    calls = []

    def measure(model, in_ch, roi, device, dtype, fmt):
        calls.append((dtype, fmt, torch.backends.cudnn.benchmark))
        return windows_by_dtype[dtype]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gs, "measure_window_bytes", measure)
    monkeypatch.setattr(gs, "gpu_available_bytes", lambda device: free)
    return calls


def test_autocast_batch_stays_within_the_official_fp32_footprint(monkeypatch):
    monkeypatch.delenv("VOLSEG_WINDOW_BATCH", raising=False)
    calls = _fake_gpu(monkeypatch, {torch.float16: int(0.7 * GiB), None: GiB})
    opts = InferenceOptions(roi_size=(8, 8, 8), sw_batch_size=4, sw_batch_auto=True, cudnn_benchmark=True)
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        out = resolve_window_batch(torch.nn.Conv3d(1, 2, 1), torch.zeros(1, 8, 8, 8), opts, torch.device("cuda"),
                                   "fp16", 18)
        assert torch.backends.cudnn.benchmark is True  # restored after the fp32 measurement
    finally:
        torch.backends.cudnn.benchmark = saved
    assert out.sw_batch_size == 5 and out.sw_batch_auto is False
    assert out.sw_batch_size * 0.7 * GiB <= 4 * GiB
    # the fp32 window is measured as the official recipe runs: no autocast, contiguous, no autotuning
    assert calls == [(torch.float16, torch.contiguous_format, True), (None, torch.contiguous_format, False)]
    # fp32: the measured window is the official one; the batch stays the card's
    calls.clear()
    out = resolve_window_batch(torch.nn.Conv3d(1, 2, 1), torch.zeros(1, 8, 8, 8), opts, torch.device("cuda"),
                               "fp32", 18)
    assert out.sw_batch_size == 4 and len(calls) == 1


def test_opting_in_to_the_free_memory_gives_a_larger_batch(monkeypatch):
    _fake_gpu(monkeypatch, {torch.float16: int(0.7 * GiB), None: GiB})
    opts = InferenceOptions(roi_size=(8, 8, 8), sw_batch_size=4, sw_batch_auto=True)
    monkeypatch.setenv("VOLSEG_WINDOW_BATCH", "free")
    out = resolve_window_batch(torch.nn.Conv3d(1, 2, 1), torch.zeros(1, 8, 8, 8), opts, torch.device("cuda"), "fp16", 18)
    assert out.sw_batch_size == 9  # 16 fit in half of 141 GiB (the cap); 2 passes of 9
    monkeypatch.setenv("VOLSEG_WINDOW_BATCH", "lots")
    with pytest.raises(InputError):
        resolve_window_batch(torch.nn.Conv3d(1, 2, 1), torch.zeros(1, 8, 8, 8), opts, torch.device("cuda"), "fp16", 18)


def test_stitch_bytes_counts_input_sums_weights_and_the_flip_mean():
    assert stitch_bytes((10, 10, 10), 1, 3) == 4 * 1000 * (1 + 3 + 1)
    assert stitch_bytes((10, 10, 10), 4, 3, passes=8) == 4 * 1000 * (4 + 3 + 1 + 3)


def test_available_memory_counts_cached_blocks_and_the_per_process_cap():
    # 100 GiB free on the device, 2 GiB cached by this process but not in use
    assert available_bytes(100 * GiB, 141 * GiB, allocated=GiB, reserved=3 * GiB) == 102 * GiB
    # a cap of 4 GiB (set_per_process_memory_fraction) with 1 GiB already allocated
    assert available_bytes(100 * GiB, 140 * GiB, GiB, 3 * GiB, fraction=4 / 140) == 3 * GiB
    assert available_bytes(100 * GiB, 140 * GiB, 5 * GiB, 5 * GiB, fraction=4 / 140) == 0
    assert available_bytes(10 * GiB, 140 * GiB, 0, 0, fraction=1.0) == 10 * GiB


def test_no_sizing_off_cuda_nor_for_batch_dependent_networks():
    opts = InferenceOptions(sw_batch_size=3, sw_batch_auto=True)
    net = torch.nn.Conv3d(1, 2, 1)
    assert resolve_window_batch(net, torch.zeros(1, 8, 8, 8), opts, torch.device("cpu"), "fp32", 4) is opts
    net.batch_dependent = True  # DeformUX-Net's repository-source offsets: its batch is part of the answer
    assert resolve_window_batch(net, torch.zeros(1, 8, 8, 8), opts, torch.device("cuda"), "bf16", 4) is opts


def test_a_network_failing_on_the_measured_window_leaves_the_error_to_the_window_loop(monkeypatch):
    """The window loop turns a network failure into a clear error; the sizing must not pre-empt it."""
    import volseg.inference.gpu_settings as gs

    def wrong_roi(*a, **k):
        raise RuntimeError("Sizes of tensors must match")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gs, "measure_window_bytes", wrong_roi)
    opts = InferenceOptions(sw_batch_size=3, sw_batch_auto=True)
    out = resolve_window_batch(torch.nn.Conv3d(1, 2, 1), torch.zeros(1, 8, 8, 8), opts, torch.device("cuda"), "bf16", 4)
    assert out.sw_batch_size == 3 and out.sw_batch_auto is False

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gs, "measure_window_bytes", oom)  # out of memory: the fallback's business
    with pytest.raises(torch.OutOfMemoryError):
        resolve_window_batch(torch.nn.Conv3d(1, 2, 1), torch.zeros(1, 8, 8, 8), opts, torch.device("cuda"), "bf16", 4)


# -- channels-last -----------------------------------------------------------------------------------
def test_channels_last_only_on_cuda_and_it_changes_no_result():
    opts = InferenceOptions(roi_size=(8, 8, 8), channels_last=True, activation="none")
    assert memory_format(opts, torch.device("cuda")) is torch.channels_last_3d
    assert memory_format(opts, torch.device("cpu")) is torch.contiguous_format
    assert memory_format(replace(opts, channels_last=False), torch.device("cuda")) is torch.contiguous_format
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1)).eval()
    x = torch.randn(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    net.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last_3d)))
    plain = WindowPredictor(net, opts, 2, None, None)(x)
    last = WindowPredictor(net, opts, 2, None, None, torch.channels_last_3d)(x)
    assert seen == [False, True]
    torch.testing.assert_close(last, plain, rtol=1e-5, atol=1e-6)


def test_weight_layout_follows_the_option_and_comes_back():
    from volseg.inference.gpu_settings import set_weight_layout

    net = torch.nn.Conv3d(2, 4, 3)
    set_weight_layout(net, torch.contiguous_format)  # never converted: untouched
    assert net.weight.is_contiguous()
    set_weight_layout(net, torch.channels_last_3d)
    assert net.weight.is_contiguous(memory_format=torch.channels_last_3d) and not net.weight.is_contiguous()
    set_weight_layout(net, torch.contiguous_format)
    assert net.weight.is_contiguous()
    set_weight_layout(None, torch.channels_last_3d)  # a CPU runtime's network: nothing to do


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_activation_in_place_slab_by_slab_equals_the_whole(activation):
    """The GPU path activates the blended volume in place (one volume less at the peak)."""
    from volseg.inference.window_predictor import activate, activate_

    x = torch.randn(1, 5, 13, 7, 6, generator=torch.Generator().manual_seed(3)) * 4
    whole = activate(x, activation)
    y = x.clone()
    assert activate_(y, activation, slab_voxels=50) is y  # slabs of one I-row (42 voxels) at a time
    torch.testing.assert_close(y, whole, rtol=0, atol=1e-6)


# -- the CPU path is what it was -----------------------------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x) * 3.0


@pytest.mark.parametrize("mode,flips", [("constant", ()), ("gaussian", ()), ("constant", ((0,), (1, 2))),
                                        ("gaussian", ((2,), (0, 1, 2), (0,)))])
def test_cpu_fp32_equals_monai_bit_for_bit(mode, flips):
    net = _Net().eval()
    image = torch.randn(1, 20, 18, 13, generator=torch.Generator().manual_seed(1))
    opts = InferenceOptions(roi_size=(8, 8, 8), overlap=0.25, mode=mode, sw_batch_size=3, flips=flips)
    with torch.inference_mode():
        passes = []
        for axes in [(), *flips]:
            dims = [a + 2 for a in axes]
            x = torch.flip(image[None], dims) if axes else image[None]
            y = sliding_window_inference(x, [8, 8, 8], 3, net, overlap=0.25, mode=mode)
            passes.append(torch.softmax(torch.flip(y, dims) if axes else y, 1))
        expected = (sum(passes[1:], passes[0]) / len(passes))[0]
    stats: dict = {}
    out = predict(net, image, opts, torch.device("cpu"), stats=stats)
    assert torch.equal(out, expected)
    assert out.device.type == "cpu" and not out.is_inference()
    assert stats["precision"] == "fp32" and stats["sw_batch_size"] == 3
    seconds = stats["seconds"]
    assert set(seconds) == {"to_device", "windows_and_blending", "network"}
    assert 0 < seconds["network"] <= seconds["windows_and_blending"]  # the network's share of the window loop


@pytest.mark.parametrize("axes", [(), (0,), (1,), (2,), (0, 2), (1, 2), (0, 1, 2)])
@pytest.mark.parametrize("slab_voxels", [1, 7 * 5, 2**20])  # one row of I per slab, a few, all at once
def test_flipped_passes_are_added_back_slab_by_slab_bit_for_bit(axes, slab_voxels):
    """The flip passes' sums without a flipped copy of the whole volume: the same sums."""
    y = torch.randn(2, 3, 11, 7, 5, generator=torch.Generator().manual_seed(3))
    acc = torch.randn(2, 3, 11, 7, 5, generator=torch.Generator().manual_seed(4))
    expected = acc + torch.flip(y, [a + 2 for a in axes])
    out = add_flipped_(acc, y, axes, slab_voxels=slab_voxels)
    assert out is acc and torch.equal(acc, expected)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_the_gpu_accumulation_of_flips_gives_the_cpu_answer(activation):
    """The GPU's in-place way (activation on the flipped pass, added back slab by slab), run on the
    CPU: the same probabilities as the CPU's flip-activate-add to float32 rounding."""
    from volseg.inference.sliding_window import _accumulate

    opts = InferenceOptions(activation=activation)
    passes = [((), torch.randn(1, 3, 9, 6, 5, generator=torch.Generator().manual_seed(s))) for s in range(4)]
    passes = [((), passes[0][1]), ((0,), passes[1][1]), ((1, 2), passes[2][1]), ((0, 1, 2), passes[3][1])]
    cpu = gpu = None
    for axes, y in passes:
        cpu = _accumulate(cpu, y.clone(), axes, opts, in_place=False)
        gpu = _accumulate(gpu, y.clone(), axes, opts, in_place=True)
    assert float((gpu - cpu).abs().max()) <= 1e-6
    if activation == "none":
        assert torch.equal(gpu, cpu)


class _HalfOut(torch.nn.Module):
    """A network whose windows come out in float16, as under autocast; ``to_float`` makes the copy itself."""

    def __init__(self, to_float: bool) -> None:
        super().__init__()
        self.conv, self.to_float = torch.nn.Conv3d(1, 3, 3, padding=1), to_float

    def forward(self, x):
        y = (self.conv(x) * 3.0).half()
        return y.float() if self.to_float else y


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("flips", [(), ((0,), (1, 2))])
def test_autocast_windows_blend_without_a_float32_copy_each_to_the_same_sums(mode, flips):
    """Constant blending takes a float16 window as it is (MONAI adds it into its float32 sums): the
    same result, bit for bit, as from a float32 copy of each window; Gaussian blending still copies."""
    half, copied = _HalfOut(False).eval(), _HalfOut(True).eval()
    copied.load_state_dict(half.state_dict())
    image = torch.randn(1, 20, 18, 13, generator=torch.Generator().manual_seed(5))
    opts = InferenceOptions(roi_size=(8, 8, 8), overlap=0.25, mode=mode, sw_batch_size=3, flips=flips,
                            activation="sigmoid")
    seen = []
    real_call = WindowPredictor.__call__

    def spy(self, patches):
        out = real_call(self, patches)
        seen.append(out.dtype)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WindowPredictor, "__call__", spy)
        out = predict(half, image, opts, torch.device("cpu"))
    assert torch.equal(out, predict(copied, image, opts, torch.device("cpu")))
    assert out.dtype == torch.float32
    assert set(seen) == ({torch.float16} if mode == "constant" else {torch.float32})


def test_output_device_and_stats_through_the_fallback():
    net = _Net().eval()
    image = torch.randn(1, 12, 12, 12)
    stats: dict = {}
    out, what = predict_with_fallback(net, image, InferenceOptions(roi_size=(8, 8, 8), amp=True),
                                      torch.device("cpu"), output_device=torch.device("cpu"), stats=stats)
    assert out.shape == (3, 12, 12, 12) and what == "ran on cpu"
    assert stats == {"precision": "fp32", "sw_batch_size": 1}

    def fake_run(model, image, opts, device, reporter, cancel, stitch_device=None, output_device=None):
        seen.append(output_device)
        return torch.zeros(1)

    seen: list = []
    predict_with_fallback(None, None, InferenceOptions(), torch.device("cpu"), run=fake_run,
                          output_device=torch.device("cpu"))
    assert seen == [torch.device("cpu")]


# -- --precision from the command line to the done event ------------------------------------------------
def test_overrides_map_onto_the_card_settings(tmp_path):
    card = load_card(make_card(tmp_path, "p", inference={"roi_size": [8, 8, 8], "precision": "fp16"}))
    assert card.inference.precision == "fp16"
    assert inference_options(card, Overrides()).precision == "fp16"
    assert inference_options(card, Overrides(precision="bf16")).precision == "bf16"
    o = inference_options(card, Overrides(amp=False))
    assert requested_precision(o.precision, o.amp) == "fp32"
    no_amp_card = load_card(make_card(tmp_path, "q", inference={"roi_size": [8, 8, 8], "amp": False}))
    o = inference_options(no_amp_card, Overrides())
    assert requested_precision(o.precision, o.amp) == "fp32"
    o = inference_options(no_amp_card, Overrides(precision="bf16"))  # an explicit choice wins over the card's amp
    assert requested_precision(o.precision, o.amp) == "bf16"
    assert inference_options(card, Overrides()).sw_batch_auto is True
    assert inference_options(card, Overrides(sw_batch_size=2)).sw_batch_auto is False


def test_card_with_an_unknown_precision_is_refused(tmp_path):
    from volseg.errors import ModelCardError

    with pytest.raises(ModelCardError, match="precision"):
        load_card(make_card(tmp_path, "bad", inference={"roi_size": [8, 8, 8], "precision": "fp8"}))


def test_precision_option_reaches_the_done_event(tmp_path, threshold_torchscript, capsys):
    import numpy as np
    import SimpleITK as sitk

    a = np.zeros((12, 10, 8), np.int16)
    a[2:6, 3:7, 2:5] = 1
    sitk.WriteImage(sitk.GetImageFromArray(a.transpose(2, 1, 0)), str(tmp_path / "in.nrrd"))
    card = make_card(tmp_path, "thr", inference={"roi_size": [8, 8, 8]})
    args = ["segment", str(tmp_path / "in.nrrd"), "--model", str(card), "--checkpoint", str(threshold_torchscript),
            "--progress", "json", "--device", "cpu"]
    assert main([*args, "-o", str(tmp_path / "a.nrrd"), "--precision", "bf16"]) == 0
    ev = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert ev[-1]["event"] == "done" and ev[-1]["precision"] == "fp32"  # the CPU runs fp32 whatever is asked
    assert any(e["event"] == "log" and "bf16 was asked for" in e["message"] for e in ev)
    with pytest.raises(SystemExit) as exc:
        main([*args, "-o", str(tmp_path / "b.nrrd"), "--precision", "fp8"])
    assert exc.value.code == 2
    assert "--precision" in capsys.readouterr().err


def test_gpu_available_bytes_passes_a_device_index(monkeypatch):
    """torch.cuda.get_per_process_memory_fraction refuses ``torch.device("cuda")`` (no index): on
    the H200 this failed 17 CUDA tests. Every CUDA memory query must get an index."""
    from volseg import memory

    def index_only(result):
        def query(device):
            if not isinstance(device, int):
                raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
            return result
        return query

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", index_only((6 << 30, 16 << 30)))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", index_only(0.5), raising=False)
    monkeypatch.setattr(torch.cuda, "memory_allocated", index_only(1 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", index_only(2 << 30))
    # free 6 GiB + cached 1 GiB, capped at half of 16 GiB minus the 1 GiB allocated
    assert memory.gpu_available_bytes(torch.device("cuda")) == 7 << 30
    assert memory.gpu_available_bytes(torch.device("cuda", 0)) == 7 << 30
