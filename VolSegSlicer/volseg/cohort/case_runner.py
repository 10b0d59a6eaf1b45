"""One case of a batch, run where it is sent: in the ``volseg batch`` process or in a cluster worker.

:func:`run_case` segments one case and returns what happened as a plain dict (an *outcome*)
that travels between processes; the failure of a case is an outcome, never an exception, so
one bad case cannot stop a cohort. The same function runs in the plain batch and in each Ray
actor (``volseg.cohort.cluster``), so both give the same results and the same messages.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from volseg.errors import (
    Cancelled,
    InputError,
    OutputError,
    VolSegError,
    error_from_exception,
)
from volseg.io import full_suffix, segmentation_outputs
from volseg.cohort.manifest import file_records
from volseg.pipeline import ModelCache, SegmentRequest, segment
from volseg.progress import Reporter

#: What to do when a worker cannot see a path (README, "Cohorts on a cluster").
SHARED_FS_HINT = ("inputs and the output folder must be on a file system every node mounts at the same path "
                  "(NFS, a parallel file system, ...)")


@dataclass
class Job:
    """A case on its way to a worker: its inputs, its result file, and how often it was tried."""

    name: str
    inputs: list[Path]
    output: Path
    overwrite: bool = False
    attempts: int = 0
    #: No result file of the case existed when the run began: any found after a worker died is partial.
    fresh: bool = True


class CaseReporter(Reporter):
    """The reporter of one case: its own stage timings, its warnings kept, every event passed on
    to ``parent`` (none in a cluster worker, whose events stay there)."""

    def __init__(self, parent: Reporter | None = None) -> None:
        super().__init__(parent.stream if parent else None, parent.request if parent else None)
        self.parent = parent
        self.warnings: list[str] = []

    def emit(self, event: dict[str, Any]) -> None:
        if event["event"] == "log" and event.get("level") == "warning":
            self.warnings.append(event["message"])
        if self.parent is not None:
            self.parent.emit(event)


def node_name() -> str:
    return socket.gethostname() or "this machine"


def check_visible(job: Job, where: str) -> None:
    """Refuse a case whose inputs or output folder this process cannot see (one clear message)."""
    for path in job.inputs:
        if not os.path.exists(path):
            raise InputError(f"input {path} is not visible on {where}", hint=SHARED_FS_HINT)
    if not os.path.isdir(job.output.parent):
        raise OutputError(f"output folder {job.output.parent} is not visible on {where}", hint=SHARED_FS_HINT)


def discard_partial_outputs(job: Job) -> list[Path]:
    """Remove what a worker killed while writing ``job``'s result may have left; return it.

    That is: the hidden staging folders of :func:`volseg.pipeline.write_outputs` holding only
    files of this result (their temporary names start with the result's name), and, for a case
    that had no result before, any of its result files already moved into place (a label map
    without its colour table, say). Staging folders of other cases are never touched.
    """
    out_dir = job.output.parent
    names = {p.name for p in segmentation_outputs(job.output)}
    stems = {name[: len(name) - len(full_suffix(name))] for name in names}

    def ours(entry: str) -> bool:
        return entry in names or any(entry.startswith(f".{stem}.volseg-tmp-") for stem in stems)

    removed: list[Path] = []
    for folder in out_dir.glob(".volseg-stage-*"):
        with contextlib.suppress(OSError):
            entries = [e.name for e in folder.iterdir()]
            if entries and all(ours(e) for e in entries):
                shutil.rmtree(folder)
                removed.append(folder)
    if job.fresh:
        for name in sorted(names):
            with contextlib.suppress(FileNotFoundError):
                (out_dir / name).unlink()
                removed.append(out_dir / name)
    return removed


def run_case(template: SegmentRequest, job: Job, parent: Reporter | None = None,
             cancel: threading.Event | None = None, cache: ModelCache | None = None) -> dict[str, Any]:
    """Segment ``job`` with the settings of ``template``; return its outcome.

    The outcome: ``status`` ("done", "failed", or "not_done" when cancelled; nothing is written
    then), ``elapsed_s``, ``cpu_s`` (CPU time of the whole process meanwhile), ``timings``
    (seconds per stage), ``device`` (as resolved) and ``where`` (where inference really ran,
    after any out-of-memory fallback), ``outputs`` (name, size and modification time of each
    result file, as this process sees them: on a network file system the writer's view is the
    one to trust), ``node``, ``worker``,
    ``error`` (``{"message", "hint", "exit_code"}`` or None) and ``warnings``. Only a
    ``KeyboardInterrupt`` escapes. ``VOLSEG_DEBUG=1`` re-raises an unexpected error instead.
    """
    reporter = CaseReporter(parent)
    where = node_name()
    outcome: dict[str, Any] = {"status": "failed", "node": where, "worker": f"pid {os.getpid()}",
                               "device": None, "error": None}
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        check_visible(job, where)
        request = replace(template, inputs=list(job.inputs), output=job.output, overwrite=job.overwrite)
        result = segment(request, reporter, cancel, cache)
        names = [p.name for p in segmentation_outputs(job.output)]
        outcome.update(status="done", device=result.get("device"), where=result.get("where"),
                       outputs=file_records(job.output.parent, names))
    except Cancelled:
        outcome.update(status="not_done", error={"message": "cancelled while running; nothing was written",
                                                 "hint": None, "exit_code": Cancelled.exit_code})
    except Exception as exc:
        if os.environ.get("VOLSEG_DEBUG") and not isinstance(exc, VolSegError):
            raise
        err = error_from_exception(exc)
        outcome["error"] = {"message": err.message, "hint": err.hint, "exit_code": err.exit_code}
    reporter._close_stage()
    outcome.update(elapsed_s=round(time.perf_counter() - t0, 3), cpu_s=round(time.process_time() - c0, 3),
                   timings={k: round(v, 3) for k, v in reporter.timings.items()}, warnings=reporter.warnings)
    return outcome
