"""``python fault_launcher.py ARGS``: ``python -m volseg ARGS`` that pauses at a chosen point.

The fault tests signal or kill the engine at every stage; to hit a stage for sure, this runs the
real entry point (handlers installed first, as in ``volseg/__main__.py``) with a pause at the
point named by ``VOLSEG_TEST_PAUSE``:

- ``stage:NAME``: right after the engine announced stage NAME (read, load_model, ...);
- ``mid-write``: the segmentation is written into its staging folder, nothing committed yet;
- ``commit``: the first output file was just moved into place;
- ``import``: inside the import of a module (during the read stage) that, like numpy, turns any
  exception raised while it initialises into an ``ImportError``.

On reaching it the launcher writes the point's name to the file ``VOLSEG_TEST_MARKER`` and
waits ``VOLSEG_TEST_PAUSE_SECONDS`` (default 60) or until a signal sets the cancel flag.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from volseg import signals

signals.install()


def pause(point: str) -> None:
    Path(os.environ["VOLSEG_TEST_MARKER"]).write_text(point)
    deadline = time.monotonic() + float(os.environ.get("VOLSEG_TEST_PAUSE_SECONDS", "60"))
    while time.monotonic() < deadline and not signals.cancel_event.is_set():
        time.sleep(0.02)


def install_pause(point: str) -> None:
    import volseg.pipeline
    import volseg.progress

    if point.startswith("stage:"):
        stage, original_stage = point.split(":", 1)[1], volseg.progress.Reporter.stage

        def stage_hook(self, name, message=""):
            original_stage(self, name, message)
            if name == stage:
                pause(point)

        volseg.progress.Reporter.stage = stage_hook
    elif point == "mid-write":
        original_write = volseg.pipeline.write_segmentation

        def write_hook(*args, **kwargs):
            result = original_write(*args, **kwargs)
            pause(point)
            return result

        volseg.pipeline.write_segmentation = write_hook
    elif point == "commit":
        original_commit, done = volseg.pipeline.commit_file, []

        def commit_hook(*args, **kwargs):
            original_commit(*args, **kwargs)
            if not done:
                done.append(True)
                pause(point)

        volseg.pipeline.commit_file = commit_hook
    elif point == "import":
        folder = Path(os.environ["VOLSEG_TEST_MARKER"]).parent
        (folder / "slow_extension.py").write_text(
            "import fault_launcher\n"
            "try:\n"
            "    fault_launcher.pause('import')\n"
            "except BaseException as error:  # as numpy does with a failing C extension\n"
            "    raise ImportError('the extension failed to initialise') from error\n")
        sys.path.insert(0, str(folder))
        original_read = volseg.pipeline.read_inputs

        def read_hook(*args, **kwargs):
            import slow_extension  # noqa: F401

            return original_read(*args, **kwargs)

        volseg.pipeline.read_inputs = read_hook
    else:
        raise SystemExit(f"unknown pause point {point!r}")


if __name__ == "__main__":
    try:
        install_pause(os.environ["VOLSEG_TEST_PAUSE"])
        from volseg.cli.main import main

        code = main(sys.argv[1:])
    except KeyboardInterrupt:
        code = signals.report_cancelled(sys.argv[1:])
    sys.exit(code)
