"""The CPU runtimes' usage telemetry: off unless the user allows it.

Measured with ``HOME`` pointed at an empty folder: importing ONNX Runtime writes a device id
(``~/.cache/Microsoft/DeveloperTools/.onnxruntime/deviceid`` and ``onnxruntime.db``), and
importing OpenVINO starts its Google Analytics telemetry (``openvino.tools.ovc`` creates
``~/intel/openvino_ga_cid`` and ``~/intel/stats`` and sends usage events unless the user opted
out with ``opt_in_out --opt_out``). A clinical tool sends nothing by default, so before either
runtime is imported :func:`telemetry_off` sets ``ORT_DISABLE_TELEMETRY=1`` (ONNX Runtime then
writes no device id) and hides the ``openvino_telemetry`` package from this process (OpenVINO
then uses its own no-op stand-in). Both act on the volseg process only; the user's own settings
files are not touched. ``VOLSEG_ALLOW_TELEMETRY=1`` leaves both libraries to their own settings.
"""

from __future__ import annotations

import os
import sys

__all__ = ["ALLOW_ENV", "telemetry_allowed", "telemetry_off"]

#: Set to 1 to let ONNX Runtime and OpenVINO collect usage data as their own settings say.
ALLOW_ENV = "VOLSEG_ALLOW_TELEMETRY"


def telemetry_allowed() -> bool:
    """Whether the user allowed the runtimes' telemetry (``VOLSEG_ALLOW_TELEMETRY=1``)."""
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def telemetry_off() -> bool:
    """Turn ONNX Runtime's and OpenVINO's telemetry off in this process, unless allowed.

    Call it before ``onnxruntime`` or ``openvino`` is imported. Returns True when it acted.
    A package already imported (by the caller's own code) is left as it is.
    """
    if telemetry_allowed():
        return False
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # import raises ImportError
    return True
