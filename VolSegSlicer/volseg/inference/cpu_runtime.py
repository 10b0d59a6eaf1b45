"""Run the network's windows in a CPU inference runtime (ONNX Runtime, OpenVINO), checked against PyTorch.

On the CPU, eager PyTorch leaves much of the machine unused for these 3D networks (measured on
2 cores against the official recipes, ``bench/bench_official.py``: MedNeXt-B 5.1x and
SegFormer3D 6.1x faster in OpenVINO at 64^3, 3D UX-Net 2.4x at its 96^3 window but 1.13x at 64^3).
This module exports the network once per checkpoint, window shape and batch to ONNX
(``torch.onnx.export(dynamo=True)``, opset 18), caches the file by a hash of the weights and the
settings, loads it into a runtime and **checks it** on one window against PyTorch before using
it. Any failure -- the runtime not installed (they are optional extras: ``pip install
volseg[onnx]`` / ``volseg[openvino]``), the export, or a check above the tolerance -- falls
back to PyTorch, which is always exact, and the reason is returned to be shown.

Choice (``runtime="auto"``): on the CPU only, for the architectures in :data:`PREFERRED`, in that
order, and only when the job is large enough to pay for the export (:data:`MIN_VOXELS` of
windows). ``runtime="onnxruntime"``/``"openvino"`` forces one (still checked); ``"torch"``
never converts.

Example::

    >>> net, reason = select_runtime(model, "mednext", (1, 1, 128, 128, 128), torch.device("cpu"), windows=64)
    >>> print(reason)   # e.g. "onnxruntime: checked on one window, max abs diff 1.2e-06"
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from volseg.inference.telemetry import telemetry_allowed, telemetry_off

__all__ = ["MIN_VOXELS", "PREFERRED", "RuntimeNet", "cache_dir", "library_logs", "runtime_candidates", "select_runtime"]

#: Runtimes tried per architecture, best first. OpenVINO first: it was the faster of the two in
#: 5 of the 6 CPU measurements (the issue's probe: MedNeXt-S 64^3 ONNX Runtime 2.63x vs OpenVINO
#: 2.54x, UX-Net 64^3 1.12x vs 1.60x, 96^3 1.38x vs 1.87x; bench_official.py on 2 shared cores,
#: against the official recipe: MedNeXt-B 2.3x vs 5.1x, SegFormer3D 2.6x vs 6.1x, UX-Net 0.84x
#: vs 1.13x). RepUX-Net is left out on purpose: its exact
#: centre-only fast path (a data-dependent branch) does not export, and it beats a runtime running
#: the full 21^3 kernels. DeformUX-Net's gather-based deformable convolution is not tried either.
PREFERRED: dict[str, tuple[str, ...]] = {
    "mednext": ("openvino", "onnxruntime"),
    "uxnet": ("openvino", "onnxruntime"),
    "segformer3d": ("openvino", "onnxruntime"),
    "segresnet": ("openvino", "onnxruntime"),
}
#: A job smaller than this many window voxels (windows x passes x window size) stays in PyTorch:
#: the export (about 10 s) would cost more than it saves.
MIN_VOXELS = 16 * 64**3
#: Largest accepted difference, relative to the largest output magnitude, on the check window.
TOLERANCE = 1e-4
CACHE_ENV = "VOLSEG_CACHE_DIR"


def cache_dir() -> Path:
    """``$VOLSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/volseg`` or ``~/.cache/volseg``; ``runtime/`` below it."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "volseg")
    return Path(root) / "runtime"


def _fingerprint(model: nn.Module, shape: Sequence[int], select: int = 0) -> str:
    """Hash of every parameter and buffer, the module's class, the input shape and the output used."""
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}|{tuple(shape)}|{select}|{torch.__version__}".encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


class _SelectOutput(nn.Module):
    """The network with a list output (deep supervision) reduced to element ``index``."""

    def __init__(self, net: nn.Module, index: int = 0) -> None:
        super().__init__()
        self.net, self.index = net, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y[self.index] if isinstance(y, list | tuple) else y


