"""Running one command: cancel on SIGINT/SIGTERM, and every failure as one reported error."""

from __future__ import annotations

import os

from volseg import signals
from volseg.errors import Cancelled, VolSegError, error_from_exception


def cancel_on_signal():
    """SIGINT/SIGTERM (SIGBREAK on Windows) cancel the run at once: see :mod:`volseg.signals`.
    Yields the event the pipeline also checks between windows."""
    return signals.installed()


def run_reported(reporter, fn) -> int:
    """Run ``fn``; report any failure as one error event (no traceback) and return the exit code.

    Set ``VOLSEG_DEBUG=1`` to get the traceback of an unexpected error instead.
    """
    try:
        fn()
        return 0
    except (KeyboardInterrupt, VolSegError, MemoryError) as exc:
        err = error_from_exception(exc)
    except Exception as exc:  # a bug: say so plainly, keep the traceback for those who ask
        if os.environ.get("VOLSEG_DEBUG"):
            raise
        err = error_from_exception(exc)
    if signals.pending():  # a signal came during an import; whatever failed since, the run was cancelled
        err = Cancelled()
    reporter.error(err.message, err.hint, err.exit_code)
    return err.exit_code
