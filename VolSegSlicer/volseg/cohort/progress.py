"""Progress of a cohort: one ``case`` event per finished case, and a bar on a terminal.

With ``--progress json`` each case that ends (or is skipped, retried, or left undone) gives one
line::

    {"event": "case", "case": "p001", "status": "done" | "failed" | "skipped" | "retry" | "not_done",
     "elapsed_s": 3.2, "device": "cuda", "node": "gpu-3", "attempt": 1, "outputs": [...],
     "message": "..." (failed, skipped, retry, not_done),
     "cohort": {"done": 12, "failed": 1, "skipped": 3, "total": 100, "cases_per_min": 4.2,
                "eta_s": 1190.0, "elapsed_s": 171.4}}

``cases_per_min`` counts the cases this run processed (done or failed, not skipped) per minute
of this run; ``eta_s`` is the time left at that rate (null until a case has ended). On a
terminal the same counts are a one-line bar (redrawn in place when nothing else prints between
cases, as in a ``--cluster`` run); ``--progress none`` prints only failures.
"""

from __future__ import annotations

import time
from typing import Any

from volseg.progress import JsonReporter, QuietReporter, Reporter, TextReporter


class CohortProgress:
    """Counts the cases of one run and reports each one through ``reporter``.

    Args:
        reporter: the run's reporter (JSON: ``case`` events; text: the bar; quiet: failures).
        total: the number of cases in the run.
        inline: redraw the bar in place on a terminal (nothing else prints between cases).
    """

    def __init__(self, reporter: Reporter, total: int, inline: bool = False) -> None:
        self.reporter, self.total, self.inline = reporter, total, inline
        self.counts = {"done": 0, "failed": 0, "skipped": 0, "not_done": 0}
        self.start = time.perf_counter()
        self._bar_open = False

    def snapshot(self) -> dict[str, Any]:
        """The cohort counts, the rate in cases per minute and the estimated time left."""
        elapsed = time.perf_counter() - self.start
        processed = self.counts["done"] + self.counts["failed"]
        remaining = self.total - processed - self.counts["skipped"] - self.counts["not_done"]
        rate = processed / elapsed * 60 if processed and elapsed > 0 else None
        eta = remaining / rate * 60 if rate else None
        return {"done": self.counts["done"], "failed": self.counts["failed"], "skipped": self.counts["skipped"],
                "total": self.total, "cases_per_min": None if rate is None else round(rate, 2),
                "eta_s": None if eta is None else round(eta, 1), "elapsed_s": round(elapsed, 2)}

    def case(self, name: str, status: str, **fields: Any) -> None:
        """Count a case that ended with ``status`` ("retry" counts nothing) and report it."""
        if status in self.counts:
            self.counts[status] += 1
        event = {"event": "case", "case": name, "status": status,
                 **{k: v for k, v in fields.items() if v is not None}, "cohort": self.snapshot()}
        if isinstance(self.reporter, JsonReporter):
            self.reporter.emit(event)
        elif isinstance(self.reporter, TextReporter):
            self._draw(event, quiet=isinstance(self.reporter, QuietReporter))

    def _draw(self, event: dict[str, Any], quiet: bool) -> None:
        stream = self.reporter.stream
        status, message = event["status"], event.get("message")
        if message and (status in ("failed", "retry") or not quiet):
            self.break_line()
            label = {"failed": "error", "retry": "warning", "skipped": "skipped", "not_done": "not done"}[status]
            stream.write(f"{label}: {event['case']}: {message}\n")
            if event.get("hint") and status == "failed":
                stream.write(f"  hint: {event['hint']}\n")
        if not quiet:
            tty = self.inline and self.reporter.bar
            stream.write(("\r" if tty else "") + bar_line(event["cohort"]) + ("" if tty else "\n"))
            self._bar_open = tty
        stream.flush()

    def break_line(self) -> None:
        """End the bar's line, if one is open, so that other output starts on a line of its own."""
        if self._bar_open:
            self.reporter.stream.write("\n")
            self.reporter.stream.flush()
            self._bar_open = False


def bar_line(c: dict[str, Any], width: int = 24) -> str:
    """``[#####.....] 12/100 cases, 1 failed, 3 skipped, 4.2/min, 19m50s left``."""
    finished = c["done"] + c["failed"] + c["skipped"]
    filled = int(width * finished / c["total"]) if c["total"] else width
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] {finished}/{c['total']} cases"]
    if c["failed"]:
        parts.append(f"{c['failed']} failed")
    if c["skipped"]:
        parts.append(f"{c['skipped']} skipped")
    if c["cases_per_min"] is not None:
        parts.append(f"{c['cases_per_min']:.1f}/min")
    if c["eta_s"] is not None and finished < c["total"]:
        parts.append(f"{_duration(c['eta_s'])} left")
    return ", ".join(parts) + "   "


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
