"""Choosing the compute device, and saying why."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from volseg.errors import ResourceError
from volseg.inference.precision import choose_precision


@dataclass(frozen=True)
class DeviceInfo:
    id: str
    name: str
    total_memory_mb: int | None = None
    free_memory_mb: int | None = None
    auto_precision: str | None = None  # what --precision auto runs there (volseg.inference.precision)

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "total_memory_mb": self.total_memory_mb,
                "free_memory_mb": self.free_memory_mb, "auto_precision": self.auto_precision}


def _cpu_info() -> DeviceInfo:
    import os

    try:
        import psutil

        vm = psutil.virtual_memory()
        total, free = vm.total // 2**20, vm.available // 2**20
    except ImportError:  # psutil is optional at run time
        total = free = None
    return DeviceInfo("cpu", f"CPU ({os.cpu_count()} logical cores)", total, free, "fp32")


def list_devices() -> list[DeviceInfo]:
    """CUDA GPUs (with name and memory), Apple MPS, and the CPU."""
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            precision = choose_precision("auto", "cuda", torch.cuda.get_device_capability(i))[0]
            devices.append(DeviceInfo(f"cuda:{i}", torch.cuda.get_device_name(i), total // 2**20, free // 2**20,
                                      precision))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append(DeviceInfo("mps", "Apple Metal (MPS)", auto_precision="fp32"))
    devices.append(_cpu_info())
    return devices


def why_not_cuda() -> str:
    if torch.version.cuda is None:
        return "CUDA not available: the installed torch is a CPU build"
    if torch.cuda.device_count() == 0:
        return f"CUDA not available: torch is built for CUDA {torch.version.cuda} but no GPU or driver was found"
    return "CUDA not available"


def auto_device() -> tuple[str, str]:
    """The device ``--device auto`` picks, and the reason in words."""
    if torch.cuda.is_available():
        best = max(range(torch.cuda.device_count()), key=lambda i: torch.cuda.mem_get_info(i)[0])
        return f"cuda:{best}", f"CUDA GPU {torch.cuda.get_device_name(best)} has the most free memory"
    reason = why_not_cuda()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps", reason + "; using Apple MPS"
    return "cpu", reason + "; using the CPU"


def resolve_device(spec: str = "auto") -> tuple[torch.device, str]:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a device, refusing ones that are not there."""
    spec = (spec or "auto").lower()
    if spec == "auto":
        dev, reason = auto_device()
        return torch.device(dev), reason
    if spec == "cpu":
        return torch.device("cpu"), "CPU requested"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ResourceError(f"--device {spec} requested but {why_not_cuda()}",
                                hint="use --device auto or cpu, or install a CUDA build of torch")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise ResourceError(f"--device {spec}: there are only {torch.cuda.device_count()} CUDA devices",
                                hint="run `volseg devices` to list them")
        return torch.device(f"cuda:{index}"), f"{torch.cuda.get_device_name(index)} requested"
    if spec == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ResourceError("--device mps requested but Apple MPS is not available", hint="use --device auto or cpu")
        return torch.device("mps"), "Apple MPS requested"
    raise ResourceError(f"unknown device {spec!r}", hint="use auto, cpu, cuda, cuda:N or mps")
