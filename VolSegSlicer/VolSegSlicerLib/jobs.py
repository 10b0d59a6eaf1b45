"""Jobs the module runs in the background (pure Python, no Slicer, no Qt).

:class:`SegmentationJob` follows one ``volseg segment`` run (in a process of its own, or as one
request to the warm ``volseg serve`` worker) through a :class:`RunMonitor`; :class:`EngineQuery`
collects the output of a short command such as ``volseg models --json``. Both are polled from a
timer on the GUI thread (``poll()`` never blocks) until ``poll()`` returns True.
"""

import time
from typing import Any, Callable, Optional

from VolSegSlicerLib.command import cancel_request_line
from VolSegSlicerLib.process import EngineProcess
from VolSegSlicerLib.protocol import RunMonitor


class SegmentationJob:
    """One ``volseg segment`` run: its process (own or the warm worker), its monitor, its result.

    ``onEvent(job, logLineOrNone)`` is called for every event, ``onFinished(job)`` once at the end,
    after the result has been imported (``segmentationNode`` is then set) or the run failed.
    """

    def __init__(self, process: EngineProcess, request: Any = None, ownsProcess: bool = True,
                 onEvent: Optional[Callable] = None, onFinished: Optional[Callable] = None) -> None:
        self.process = process
        self.request = request
        self.ownsProcess = ownsProcess
        self.onEvent = onEvent
        self.onFinished = onFinished
        self.monitor = RunMonitor()
        self.started = time.monotonic()
        self.elapsed = 0.0
        self.finished = False
        self.cancelRequested = False
        self._cancelDeadline: Optional[float] = None
        self.segmentationNode = None
        # Filled by the logic before the run starts:
        self.tempDir = ""
        self.outputPath = ""
        self.model: dict = {}
        self.inputVolumes: list = []
        self.checkpoint = ""
        self.outputSegmentation = None
        self.replace = False
        #: Set when the run had to be stopped for a reason of the scene's (e.g. its input was
        #: removed): the run ends as an error with this message, nothing imported.
        self.abandonReason = ""

    @property
    def inputVolume(self):
        """The first input volume: the result takes its grid, transform and study."""
        return self.inputVolumes[0] if self.inputVolumes else None

    #: Seconds the warm worker gets to answer a cancel request before it is killed.
    WARM_CANCEL_GRACE_S = 10.0

    def cancel(self) -> None:
        """Stop the run. A process of its own gets SIGTERM (the engine stops cleanly and writes
        nothing), then the whole tree is killed after a grace period. The warm worker gets a cancel
        request on stdin and stays loaded; it is killed only if it does not answer in time."""
        self.cancelRequested = True
        if self.request is None:
            self.process.cancel()
            return
        try:
            self.process.send_line(cancel_request_line(self.request))
            self._cancelDeadline = time.monotonic() + self.WARM_CANCEL_GRACE_S
        except (OSError, ValueError, RuntimeError):
            self.process.kill()

    def poll(self) -> bool:
        """Handle new output; return True when the run has just ended."""
        if self.finished:
            return False
        for event in self.process.poll():
            if self.request is not None and event.kind != "text" and event.request != self.request:
                continue
            line = self.monitor.feed(event)
            if self.onEvent:
                self.onEvent(self, line)
        if (self.monitor.outcome is None and self._cancelDeadline is not None
                and time.monotonic() > self._cancelDeadline):
            self.process.kill()
        if self.monitor.outcome is None and self.process.finished:
            self.monitor.process_exited(self.process.returncode, self.cancelRequested)
        if self.monitor.outcome is not None and (self.process.finished or not self.ownsProcess):
            if self.cancelRequested and self.monitor.outcome != "cancelled":
                self.monitor.outcome = "cancelled"
            self.elapsed = time.monotonic() - self.started
            return True
        return False


class EngineQuery:
    """A short engine command (``models --json``, ``devices --json``) whose stdout is parsed at the end."""

    def __init__(self, process: EngineProcess, parse: Callable, callback: Callable) -> None:
        self.process, self.parse, self.callback = process, parse, callback
        self.stdout: list[str] = []
        self.stderr: list[str] = []

    def poll(self) -> bool:
        for event in self.process.poll():
            (self.stdout if event.stream == "stdout" else self.stderr).append(event.text)
        return self.process.finished

    def cancel(self) -> None:
        self.process.kill()

    def deliver(self) -> None:
        result, error = None, ""
        if self.process.returncode == 0:
            try:
                result = self.parse("\n".join(self.stdout))
            except ValueError as exc:
                error = f"unexpected engine output ({exc})"
        else:
            error = "\n".join(line for line in self.stderr if line.strip())[-2000:] or \
                f"the engine exited with code {self.process.returncode}"
        self.callback(result, error)
