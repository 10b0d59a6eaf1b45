"""GPU checks (``-m cuda``; skipped without CUDA, run by ``bench/gpu_check.sh``).

Deformable convolution on CUDA vs CPU, AMP on vs off per architecture (tiny golden networks),
the out-of-memory fallback forced by a per-process memory cap, and device selection. The last
test (device selection without a GPU) runs everywhere.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from volseg import models
from volseg.inference.devices import resolve_device
from volseg.errors import ResourceError
from volseg.inference.sliding_window import InferenceOptions, predict, predict_with_fallback
from volseg.models.deform_conv import deform_conv3d
from volseg.inference.nnunet import ALL_FLIPS

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU here (bench/gpu_check.sh runs these on one)")

TINY = [  # golden file, input channels, activation
    ("uxnet_small", 1, "softmax"), ("repuxnet_small", 1, "softmax"), ("deformuxnet_egg_small", 1, "softmax"),
    ("segformer3d_small", 4, "sigmoid"), ("mednext_small", 1, "softmax"),
]


def _tiny(golden_dir, name):
    g = torch.load(golden_dir / f"{name}.pt", weights_only=True)
    return models.load(g["family"], g["state_dict"])


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("k,offset_scale", [(3, 0.0), (3, 1.5)])
def test_deform_conv_cuda_equals_cpu(k, offset_scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, 14, 10, generator=g)
    offset = torch.randn(2, 3 * k**3, 12, 14, 10, generator=g) * offset_scale
    weight, bias = torch.randn(8, 1, k, k, k, generator=g), torch.randn(8, generator=g)
    cpu = deform_conv3d(x, offset, weight, bias, padding=k // 2)
    gpu = deform_conv3d(x.cuda(), offset.cuda(), weight.cuda(), bias.cuda(), padding=k // 2).cpu()
    assert float((cpu - gpu).abs().max()) <= 1e-4


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name,in_channels,activation", TINY)
def test_amp_agrees_with_fp32_per_architecture(golden_dir, name, in_channels, activation):
    net = _tiny(golden_dir, name)
    image = torch.randn(in_channels, 48, 40, 56, generator=torch.Generator().manual_seed(5))
    mode = "nnunet" if name.startswith("mednext") else "constant"
    opts = InferenceOptions(roi_size=(32, 32, 32), sw_batch_size=2, activation=activation, mode=mode,
                            flips=ALL_FLIPS if mode == "nnunet" else ())
    cpu = predict(net, image, opts, torch.device("cpu"))
    fp32 = predict(net, image, replace(opts, amp=False), torch.device("cuda"))
    amp = predict(net, image, opts, torch.device("cuda"))
    assert float((fp32 - cpu).abs().max()) <= 1e-3  # TF32 convolutions may be on
    assert float((amp - fp32).abs().max()) <= 5e-2
    if activation == "softmax":
        agree = float((amp.argmax(0) == fp32.argmax(0)).float().mean())
    else:
        agree = float(((amp > 0.5) == (fp32 > 0.5)).float().mean())
    assert agree >= 0.99


_OOM_SCRIPT = textwrap.dedent("""
    import sys, torch
    from volseg.inference.sliding_window import InferenceOptions, predict_with_fallback
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(256 * 2**20 / total, 0)   # a 256 MiB GPU
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 64, 3, padding=1), torch.nn.Conv3d(64, 2, 1)).eval()
    image = torch.randn(1, 160, 160, 96)
    opts = InferenceOptions(roi_size=(96, 96, 96), sw_batch_size=8, activation="softmax", amp=False)
    out, what = predict_with_fallback(net, image, opts, torch.device("cuda"))
    ref, _ = predict_with_fallback(net, image, opts, torch.device("cpu"))
    print("WHAT", what)
    print("DIFF", float((out - ref).abs().max()))
""")


@pytest.mark.cuda
@needs_cuda
def test_oom_fallback_under_a_memory_cap():
    """A per-process cap (in a child process, so the cap does not leak) forces the fallback."""
    run = subprocess.run([sys.executable, "-c", _OOM_SCRIPT], capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    what = next(line[5:] for line in run.stdout.splitlines() if line.startswith("WHAT "))
    diff = float(next(line[5:] for line in run.stdout.splitlines() if line.startswith("DIFF ")))
    assert "out of GPU memory" in what
    assert diff <= 1e-4


@pytest.mark.cuda
@needs_cuda
def test_device_selection_with_cuda():
    dev, reason = resolve_device("auto")
    assert dev.type == "cuda" and "CUDA" in reason
    assert resolve_device("cuda")[0] == torch.device("cuda:0")
    with pytest.raises(ResourceError):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.cuda
def test_device_selection_without_cuda(monkeypatch):
    """Runs everywhere: with CUDA hidden, auto picks the CPU and says why, and cuda is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dev, reason = resolve_device("auto")
    assert dev.type in ("cpu", "mps") and "CUDA not available" in reason
    with pytest.raises(ResourceError, match="CUDA"):
        resolve_device("cuda")
    out, what = predict_with_fallback(torch.nn.Conv3d(1, 2, 1), torch.randn(1, 8, 8, 8),
                                      InferenceOptions(roi_size=(8, 8, 8)), torch.device("cpu"))
    assert out.shape == (2, 8, 8, 8) and what == "ran on cpu"
