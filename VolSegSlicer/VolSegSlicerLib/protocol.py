"""Reading the engine's ``--progress json`` output (pure Python, no Slicer, no Qt).

``volseg segment --progress json`` writes one JSON object per stdout line::

    {"event": "stage", "stage": "infer", "message": "..."}
    {"event": "progress", "stage": "infer", "fraction": 0.4, "done": 8, "total": 20, "elapsed_s": 3.1, "eta_s": 4.6}
    {"event": "log", "level": "warning", "message": "..."}
    {"event": "done", "outputs": {"segmentation": "...", "probabilities": null}, "elapsed_s": 9.0, ...}
    {"event": "error", "message": "...", "hint": "...", "exit_code": 2}

Anything else (stderr, or a stray print on stdout) becomes a ``text`` event so that it still
reaches the log. :class:`RunMonitor` folds the events of one run into what the panel shows:
an overall percentage, a status line with the stage and the time left, and the outcome.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: Stages in the order the engine runs them, with the share of the progress bar each gets.
#: ``convert`` (the network exported for ONNX Runtime / OpenVINO on the CPU) comes only when tried.
STAGE_WEIGHTS: dict[str, float] = {
    "read": 0.05,
    "load_model": 0.05,
    "preprocess": 0.05,
    "convert": 0.05,
    "infer": 0.70,
    "postprocess": 0.05,
    "write": 0.05,
}

STAGE_TITLES: dict[str, str] = {
    "read": "Reading the input",
    "load_model": "Loading the model",
    "preprocess": "Preparing the image",
    "convert": "Converting the network for a faster CPU runtime",
    "infer": "Running the network",
    "postprocess": "Cleaning up the result",
    "write": "Writing the result",
    "upload": "Sending the image to the server",
    "queue": "Waiting for the server",
    "download": "Fetching the result from the server",
}

EVENT_KINDS = ("stage", "progress", "log", "done", "error")


@dataclass
class EngineEvent:
    """One line of engine output.

    Attributes:
        kind: ``stage``, ``progress``, ``log``, ``done``, ``error`` or ``text`` (not a protocol line).
        data: the decoded JSON object (empty for ``text``).
        text: the raw line without its line end.
        stream: ``stdout`` or ``stderr``.
    """

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    stream: str = "stdout"

    @property
    def request(self) -> Any:
        """The ``request`` tag the warm worker (``volseg serve``) puts on its answers, else None."""
        return self.data.get("request")


def parse_line(line: str, stream: str = "stdout") -> EngineEvent:
    """Turn one output line into an :class:`EngineEvent`.

    Only stdout lines that are JSON objects with a known ``event`` are protocol events;
    everything else is kept verbatim as a ``text`` event.
    """
    text = line.rstrip("\r\n")
    if stream == "stdout" and text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict) and data.get("event") in EVENT_KINDS:
            return EngineEvent(kind=data["event"], data=data, text=text, stream=stream)
    return EngineEvent(kind="text", text=text, stream=stream)


def format_duration(seconds: float | None) -> str:
    """Short human text for a duration: ``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    if seconds is None or seconds != seconds or seconds < 0:  # None, NaN or negative
        return "unknown"
    total = int(round(seconds))
    if total < 60:
        return f"{total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def eta_text(eta_s: float | None) -> str:
    """What the panel says about the time left."""
    if eta_s is None:
        return "estimating time left"
    if eta_s < 1:
        return "almost done"
    return f"about {format_duration(eta_s)} left"


def overall_fraction(stage: str, stage_fraction: float = 0.0) -> float:
    """Fraction of the whole run done when ``stage`` is ``stage_fraction`` complete (0..1)."""
    done = 0.0
    for name, weight in STAGE_WEIGHTS.items():
        if name == stage:
            return min(1.0, done + weight * max(0.0, min(1.0, stage_fraction)))
        done += weight
    return 0.0


@dataclass
class RunMonitor:
    """State of one segmentation run, built from its events.

    Attributes:
        stage: the current stage name ('' before the first event).
        percent: overall progress 0..100 for the progress bar.
        status: one line for the panel, e.g. ``"Running the network: 8/20 windows, about 5 s left"``.
        outcome: ``None`` while running, then ``"done"``, ``"error"`` or ``"cancelled"``.
        result: the ``done`` event's data (outputs, timings, device, labels_present).
        error: the ``error`` event's message (or a description of a crash).
        hint: the ``error`` event's hint.
        exit_code: the engine's exit code when known.
    """

    stage: str = ""
    percent: int = 0
    status: str = "Starting"
    outcome: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    hint: str = ""
    exit_code: int | None = None
    _recent_text: list[str] = field(default_factory=list)

    def feed(self, event: EngineEvent) -> str | None:
        """Take one event; return the line to append to the log, or None."""
        data = event.data
        if event.kind == "stage":
            self.stage = str(data.get("stage", ""))
            self.percent = max(self.percent, int(100 * overall_fraction(self.stage, 0.0)))
            self.status = STAGE_TITLES.get(self.stage, self.stage.capitalize() or "Working")
            message = data.get("message") or self.status
            return f"[{self.stage}] {message}"
        if event.kind == "progress":
            self.stage = str(data.get("stage", self.stage))
            fraction = float(data.get("fraction") or 0.0)
            self.percent = max(self.percent, int(100 * overall_fraction(self.stage, fraction)))
            title = STAGE_TITLES.get(self.stage, self.stage.capitalize())
            done, total = data.get("done"), data.get("total")
            counts = f": {done}/{total} windows" if done is not None and total else ""
            self.status = f"{title}{counts}, {eta_text(data.get('eta_s'))}"
            return None
        if event.kind == "log":
            level = str(data.get("level", "info"))
            prefix = "Warning: " if level == "warning" else ""
            return f"{prefix}{data.get('message', '')}"
        if event.kind == "done":
            self.outcome = "done"
            self.result = dict(data)
            self.percent = 100
            self.exit_code = 0
            self.status = f"Done in {format_duration(data.get('elapsed_s'))}"
            return f"Finished in {format_duration(data.get('elapsed_s'))} on {data.get('device', '?')}"
        if event.kind == "error":
            self.exit_code = int(data.get("exit_code", 1) or 1)
            self.outcome = "cancelled" if self.exit_code == 130 else "error"
            self.error = str(data.get("message", "the engine failed"))
            self.hint = str(data.get("hint") or "")
            self.status = "Cancelled" if self.outcome == "cancelled" else "Failed"
            return f"Error: {self.error}" + (f" (hint: {self.hint})" if self.hint else "")
        # Plain text: keep a few recent lines to explain a crash that sent no error event.
        if event.text.strip():
            self._recent_text = (self._recent_text + [event.text])[-20:]
            return event.text
        return None

    def process_exited(self, returncode: int | None, cancel_requested: bool = False) -> None:
        """Record the end of the process; fills in the outcome when the engine said nothing."""
        if self.outcome is not None:
            return
        self.exit_code = returncode
        if cancel_requested or returncode in (130, -2, -15):
            self.outcome = "cancelled"
            self.status = "Cancelled"
            self.error = "cancelled; nothing was written"
            return
        self.outcome = "error"
        self.status = "Failed"
        last = "\n".join(self._recent_text[-5:])
        self.error = f"the engine stopped with exit code {returncode} without reporting a result"
        if last:
            self.error += f"; its last output was:\n{last}"
