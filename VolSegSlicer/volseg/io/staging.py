"""Hidden staging folders beside the outputs, and the clean-up of those a killed run left.

A run writes its files into ``.volseg-stage-<host>-<pid>-<random>`` in the output folder and
moves them into place at the end (see :func:`volseg.pipeline.write_outputs`); a run that is
killed (SIGKILL, power loss) cannot remove its folder. The next run writing into the same folder
removes the staging folders of processes of this host that no longer exist; a folder of another
host (a shared file system) or of a live process is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

PREFIX = ".volseg-stage-"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:40] or "host"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (True when that cannot be told)."""
    try:
        import psutil

        return psutil.pid_exists(pid)
    except ImportError:
        pass
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_stages(folder: Path) -> list[Path]:
    """Remove the staging folders in ``folder`` left by dead processes of this host; returns them."""
    pattern = re.compile(re.escape(PREFIX + _host() + "-") + r"(\d+)-")
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and entry.is_dir(follow_symlinks=False) and int(match.group(1)) != os.getpid() \
                and not _alive(int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def make_stage(folder: Path) -> Path:
    """A new staging folder in ``folder`` (after removing stale ones).

    Raises:
        OSError: the folder cannot be created (no space or inodes, read-only, permissions).
    """
    remove_stale_stages(folder)
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{_host()}-{os.getpid()}-", dir=folder))
