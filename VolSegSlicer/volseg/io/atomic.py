"""Atomic, no-clobber output files.

Writers never write the user's file directly: they write a temporary file in the same folder
(same suffixes, so libraries that choose the format by extension still work) and move it onto
the final name only once it is complete. Interrupted or failed writes leave nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from volseg.errors import OutputError

#: Multi-part extensions that must stay whole on temporary files.
COMPOUND_SUFFIXES = (".seg.nrrd", ".nii.gz", ".tar.gz")


def full_suffix(path: str | os.PathLike) -> str:
    """The extension that selects the format: ".nii.gz" and ".seg.nrrd" whole, else the last one.

    The result keeps the case of the file name (``"a.NII.GZ"`` -> ``".NII.GZ"``).
    """
    name = Path(path).name
    for suffix in COMPOUND_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[-len(suffix):]
    return Path(name).suffix


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse, before any work is done, an output that cannot or must not be written.

    Raises:
        OutputError: the folder is missing or not writable, the path is a folder, or the file
            exists and ``overwrite`` is False.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise OutputError(f"output folder {folder} does not exist", hint="create it first or choose another output path")
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable", hint="choose a folder you can write to")
    if path.is_dir():
        raise OutputError(f"output {path} is a folder, not a file name", hint="give a file name with an extension")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputError(f"output {path} exists; pass --overwrite to replace it", hint="or choose another output path")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; move it onto ``path`` when the block succeeds.

    The temporary file lies in the same folder and ends with the same suffixes as ``path``.
    On any exception (KeyboardInterrupt included) the temporary file is removed and the
    exception propagates; ``path`` is untouched. Without ``overwrite`` an existing file is
    never replaced, even one that appeared while the block ran.

    Raises:
        OutputError: see :func:`check_writable`; also when the block wrote no file.
    """
    path = Path(path)
    check_writable(path, overwrite)
    suffix = full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f".{stem}.volseg-tmp-{uuid.uuid4().hex[:12]}{suffix}")
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(f"writing {path} failed: no file was produced")
        _commit(tmp, path, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _commit(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move ``tmp`` onto ``path`` atomically; without ``overwrite`` never replace a file."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        # A hard link fails if the name exists: an atomic "create only if absent".
        os.link(tmp, path)
    except FileExistsError:
        raise OutputError(f"output {path} exists; pass --overwrite to replace it") from None
    except OSError:
        # File systems without hard links: check, then rename (tiny race window).
        if path.exists():
            raise OutputError(f"output {path} exists; pass --overwrite to replace it") from None
        os.replace(tmp, path)
        return
    tmp.unlink()