def export_onnx(model: nn.Module, shape: Sequence[int], path: Path, select: int = 0) -> Path:
    """Export ``model`` (output ``select`` of a list) for a fixed input ``shape`` (B, C, X, Y, Z) to
    ``path`` (written atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.onnx")
    example = torch.zeros(tuple(shape))
    with torch.no_grad():
        torch.onnx.export(_SelectOutput(model, select).eval(), (example,), str(tmp), dynamo=True, opset_version=18,
                          input_names=["x"], output_names=["y"], external_data=False, verbose=False)
    os.replace(tmp, path)
    return path


class RuntimeNet(nn.Module):
    """A compiled network for one window shape (batch 1); called like the PyTorch module it replaces.

    A batch of windows runs window by window: nothing is padded or recompiled when the last
    batch of a sliding window is smaller, and one export serves every window batch size.
    """

    def __init__(self, run, shape: Sequence[int], name: str) -> None:
        super().__init__()
        self._run, self.shape, self.runtime = run, tuple(shape), name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape[1:]:
            raise RuntimeError(f"{self.runtime} network was compiled for windows of {list(self.shape[1:])}, "
                               f"got {list(x.shape[1:])}")
        arr = x.detach().float().cpu().numpy()
        outs = [np.array(self._run(np.ascontiguousarray(arr[i:i + 1]))) for i in range(arr.shape[0])]
        return torch.from_numpy(np.concatenate(outs))


def _onnxruntime(path: Path, threads: int):
    import onnxruntime as ort

    if not telemetry_allowed():
        ort.disable_telemetry_events()  # the platform's event telemetry (Windows), besides the device id
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda arr: session.run(None, {"x": arr})[0]


def _openvino(path: Path, threads: int):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                     "INFERENCE_PRECISION_HINT": "f32",
                                                     "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda arr: np.array(request.infer({0: arr})[compiled.output(0)])


_LOADERS = {"onnxruntime": _onnxruntime, "openvino": _openvino}
#: The last compiled network (one at a time, like the pipeline's model cache): a second request
#: with the same model object reuses it instead of hashing the weights and compiling again.
_LOADED: dict = {}


def _check(model: nn.Module, net: RuntimeNet, shape: Sequence[int], select: int = 0) -> float:
    """Largest difference from PyTorch on one deterministic window, relative to the output's scale."""
    x = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = _SelectOutput(model, select)(x).float()
        got = net(x)
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def compile_for_cpu(model: nn.Module, runtime: str, shape: Sequence[int], folder: Path | None = None,
                    tolerance: float = TOLERANCE, select: int = 0) -> tuple[RuntimeNet, float]:
    """Export (or reuse the cached export), load into ``runtime`` and check; returns the net and its error.

    ``shape`` is a window batch (B, C, X, Y, Z); the export is made for one window (B = 1).

    Raises:
        ImportError: the runtime is not installed.
        ValueError: the check exceeded ``tolerance``.
        Exception: whatever the export or the runtime raised.
    """
    loader = _LOADERS[runtime]
    telemetry_off()  # before the export or a runtime imports onnxruntime / openvino
    shape = (1, *tuple(shape)[1:])  # exported for one window; RuntimeNet runs a batch window by window
    folder = folder or cache_dir()
    key = _fingerprint(model, shape, select)
    onnx_path = folder / f"{key}.onnx"
    record_path = folder / f"{key}.{runtime}.json"
    if not onnx_path.exists():
        export_onnx(model, shape, onnx_path, select)
    net = RuntimeNet(loader(onnx_path, torch.get_num_threads()), shape, runtime)
    if record_path.exists():
        err = float(json.loads(record_path.read_text())["relative_error"])
    else:
        err = _check(model, net, shape, select)
        record_path.write_text(json.dumps({"relative_error": err, "shape": list(shape)}))
    if not err <= tolerance:
        raise ValueError(f"differs from PyTorch by {err:.1e} (relative) on the check window, above {tolerance:g}")
    return net, err


class _Forward(logging.Handler):
    """Passes a library's log records on to ``log(message, level)`` instead of printing them."""

    def __init__(self, log: Callable[[str, str], None] | None, source: str) -> None:
        super().__init__(logging.WARNING)
        self.log, self.source = log, source

    def emit(self, record: logging.LogRecord) -> None:
        if self.log is not None:
            text = " ".join(record.getMessage().split())[:500]
            self.log(f"{self.source}: {text}", "warning" if record.levelno >= logging.WARNING else "info")


#: Loggers of the export and the runtimes that print on stderr (torch's in glog format, "W1204 ...").
_LIBRARY_LOGGERS = ("torch", "onnxscript", "onnx_ir", "onnxruntime", "openvino")


