"""Progress of a cohort: one ``case`` event per finished case, and a bar on a terminal.

With ``--progress json`` each case that ends (or is skipped, retried, or left undone) gives one
line::

    {"event": "case", "case": "p001", "status": "done" | "failed" | "skipped" | "retry" | "not_done",
     "elapsed_s": 3.2, "device": "cuda", "node": "gpu-3", "attempt": 1, "outputs": [...],
     "message": "..." (failed, skipped, retry, not_done), "hint": "..." (failed),
     "cohort": {"done": 12, "failed": 1, "skipped": 3, "total": 100, "cases_per_min": 4.2,
                "eta_s": 1190.0, "elapsed_s": 171.4}}

``cases_per_min`` counts the cases this run processed (done or failed, not skipped) per minute
since the first case began (planning and skipping take no part in it); ``eta_s`` is the time
left at that rate (null until a case has ended). On a terminal the same counts are a one-line
bar redrawn in place, with the case being segmented and its stage folded into it (warnings and
errors still get lines of their own); elsewhere (a log file) each case's lines are kept.
``--progress none`` prints only warnings, failures and the final summary.

Case numbers count every case of the cohort, skipped ones included: "case 4/4: p004" is the
case that makes the bar say "4/4 cases".
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
        self._work_start: float | None = None
        self._bar_open = False
        self._status = ""
        self.warned: set[str] = set()  # warnings already shown in a folded batch

    @property
    def number(self) -> int:
        """The number of the next case, counting every case that ended or was skipped before it."""
        return sum(self.counts.values()) + 1

    def begin_case(self) -> None:
        """A case starts running: the rate's clock starts with the first one."""
        if self._work_start is None:
            self._work_start = time.perf_counter()

    def snapshot(self) -> dict[str, Any]:
        """The cohort counts, the rate in cases per minute and the estimated time left.

        The rate counts processed cases (done or failed) over the time since the first case began:
        skipped cases count neither as work nor as time.
        """
        now = time.perf_counter()
        elapsed = now - self.start
        worked = now - (self._work_start if self._work_start is not None else self.start)
        processed = self.counts["done"] + self.counts["failed"]
        remaining = self.total - processed - self.counts["skipped"] - self.counts["not_done"]
        rate = processed / worked * 60 if processed and worked > 0 else None
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
        self._status = ""
        if not quiet:
            tty = self.inline and self.reporter.bar
            stream.write(("\r" if tty else "") + bar_line(event["cohort"]) + (_CLEAR if tty else "\n"))
            self._bar_open = tty
        stream.flush()

    @property
    def folds(self) -> bool:
        """Whether each case's own lines are folded into the bar (a text bar redrawn in place on a terminal)."""
        return (self.inline and isinstance(self.reporter, TextReporter) and not isinstance(self.reporter, QuietReporter)
                and self.reporter.bar)

    def status(self, text: str) -> None:
        """Show ``text`` (the running case and its stage) after the bar, in place; only when folding."""
        if not self.folds:
            return
        self._status = text
        line = bar_line(self.snapshot()).rstrip()
        self.reporter.stream.write(f"\r{line} | {text[:100]}{_CLEAR}")
        self.reporter.stream.flush()
        self._bar_open = True

    def break_line(self) -> None:
        """End the bar's line, if one is open, so that other output starts on a line of its own."""
        if self._bar_open:
            self.reporter.stream.write("\n")
            self.reporter.stream.flush()
            self._bar_open = False


#: Clears the rest of a redrawn terminal line (ANSI "erase to end of line").
_CLEAR = "\x1b[K"


class FoldedCaseOutput(Reporter):
    """The parent reporter of one case in a folded batch: its stages and inference progress go
    into the cohort bar's line, its warnings get lines of their own (a warning every case gives,
    such as "a demonstration model", once), its ``done`` line is left out (the bar counts it)."""

    def __init__(self, progress: CohortProgress, case: str) -> None:
        super().__init__(progress.reporter.stream, progress.reporter.request)
        self.cohort, self.case = progress, case

    def emit(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "stage":
            self.cohort.status(f"{self.case}: {event['message']}")
        elif kind == "progress":
            self.cohort.status(f"{self.case}: {event['stage']} {event['done']}/{event['total']}")
        elif kind == "log" and event["level"] == "warning" and event["message"] not in self.cohort.warned:
            self.cohort.warned.add(event["message"])  # the same warning for every case: shown once
            self.cohort.break_line()
            self.cohort.reporter.emit(event)


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
