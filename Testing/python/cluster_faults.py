"""Fault injection for the Ray tests, installed in every Ray worker process by the test module's
``worker_process_setup_hook``; volseg itself has no test hooks.

``VOLSEG_TEST_FAULTS`` names a folder. When a worker has written the staged result of a case
whose file name is ``NAME`` (``c2.seg.nrrd``, say) and the folder holds a file ``kill-NAME*``,
the worker claims one such file (renames it to ``*.done``, so one worker dies per file) and its
process exits at once -- before the staged result is moved into place, as a worker killed for lack of memory
would, leaving its staging folder behind.
"""

from __future__ import annotations

import glob
import os


def install() -> None:
    folder = os.environ.get("VOLSEG_TEST_FAULTS")
    if not folder:
        return
    from volseg import pipeline

    real = pipeline.write_segmentation

    def write_then_die(path, *args, **kwargs):
        result = real(path, *args, **kwargs)
        for trigger in sorted(glob.glob(os.path.join(glob.escape(folder), f"kill-{os.path.basename(path)}*"))):
            if trigger.endswith(".done"):
                continue
            try:
                os.rename(trigger, trigger + ".done")
            except FileNotFoundError:  # another worker claimed it
                continue
            os._exit(1)
        return result

    pipeline.write_segmentation = write_then_die
