"""SIGINT/SIGTERM (and Windows' SIGBREAK) as cancellation, at any moment of a run.

The promise: a signal at any moment ends the run with exit code 130, a JSON error event with
``--progress json``, and no output. So the handler does not only set a flag (a flag is looked
at between windows, and never by a stage that is stuck in a long read, an unpickle or a
write): it raises :class:`KeyboardInterrupt` in the main thread at once, which every stage lets
through (atomic writes remove their temporary files on it) and the CLI reports as cancelled.

Once the outputs are being committed (moved into place, :func:`commit_point`), the run has
finished: a signal then only sets the flag, and the run reports ``done`` with exit code 0.
A signal that arrives while a module is being imported only sets the flag too (raising inside
an import leaves the module half-initialised, and numpy turns the interrupt into an
``ImportError``): the pipeline honours it at its next stage, :func:`pending` tells the CLI.
A second signal while the first one's exception unwinds is ignored, so clean-up is never cut
short. :func:`install` is called first thing by ``python -m volseg`` (before the heavy
imports) so that a signal in the first second is handled too.

This module is light (no numpy, torch or ITK) so that it can be imported before anything else.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

#: Set by every handled signal; the pipeline also looks at it between windows and stages.
cancel_event = threading.Event()

_state = {"raised": False, "committed": False, "pending": False}

CANCELLED_MESSAGE = "cancelled; nothing was written"


def _signals() -> list[int]:
    return [signal.SIGINT, signal.SIGTERM, *([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])]


def _in_import(frame: Any) -> bool:
    """Whether ``frame`` runs inside an import (a frame of importlib's bootstrap is on the stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _handle(signum: int, frame: Any) -> None:
    cancel_event.set()
    if _state["raised"] or _state["committed"]:
        return  # clean-up of the first signal under way, or the outputs already committed
    if _in_import(frame):
        _state["pending"] = True  # honoured at the next stage (the pipeline) or by the CLI
        return
    _state["raised"] = True
    raise KeyboardInterrupt


def ignore_from_now() -> None:
    """The command has finished and said so: the process only exits now (which can take a second
    of PyTorch's teardown), so a late signal cancels nothing and must not turn exit 0 into 130 or
    a kill while the outputs stay. Main thread only; used by the process entry points, not by
    :func:`volseg.cli.main.main` (which tests and the warm worker call in-process)."""
    if threading.current_thread() is threading.main_thread():
        for sig in _signals():
            signal.signal(sig, signal.SIG_IGN)


def pending() -> bool:
    """Whether a signal arrived during an import and has not been acted on by raising."""
    return _state["pending"] and cancel_event.is_set()


def begin_run() -> None:
    """A new run starts: a signal raises again (the previous run's commit no longer shields)."""
    _state["raised"] = False
    _state["committed"] = False


def commit_point() -> None:
    """The outputs are about to be moved into place: from now on the run finishes, and a signal
    only sets :data:`cancel_event`."""
    _state["committed"] = True


def install() -> dict[int, Any]:
    """Install the handler for SIGINT, SIGTERM (and SIGBREAK); returns the previous handlers.

    Only the main thread can install handlers; elsewhere nothing happens (the caller's cancel
    event still works between windows).
    """
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    if signal.getsignal(signal.SIGTERM) is not _handle:  # a fresh start; nested installs keep a pending signal
        cancel_event.clear()
        _state["pending"] = False
    begin_run()
    for sig in _signals():
        previous[sig] = signal.signal(sig, _handle)
    return previous


@contextlib.contextmanager
def installed() -> Iterator[threading.Event]:
    """The handler for the duration of a block (then the previous handlers again); yields
    :data:`cancel_event`."""
    previous = install()
    try:
        yield cancel_event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wants_json(argv: Sequence[str]) -> bool:
    """Whether the command line asks for JSON events (``--progress json`` or ``serve``)."""
    args = list(argv)
    if "serve" in args[:1]:
        return True
    for i, arg in enumerate(args):
        if arg == "--progress=json" or (arg == "--progress" and i + 1 < len(args) and args[i + 1] == "json"):
            return True
    return False


def report_cancelled(argv: Sequence[str], stdout=None, stderr=None) -> int:
    """Report a cancel that arrived before (or outside) a reported run: one JSON error event on
    stdout when the command line asks for JSON, one line on stderr otherwise. Returns 130."""
    if wants_json(argv):
        stream = stdout or sys.stdout
        stream.write(json.dumps({"event": "error", "message": CANCELLED_MESSAGE, "hint": None, "exit_code": 130}) + "\n")
        stream.flush()
    else:
        stream = stderr or sys.stderr
        stream.write(f"error: {CANCELLED_MESSAGE}\n")
        stream.flush()
    return 130
