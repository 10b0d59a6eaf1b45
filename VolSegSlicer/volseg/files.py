"""Opening files someone else may have planted: regular files only, checked before the first read.

A path volseg reads or appends to can be a FIFO (a read blocks for ever, cancel included), a
device (``/dev/zero`` reads without end), a symlink another user left in a shared folder (an
append then lands in ``~/.bashrc``) or a file another user can rewrite. Every function here
opens first -- non-blocking, so a FIFO does not hang the open, and without following a final
symlink where asked -- and then looks at what was opened (``fstat``), so the check and the read
concern the same file (no window between them for a swap).

This module is light (standard library only): the card catalogue imports it without torch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from volseg.errors import InputError, VolSegError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)


def kind_of(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words ("a FIFO (named pipe)", "a device", ...)."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def _owner_problem(st: os.stat_result, private: bool) -> str | None:
    """Why a file with ``st`` cannot be trusted as the user's own (None: it can)."""
    if not hasattr(os, "geteuid"):
        return None  # Windows: no owners to compare in this sense
    if st.st_uid != os.geteuid():
        return f"belongs to another user (uid {st.st_uid})"
    if private and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "can be changed by other users (group- or world-writable)"
    return None


def open_checked(path: str | os.PathLike, what: str, *, append: bool = False, follow: bool = True,
                 owned: bool = False, private: bool = False, error: type[VolSegError] = InputError) -> int:
    """Open ``path`` and return the descriptor, once it is known to be a regular file.

    Args:
        path: the file.
        what: what the file is, for messages ("model card", "manifest").
        append: open for appending (created, mode 0600, when missing); else read only.
        follow: False: refuse a symbolic link as the last part of ``path``.
        owned: refuse a file that belongs to another user.
        private: ``owned`` and not writable by group or others either.
        error: the error raised.

    Raises:
        ``error``: the path is missing or cannot be opened, is a link (``follow`` False), a FIFO,
            device, socket or folder, or belongs to another user (``owned``/``private``).
    """
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT) if append else os.O_RDONLY
    flags |= _NONBLOCK | _CLOEXEC | _BINARY | (0 if follow else _NOFOLLOW)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise error(f"{what} {path} is a symbolic link; volseg does not follow links for this file",
                        hint="remove the link (it may have been planted by someone else)") from None
        if exc.errno == errno.ENXIO:  # opening a FIFO without a reader for writing
            raise error(f"{what} {path} is a FIFO (named pipe), not a regular file", hint="remove it") from None
        raise error(f"cannot open {what} {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path} is {kind_of(st.st_mode)}, not a regular file", hint="give the path of a file")
        problem = _owner_problem(st, private) if (owned or private) else None
        if problem:
            raise error(f"{what} {path} {problem}; volseg does not trust it",
                        hint="remove it, or use a file of your own")
        if _NONBLOCK:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_checked(path: str | os.PathLike, what: str, limit: int, *, follow: bool = True, owned: bool = False,
                 private: bool = False, error: type[VolSegError] = InputError) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them (see :func:`open_checked`).

    Raises:
        ``error``: as :func:`open_checked`, or the file holds more than ``limit`` bytes.
    """
    fd = open_checked(path, what, follow=follow, owned=owned, private=private, error=error)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what} {path} is larger than {limit:,} bytes; it is not a {what}",
                    hint="check the path")
    return data


def require_regular(path: str | os.PathLike, what: str, error: type[VolSegError] = InputError) -> os.stat_result:
    """The ``stat`` of ``path`` (symlinks followed: the user named it) if it is a regular file.

    For files a library opens itself (``torch.load``, ITK): looked at without opening, so a FIFO
    is refused without blocking.

    Raises:
        ``error``: missing, or a FIFO, device, socket or folder.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise error(f"cannot open {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is {kind_of(st.st_mode)}, not a regular file", hint="give the path of a file")
    return st


def is_regular(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file (symlinks followed), without opening it."""
    with contextlib.suppress(OSError):
        return stat.S_ISREG(os.stat(path).st_mode)
    return False


def private_folder(prefix: str) -> Path:
    """A fresh folder only this user can enter (mode 0700), under the user's own runtime folder
    (``$XDG_RUNTIME_DIR`` when it is the user's and private) or else the system's temporary one."""
    import tempfile

    root = os.environ.get("XDG_RUNTIME_DIR")
    if root:
        try:
            st = os.stat(root)
            if not stat.S_ISDIR(st.st_mode) or _owner_problem(st, True) or st.st_mode & 0o077:
                root = None
        except OSError:
            root = None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root or None))
