"""Fault injection for the Ray tests, installed in every Ray worker process by the test module's
``worker_process_setup_hook``; volseg itself has no test hooks.

``VOLSEG_TEST_FAULTS`` names a folder. When a worker has written the staged result of a case
whose file name is ``NAME`` (``c2.seg.nrrd``, say) and the folder holds ``kill-NAME``, the
worker claims that file (renames it, so only one worker dies for it) and its process exits at
once -- before the staged result is moved into place, as a worker killed for lack of memory
would, leaving its staging folder behind.
"""

from __future__ import annotations

import os


def install() -> None:
    folder = os.environ.get("VOLSEG_TEST_FAULTS")
    if not folder:
        return
    from volseg import pipeline

    real = pipeline.write_segmentation

    def write_then_die(path, *args, **kwargs):
        result = real(path, *args, **kwargs)
        trigger = os.path.join(folder, f"kill-{os.path.basename(path)}")
        try:
            os.rename(trigger, trigger + ".done")
        except FileNotFoundError:
            return result
        os._exit(1)

    pipeline.write_segmentation = write_then_die
