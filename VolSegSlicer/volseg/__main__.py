"""``python -m volseg``: the command line (the Slicer module runs the engine this way).

The signal handlers are installed before anything heavy is imported, so SIGINT/SIGTERM in the
first second is a clean cancel (exit 130, a JSON error event with ``--progress json``) too.
"""

import sys

from volseg import signals

signals.install()
try:
    from volseg.cli.main import main

    code = signals.report_cancelled(sys.argv[1:]) if signals.pending() else main()
except KeyboardInterrupt:
    code = signals.report_cancelled(sys.argv[1:])
if code == 0:
    signals.ignore_from_now()  # finished: a signal during the exit cancels nothing
sys.exit(code)
