"""Progress reporting: a bar on a terminal, JSON lines for the Slicer module, or nothing.

The JSON protocol (one object per line on stdout, everything else on stderr):

- ``{"event": "stage", "stage": "read", "message": "..."}``
- ``{"event": "progress", "stage": "infer", "fraction": 0.42, "done": 21, "total": 50,
  "elapsed_s": 3.1, "eta_s": 4.3}``
- ``{"event": "log", "level": "info" | "warning", "message": "..."}``
- ``{"event": "done", "outputs": {...}, "elapsed_s": ..., "startup_s": ..., "timings": {...},
  "device": "cpu", "labels_present": [1, 2]}``: ``timings`` has the seconds of each stage of this
  run; ``startup_s`` is the time from the start of the run to its first stage (importing PyTorch
  and MONAI, choosing the device), so ``elapsed_s`` = ``startup_s`` + the stages.
- ``{"event": "error", "message": "...", "hint": "..." | null, "exit_code": 2}``
- ``volseg batch`` adds one ``{"event": "case", "case": "...", "status": ..., "cohort": {...}}``
  per case (see :mod:`volseg.cohort.progress`).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

#: ``convert`` (exporting the network to ONNX Runtime / OpenVINO on the CPU) only when that is tried.
STAGES = ("read", "load_model", "preprocess", "convert", "infer", "postprocess", "write")


class Reporter:
    """Base reporter: records stage timings; subclasses decide what to print."""

    def __init__(self, stream: TextIO | None = None, request: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.request = request
        self.begin_run()

    def begin_run(self) -> None:
        """Start timing a new run: ``elapsed_s``, ``startup_s`` and the stage timings of the next
        ``done`` event count from here (``volseg batch`` calls this before each case)."""
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.startup: float | None = None
        self._stage: str | None = None
        self._stage_start = self.start

    # -- events -------------------------------------------------------------------------------
    def stage(self, name: str, message: str = "") -> None:
        self._close_stage()
        self._stage, self._stage_start = name, time.perf_counter()
        if self.startup is None:
            self.startup = self._stage_start - self.start
        self.emit({"event": "stage", "stage": name, "message": message or name})

    def progress(self, done: int, total: int, stage: str = "infer") -> None:
        elapsed = time.perf_counter() - self._stage_start
        fraction = done / total if total else 1.0
        eta = elapsed / done * (total - done) if done else None
        self.emit({"event": "progress", "stage": stage, "fraction": round(fraction, 4), "done": done,
                   "total": total, "elapsed_s": round(elapsed, 3), "eta_s": None if eta is None else round(eta, 2)})

    def log(self, message: str, level: str = "info") -> None:
        self.emit({"event": "log", "level": level, "message": message})

    def done(self, outputs: dict[str, Any], **extra: Any) -> None:
        self._close_stage()
        self.emit({"event": "done", "outputs": outputs, "elapsed_s": round(time.perf_counter() - self.start, 3),
                   "startup_s": round(self.startup or 0.0, 3),
                   "timings": {k: round(v, 3) for k, v in self.timings.items()}, **extra})

    def error(self, message: str, hint: str | None, exit_code: int) -> None:
        self.emit({"event": "error", "message": message, "hint": hint, "exit_code": exit_code})

    def _close_stage(self) -> None:
        if self._stage is not None:
            self.timings[self._stage] = self.timings.get(self._stage, 0.0) + time.perf_counter() - self._stage_start
            self._stage = None

    def emit(self, event: dict[str, Any]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class JsonReporter(Reporter):
    """One JSON object per line, flushed at once (the Slicer module reads these)."""

    def emit(self, event: dict[str, Any]) -> None:
        if self.request is not None:
            event = {**event, "request": self.request}
        self.stream.write(json.dumps(event) + "\n")
        self.stream.flush()


class TextReporter(Reporter):
    """Human-readable output on stderr; a one-line bar for the inference stage on a terminal."""

    def __init__(self, stream: TextIO | None = None, request: Any = None, bar: bool = True) -> None:
        super().__init__(stream or sys.stderr, request)
        self.bar = bar and self.stream.isatty()
        self._last = 0.0

    def emit(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "progress":
            if not self.bar:
                return
            now = time.perf_counter()
            if now - self._last < 0.1 and event["done"] < event["total"]:
                return
            self._last = now
            width = 30
            filled = int(width * event["fraction"])
            eta = f"{event['eta_s']:.0f}s left" if event["eta_s"] is not None else ""
            self.stream.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {event['done']}/{event['total']} {eta}   ")
            if event["done"] >= event["total"]:
                self.stream.write("\n")
        elif kind == "stage":
            self.stream.write(f"{event['message']}\n")
        elif kind == "log":
            prefix = "warning: " if event["level"] == "warning" else ""
            self.stream.write(f"{prefix}{event['message']}\n")
        elif kind == "done":
            startup = event.get("startup_s") or 0.0
            timings = ", ".join([*([f"start-up {startup:.1f}s"] if startup >= 0.05 else []),
                                 *(f"{k} {v:.1f}s" for k, v in event["timings"].items())])
            outs = ", ".join(f"{v}" for v in event["outputs"].values() if v)
            self.stream.write(f"wrote {outs} in {event['elapsed_s']:.1f}s ({timings})\n")
        elif kind == "error":
            self.stream.write(f"error: {event['message']}\n")
            if event.get("hint"):
                self.stream.write(f"  hint: {event['hint']}\n")
        self.stream.flush()


class QuietReporter(TextReporter):
    """Only errors and the final line."""

    def emit(self, event: dict[str, Any]) -> None:
        if event["event"] in ("error", "done") or (event["event"] == "log" and event["level"] == "warning"):
            super().emit(event)


def make_reporter(kind: str, request: Any = None) -> Reporter:
    if kind == "json":
        return JsonReporter(sys.stdout, request)
    if kind == "none":
        return QuietReporter(sys.stderr, request)
    return TextReporter(sys.stderr, request)
