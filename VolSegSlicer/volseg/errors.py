"""Errors the engine reports to its users.

Every problem a user can cause (a missing file, a card with a typo, a checkpoint for another
architecture) is raised as a :class:`VolSegError` subclass that carries a plain message and a
hint saying what to do. The CLI prints these without a traceback and exits with ``exit_code``.
"""

from __future__ import annotations

import errno
import os


class VolSegError(Exception):
    """A problem with the user's input, reported as one clear message.

    Args:
        message: what was wrong.
        hint: what to do about it (optional).
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        message = " ".join(str(message).split())  # one line, whatever a library put in it
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class InputError(VolSegError):
    """An input volume is missing, unreadable or unsuitable."""


class ModelCardError(VolSegError):
    """A model card is missing, malformed or inconsistent."""


class CheckpointError(VolSegError):
    """A checkpoint cannot be read or does not fit the architecture."""


class ArchitectureError(VolSegError):
    """An unknown architecture name or invalid constructor arguments."""


class OutputError(VolSegError):
    """An output cannot be written (exists already, bad extension, unwritable folder)."""


class DiskFullError(OutputError):
    """The output's file system is out of space, inodes or quota (exit code 3, like memory)."""

    exit_code = 3


class ResourceError(VolSegError):
    """Not enough memory, or a device that is not available."""

    exit_code = 3


class Cancelled(VolSegError):
    """The run was cancelled (SIGINT/SIGTERM or a cancel request)."""

    exit_code = 130

    def __init__(self, message: str = "cancelled; nothing was written", hint: str | None = None) -> None:
        super().__init__(message, hint)


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}


def output_error(error: OSError, path: str | os.PathLike) -> OutputError:
    """The one mapping of an operating-system failure while writing ``path`` (the user's path)
    to a clear error: out of space/inodes/quota is a :class:`DiskFullError` (exit 3), a
    read-only or forbidden folder and anything else an :class:`OutputError` (exit 2)."""
    code = error.errno
    reason = error.strerror or str(error) or type(error).__name__
    if code in _DISK_FULL:
        return DiskFullError(f"cannot write {path}: {reason} (no free space or inodes left, or over quota)",
                             hint="free space on that disk or choose an output folder on another one")
    if code == errno.EROFS:
        return OutputError(f"cannot write {path}: the file system is read-only", hint="choose a writable output folder")
    if code in _NOT_ALLOWED:
        return OutputError(f"cannot write {path}: permission denied", hint="choose a folder you can write to")
    return OutputError(f"cannot write {path}: {reason}", hint="check free disk space and permissions of the output folder")


def error_from_exception(exc: BaseException) -> VolSegError:
    """The one message a failure is reported with: a :class:`VolSegError` as it is, running out of
    memory as a :class:`ResourceError`, anything else as an internal error (exit code 1)."""
    if isinstance(exc, VolSegError):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return Cancelled()
    memory_hint = "use a smaller ROI (--roi-size), a smaller volume, or free memory"
    if isinstance(exc, MemoryError):
        return ResourceError("out of memory", hint=memory_hint)
    text = " ".join(str(exc).split())[:300]
    if "can't allocate memory" in str(exc) or "not enough memory" in str(exc):
        return ResourceError("out of memory: " + text, hint=memory_hint)
    err = VolSegError(f"internal error ({type(exc).__name__}: {text})",
                      hint="this is a bug in volseg: please report it with the command line; "
                      "VOLSEG_DEBUG=1 shows the traceback")
    err.exit_code = 1
    return err
