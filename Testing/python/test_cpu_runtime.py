"""CPU runtimes (ONNX Runtime / OpenVINO): export cache, the check against PyTorch, exact fallback."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from volseg.inference import cpu_runtime
from volseg.inference.cpu_runtime import RuntimeNet, compile_for_cpu, select_runtime
from volseg.inference.sliding_window import InferenceOptions, predict


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv3d(1, 4, 3, padding=1)
        self.norm = nn.InstanceNorm3d(4)
        self.b = nn.Conv3d(4, 3, 1)

    def forward(self, x):
        return [self.b(torch.nn.functional.gelu(self.norm(self.a(x)))), x]  # a list, as deep supervision


SHAPE = (2, 1, 16, 16, 16)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if os.environ.get("CI") or os.environ.get("VOLSEG_REQUIRE_ONNX"):  # .ci/run installs the onnx extra
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    else:  # elsewhere the optional runtime may be absent: skipped, visibly
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    folder = tmp_path_factory.mktemp("runtime-cache")
    model = Small().eval()
    net, err = compile_for_cpu(model, "onnxruntime", SHAPE, folder)
    return model, net, err, folder


def test_export_is_checked_and_cached(compiled, monkeypatch):
    model, net, err, folder = compiled
    assert isinstance(net, RuntimeNet) and err <= cpu_runtime.TOLERANCE
    assert len(list(folder.glob("*.onnx"))) == 1 and len(list(folder.glob("*.onnxruntime.json"))) == 1
    monkeypatch.setattr(cpu_runtime, "export_onnx", lambda *a: pytest.fail("exported again"))
    monkeypatch.setattr(cpu_runtime, "_check", lambda *a: pytest.fail("checked again"))
    _, err2 = compile_for_cpu(model, "onnxruntime", SHAPE, folder)  # same weights: from the cache
    assert err2 == err
    changed = Small().eval()
    with torch.no_grad():
        changed.b.bias += 1
    assert cpu_runtime._fingerprint(changed, SHAPE) != cpu_runtime._fingerprint(model, SHAPE)


def test_runtime_net_runs_any_batch_window_by_window(compiled):
    model, net, _, _ = compiled
    assert net.shape == (1, 1, 16, 16, 16)  # one export for every window batch size
    for n in (1, 3):
        x = torch.randn(n, 1, 16, 16, 16)
        with torch.no_grad():
            ref = model(x)[0]
        torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="compiled for"):
        net(torch.randn(1, 1, 16, 16, 8))


def test_sliding_window_through_the_runtime_matches_torch(compiled):
    model, net, _, _ = compiled
    image = torch.randn(1, 40, 24, 16)
    opts = InferenceOptions(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.5)
    ours = predict(net, image, opts, torch.device("cpu"))
    ref = predict(model, image, opts, torch.device("cpu"))
    assert float((ours - ref).abs().max()) <= 1e-5


def test_check_above_tolerance_falls_back_to_torch(compiled):
    model, _, _, folder = compiled
    net, reason = select_runtime(model, "mednext", SHAPE, torch.device("cpu"), runtime="onnxruntime",
                                 folder=folder, tolerance=0.0)
    assert net is model and reason.startswith("PyTorch (onnxruntime: differs from PyTorch")


def test_forced_runtime_is_used_and_says_so(compiled, monkeypatch):
    model, _, _, folder = compiled
    net, reason = select_runtime(model, "mednext", SHAPE, torch.device("cpu"), runtime="onnxruntime", folder=folder)
    assert isinstance(net, RuntimeNet) and reason.startswith("onnxruntime (checked against PyTorch")
    monkeypatch.setattr(cpu_runtime, "compile_for_cpu", lambda *a: pytest.fail("compiled again"))
    again = select_runtime(model, "mednext", SHAPE, torch.device("cpu"), runtime="onnxruntime", folder=folder)
    assert again == (net, reason)  # the same model object: the loaded network is reused


def test_missing_runtime_and_failed_export_fall_back(tmp_path, monkeypatch):
    def not_installed(*a):
        raise ImportError("no openvino")

    def broken_export(*a):
        raise RuntimeError("cannot export this op")

    monkeypatch.setitem(cpu_runtime._LOADERS, "openvino", not_installed)
    monkeypatch.setattr(cpu_runtime, "export_onnx", broken_export)
    model = Small().eval()
    net, reason = select_runtime(model, "uxnet", SHAPE, torch.device("cpu"), windows=10**6, folder=tmp_path)
    assert net is model
    assert reason == "PyTorch (openvino: cannot export this op; onnxruntime: cannot export this op)"


def test_auto_keeps_small_jobs_gpus_and_unknown_architectures_in_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_runtime, "export_onnx", lambda *a: pytest.fail("should not export"))
    model = Small().eval()
    cpu = torch.device("cpu")
    assert select_runtime(model, "mednext", SHAPE, cpu, windows=3, folder=tmp_path)[1].endswith("pay for a conversion)")
    assert select_runtime(model, "deformuxnet", SHAPE, cpu, windows=10**6, folder=tmp_path)[0] is model
    assert select_runtime(model, "mednext", SHAPE, torch.device("cuda"), windows=10**6)[0] is model
    assert select_runtime(model, "mednext", SHAPE, cpu, runtime="torch")[0] is model
    with pytest.raises(ValueError, match="unknown runtime"):
        select_runtime(model, "mednext", SHAPE, cpu, runtime="tensorrt")


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VOLSEG_CACHE_DIR", str(tmp_path))
    assert cpu_runtime.cache_dir() == tmp_path / "runtime"


def test_pipeline_chooses_the_network_and_logs_why(monkeypatch):
    from dataclasses import replace

    from volseg import cards, pipeline

    card = cards.card_from_arguments("mednext", 2)
    options = replace(card.inference, roi_size=(16, 16, 16), sw_batch_size=3, runtime="openvino")
    seen, logs = [], []

    class Rep:
        def log(self, message, level="info"):
            logs.append(message)

    def fake(model, arch, shape, device, windows, runtime, select=0, log=None):
        seen.append((arch, shape, windows, runtime, select))
        return "compiled", "openvino (checked)"

    monkeypatch.setattr(cpu_runtime, "select_runtime", fake)
    monkeypatch.delenv("VOLSEG_RUNTIME", raising=False)
    model = Small()
    assert pipeline.choose_network(model, card, options, torch.device("cpu"), 40, Rep()) == "compiled"
    assert seen == [("mednext", (3, 1, 16, 16, 16), 40, "openvino", 0)] and logs == ["CPU runtime: openvino (checked)"]
    monkeypatch.setenv("VOLSEG_RUNTIME", "torch")  # the environment overrides the card
    assert pipeline.choose_network(model, card, options, torch.device("cpu"), 40, Rep()) is model
    monkeypatch.delenv("VOLSEG_RUNTIME")
    assert pipeline.choose_network(model, card, options, torch.device("cuda"), 40, Rep()) is model
    assert len(seen) == 1


def test_export_warnings_become_warning_events_and_the_export_is_its_own_stage(tmp_path, monkeypatch, capfd):
    """torch's exporter logs W1204 lines on stderr (e.g. "torchvision is not installed"): they come
    back as warning events, nothing is printed, and the conversion is timed as the stage ``convert``."""
    import io
    import json
    import logging
    from dataclasses import replace

    from volseg import cards, pipeline
    from volseg.progress import JsonReporter

    def export_that_logs(model, shape, path, select=0):
        logging.getLogger("torch.onnx._internal.exporter._registration").warning(
            "torchvision is not installed. Skipping torchvision::nms")
        raise RuntimeError("cannot export this op")

    monkeypatch.setattr(cpu_runtime, "export_onnx", export_that_logs)
    monkeypatch.setenv("VOLSEG_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("VOLSEG_RUNTIME", raising=False)
    card = cards.card_from_arguments("mednext", 2)
    options = replace(card.inference, roi_size=(16, 16, 16), runtime="onnxruntime")
    reporter = JsonReporter(io.StringIO())

    def stage(name, message):
        reporter.stage(name, message)

    model = Small().eval()
    assert pipeline.choose_network(model, card, options, torch.device("cpu"), 4, reporter, begin_stage=stage) is model
    events = [json.loads(line) for line in reporter.stream.getvalue().splitlines()]
    assert events[0]["event"] == "stage" and events[0]["stage"] == "convert"
    assert {"event": "log", "level": "warning",
            "message": "ONNX export: torchvision is not installed. Skipping torchvision::nms"} in events
    assert events[-1]["message"].startswith("CPU runtime: PyTorch (onnxruntime: cannot export this op")
    assert "torchvision" not in capfd.readouterr().err
    reporter.log("after")  # the torch loggers are as they were
    assert logging.getLogger("torch").handlers == [] or all(
        not isinstance(h, cpu_runtime._Forward) for h in logging.getLogger("torch").handlers)
    reporter.done({})
    assert "convert" in json.loads(reporter.stream.getvalue().splitlines()[-1])["timings"]
