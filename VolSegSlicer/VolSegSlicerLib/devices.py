"""Device choices from ``volseg devices --json`` (pure Python, no Slicer, no Qt).

Input::

    {"devices": [{"id": "cpu" | "cuda:0" | "mps", "name": str,
                  "total_memory_mb": int | null, "free_memory_mb": int | null}],
     "auto": "cpu", "reason": "CUDA not available: the installed torch is a CPU build"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DeviceChoices:
    """What the device combo box shows.

    Attributes:
        items: ``(device id, text)`` pairs; the first is always ``("auto", ...)``.
        auto: the device that ``auto`` picks.
        reason: why auto picks it, shown under the combo box.
    """

    items: list[tuple[str, str]] = field(default_factory=list)
    auto: str = "cpu"
    reason: str = ""


def _gb(megabytes: float) -> str:
    return f"{megabytes / 1024:.1f} GB"


def device_text(device: dict[str, Any]) -> str:
    """``"cuda:0: NVIDIA H100 (70.3 of 79.6 GB free)"``, ``"CPU"``, ``"mps: Apple M2"``."""
    dev_id = str(device.get("id", "?"))
    if dev_id == "cpu":
        return "CPU"
    name = device.get("name") or ""
    text = f"{dev_id}: {name}" if name else dev_id
    free, total = device.get("free_memory_mb"), device.get("total_memory_mb")
    if free is not None and total:
        text += f" ({free / 1024:.1f} of {_gb(total)} free)"
    elif total:
        text += f" ({_gb(total)})"
    return text


def device_choices(text: str | dict[str, Any]) -> DeviceChoices:
    """Parse ``volseg devices --json`` output (a string or the decoded object)."""
    data = json.loads(text) if isinstance(text, str) else text
    if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
        raise ValueError("'volseg devices --json' did not print a {\"devices\": [...]} object")
    auto = str(data.get("auto") or "cpu")
    choices = DeviceChoices(auto=auto, reason=str(data.get("reason") or ""))
    choices.items.append(("auto", f"Automatic ({auto})"))
    devices = [d for d in data["devices"] if isinstance(d, dict) and d.get("id")]
    # GPUs first in the engine's order, CPU last.
    for dev in sorted(devices, key=lambda d: d["id"] == "cpu"):
        choices.items.append((str(dev["id"]), device_text(dev)))
    if not any(i == "cpu" for i, _ in choices.items):
        choices.items.append(("cpu", "CPU"))
    return choices


def fallback_choices(reason: str) -> DeviceChoices:
    """Choices when the engine could not be asked (e.g. torch not installed yet)."""
    return DeviceChoices(items=[("auto", "Automatic"), ("cpu", "CPU")], auto="cpu", reason=reason)