@contextlib.contextmanager
def library_logs(log: Callable[[str, str], None] | None, source: str = "ONNX export") -> Iterator[None]:
    """While exporting and loading, the warnings torch's exporter and the runtimes log (torch's
    ``W1204 ... torchvision is not installed`` lines) go to ``log(message, "warning")`` -- warning
    events, as other library messages are -- instead of stderr; ``log=None`` drops them."""
    names = [n for n in logging.Logger.manager.loggerDict
             if n.split(".")[0] in _LIBRARY_LOGGERS and isinstance(logging.getLogger(n), logging.Logger)]
    names = sorted(set(names) | set(_LIBRARY_LOGGERS))
    handler = _Forward(log, source)
    saved = {}
    for name in names:
        logger = logging.getLogger(name)
        if logger.handlers or name in _LIBRARY_LOGGERS:  # the ones that print; children propagate to them
            saved[name] = (logger.handlers[:], logger.propagate)
            logger.handlers, logger.propagate = [handler], False
    try:
        yield
    finally:
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = handlers, propagate


def runtime_candidates(architecture: str, shape: Sequence[int], device: torch.device, windows: int = 1,
                       runtime: str = "auto") -> tuple[tuple[str, ...], str]:
    """The runtimes :func:`select_runtime` will try, best first, or none and why PyTorch is used.

    Decided without exporting anything, so the caller can report the conversion as its own stage.
    """
    if runtime == "torch":
        return (), "PyTorch (runtime 'torch' requested)"
    if device.type != "cpu":
        return (), f"PyTorch on {device} (the ONNX Runtime / OpenVINO paths are for the CPU)"
    if runtime == "auto":
        candidates = PREFERRED.get(architecture.lower(), ())
        if not candidates:
            return (), f"PyTorch (no faster CPU runtime known for {architecture!r})"
        work = windows * int(np.prod(shape[2:])) * int(shape[0])
        if work < MIN_VOXELS:
            return (), "PyTorch (the job is too small to pay for a conversion)"
        return candidates, ""
    if runtime not in _LOADERS:
        raise ValueError(f"unknown runtime {runtime!r}: use auto, torch, onnxruntime or openvino")
    return (runtime,), ""


def select_runtime(model: nn.Module, architecture: str, shape: Sequence[int], device: torch.device,
                   windows: int = 1, runtime: str = "auto", folder: Path | None = None,
                   tolerance: float = TOLERANCE, select: int = 0,
                   log: Callable[[str, str], None] | None = None) -> tuple[nn.Module, str]:
    """The network to run windows of ``shape`` (B, C, X, Y, Z) with, and why.

    Args:
        model: the PyTorch network (eval mode).
        architecture: the card's architecture name (selects :data:`PREFERRED`).
        shape: the window batch the network will see.
        device: where inference runs; runtimes are used on the CPU only.
        windows: windows times passes of the job (with ``runtime="auto"``, small jobs stay in PyTorch).
        runtime: ``"auto"``, ``"torch"``, ``"onnxruntime"`` or ``"openvino"``.
        folder: the export cache (default :func:`cache_dir`).
        tolerance: largest relative difference from PyTorch accepted on the check window.
        select: the output used when the network returns a list (the card's ``output.select``).
        log: receives ``(message, level)`` for what the exporter and the runtime log (warnings);
            without it those messages are dropped, never printed on stderr.

    Returns:
        ``(network, reason)``; the network is ``model`` itself whenever PyTorch is used.
    """
    candidates, why = runtime_candidates(architecture, shape, device, windows, runtime)
    if not candidates:
        return model, why
    failures = []
    for name in candidates:
        key = (id(model), tuple(shape), name, select, str(folder), tolerance)
        if _LOADED.get("key") == key and _LOADED.get("model") is model:  # serve/batch: same model again
            return _LOADED["net"], _LOADED["reason"]
        try:
            with library_logs(log):
                net, err = compile_for_cpu(model, name, shape, folder, tolerance, select)
        except ImportError:
            failures.append(f"{name} is not installed")
        except Exception as exc:  # noqa: BLE001 -- any failure means: use the exact path
            failures.append(f"{name}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
        else:
            reason = f"{name} (checked against PyTorch on one window: relative difference {err:.1e})"
            _LOADED.clear()
            _LOADED.update(key=key, model=model, net=net, reason=reason)
            return net, reason
    return model, "PyTorch (" + "; ".join(failures) + ")"
