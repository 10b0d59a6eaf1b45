"""Atomic, no-clobber output files.

Writers never write the user's file directly: they write a temporary file in the same folder
(same suffixes in lower case, so libraries that choose the format by extension still work) and move it onto
the final name only once it is complete. Interrupted or failed writes leave nothing behind.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from volseg.errors import OutputError, output_error

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


#: The unique part of a temporary name: ``.<stem>.volseg-tmp-<12 hex digits>``.
_TEMP_MARKER = re.compile(r"^\..*\.volseg-tmp-[0-9a-f]{12}")


def _temp_path(path: Path) -> Path:
    """A fresh hidden name beside ``path`` with its extension in lower case.

    Lower case because libraries choose the format by extension and some (ITK) accept only
    the lower-case spelling; the final file keeps the name the user gave.
    """
    suffix = full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(f".{stem}.volseg-tmp-{uuid.uuid4().hex[:12]}{suffix.lower()}")


def _remove_temp(tmp: Path) -> None:
    """Remove ``tmp`` and any sibling a library wrote beside it (``.zraw`` for ``.mhd``, ...)."""
    with contextlib.suppress(OSError):
        tmp.unlink()
    marker = _TEMP_MARKER.match(tmp.name)
    if marker is None:
        return
    with contextlib.suppress(OSError):
        for sibling in tmp.parent.glob(glob.escape(marker.group(0)) + ".*"):
            with contextlib.suppress(OSError):
                sibling.unlink()


def _os_error(error: OSError, path: Path) -> OutputError:
    return output_error(error, path)


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: same resolved path (symlinks, ``..``), or, where
    both exist, ``os.path.samefile`` (hard links; on a file system that ignores case, a name
    differing only in case exists and is found to be the same file)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    ra, rb = a.expanduser().resolve(), b.expanduser().resolve()
    if os.path.normcase(str(ra)) == os.path.normcase(str(rb)):
        return True
    return False


def check_not_an_input(
    outputs: Sequence[str | os.PathLike],
    inputs: Sequence[str | os.PathLike],
    dicom_files: Sequence[str | os.PathLike] = (),
) -> None:
    """Refuse, before any work is done, an output that is one of the input files.

    ``--overwrite`` allows replacing earlier results, never the data being segmented.

    Args:
        outputs: every file the run will write (segmentation, its colour table, probabilities).
        inputs: the input files (or folders) given by the user.
        dicom_files: the files of an input DICOM series.

    Raises:
        OutputError: an output is the same file as an input.
    """
    sources = [Path(p) for p in (*inputs, *dicom_files)]
    for output in (Path(p) for p in outputs):
        for source in sources:
            if _same_file(output, source):
                raise OutputError(
                    f"output {output} would overwrite the input {source}",
                    hint="choose another output path; volseg never writes over its inputs",
                )


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[str | os.PathLike], overwrite: bool = False) -> Iterator[list[Path]]:
    """Yield temporary paths for several files; commit them together when the block succeeds.

    No file is committed unless every temporary file exists once the block ends. If a commit
    fails part-way, the files already committed by this call are removed again when they are
    new (with ``overwrite`` a replaced file cannot be restored, but that needs a failing
    rename in the same folder). On any exception the temporary files (and any sibling file a
    library wrote beside them) are removed and the exception propagates; an ``OSError``
    (disk full, permission denied) becomes an :class:`OutputError` naming the file.

    Raises:
        OutputError: see :func:`check_writable`; also when the block wrote no file, or the
            operating system refused a write.
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        check_writable(path, overwrite)
    temps = [_temp_path(path) for path in paths]
    committed: list[Path] = []
    current = paths[0] if paths else Path(".")
    try:
        try:
            yield list(temps)
            for tmp, path in zip(temps, paths):
                if not tmp.exists():
                    raise OutputError(f"writing {path} failed: no file was produced")
            for tmp, path in zip(temps, paths):
                current = path
                existed = path.exists()
                _commit(tmp, path, overwrite)
                if not existed:
                    committed.append(path)
        except OSError as error:
            raise _os_error(error, current) from None
    except BaseException:
        for tmp in temps:
            _remove_temp(tmp)
        for path in committed:
            with contextlib.suppress(OSError):
                path.unlink()
        raise


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; move it onto ``path`` when the block succeeds.

    The temporary file lies in the same folder and ends with the same suffixes as ``path``,
    in lower case. On any exception (KeyboardInterrupt included) the temporary file, and any
    sibling file the writer put beside it, is removed and the exception propagates; ``path`` is
    untouched. An ``OSError`` raised in the block (disk full, ...) becomes an
    :class:`OutputError` naming the file and the reason. Without ``overwrite`` an existing file
    is never replaced, even one that appeared while the block ran.

    Raises:
        OutputError: see :func:`check_writable`; also when the block wrote no file, or the
            operating system refused a write.
    """
    with atomic_outputs([path], overwrite) as (tmp,):
        yield tmp


def commit_file(tmp: str | os.PathLike, path: str | os.PathLike, overwrite: bool) -> None:
    """Move the finished file ``tmp`` onto ``path`` atomically; without ``overwrite`` never
    replace a file (not even one that appeared since the up-front check).

    Raises:
        OutputError: ``path`` exists and ``overwrite`` is False.
        OSError: the move failed.
    """
    _commit(Path(tmp), Path(path), overwrite)


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


def check_output_folder(folder: str | os.PathLike) -> None:
    """Refuse an output folder that is a file (``volseg batch -o result.seg.nrrd``), creating nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output folder {folder} is a file",
                          hint="the results go into a folder: give a folder with -o (it is created if missing)")


def make_output_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) for results, or say clearly why it cannot be one."""
    folder = Path(folder)
    check_output_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}",
                          hint="choose a folder you can write to") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable", hint="choose a folder you can write to")
    return folder
