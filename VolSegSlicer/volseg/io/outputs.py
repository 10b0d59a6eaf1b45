"""Which files a result is written to, and the checks on them before any work is done.

Kept free of SimpleITK, nibabel and torch so that a bad output name or an existing result is
refused at once (``volseg segment`` checks these before its heavy imports). The writers in
:mod:`volseg.io.writers` use the same rules.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from volseg.errors import OutputError
from volseg.io.atomic import check_writable, full_suffix

if TYPE_CHECKING:
    from volseg.io.volume import Volume

LABELMAP_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
SEGMENTATION_SUFFIXES = (".seg.nrrd", *LABELMAP_SUFFIXES, ".dcm")
VOLUME_SUFFIXES = LABELMAP_SUFFIXES
PROBABILITY_SUFFIXES = (".nii", ".nii.gz", ".nrrd")


def suffix_in(path: Path, supported: Sequence[str], what: str) -> str:
    """The lower-case format extension of ``path``; an :class:`OutputError` if not ``supported``."""
    suffix = full_suffix(path).lower()
    if suffix not in supported:
        raise OutputError(
            f"cannot write {what} to '{path.name}': unknown extension '{suffix or '(none)'}'",
            hint=f"use one of: {', '.join(supported)}",
        )
    return suffix


def color_table_path(path: str | os.PathLike) -> Path:
    """The colour table written beside a label map: ``<stem>.csv`` (``seg.nii.gz`` -> ``seg.csv``)."""
    path = Path(path)
    suffix = full_suffix(path)
    return path.with_name(path.name[: len(path.name) - len(suffix)] + ".csv")


def segmentation_outputs(path: str | os.PathLike) -> list[Path]:
    """The files :func:`~volseg.io.writers.write_segmentation` creates for ``path`` (a label map
    gets a colour table).

    Raises:
        OutputError: the extension is not supported.
    """
    path = Path(path)
    suffix = suffix_in(path, SEGMENTATION_SUFFIXES, "a segmentation")
    return [path, color_table_path(path)] if suffix in LABELMAP_SUFFIXES else [path]


def _label_maps_beside(table: Path) -> list[Path]:
    """The existing label maps whose colour table ``table`` is (same stem, any label-map format)."""
    stem = table.name[: -len(".csv")]
    return [table.with_name(stem + s) for s in LABELMAP_SUFFIXES if table.with_name(stem + s).exists()]


def check_color_table(table: Path, result: Path, overwrite: bool) -> None:
    """Refuse to replace an existing colour table without ``overwrite``, saying whose it is.

    ``ct.nii.gz`` and ``ct.nrrd`` share the table ``ct.csv``, so a second result of the same
    name in another format would otherwise fail on a file the user never named.
    """
    if overwrite or not (table.exists() or table.is_symlink()):
        check_writable(table, overwrite)
        return
    owners = [p for p in _label_maps_beside(table) if p.name != result.name]
    if owners:
        raise OutputError(
            f"the colour table {table.name} that goes with {result.name} would replace the one of "
            f"{', '.join(p.name for p in owners)} (a label map keeps its names and colours in <name>.csv)",
            hint=f"choose another name for {result.name}, or pass --overwrite to replace both",
        )
    raise OutputError(f"{table} exists (it would be the colour table of {result.name}); pass --overwrite "
                      "to replace it", hint="or choose another output name")


def check_dicom_reference(reference: Volume) -> None:
    """Refuse a DICOM SEG output for a volume that was not read from a DICOM series."""
    source = reference.source
    if source is None or source.format != "dicom" or not source.dicom_files:
        fmt = source.format if source is not None else "an in-memory volume"
        raise OutputError(
            f"a DICOM SEG (.dcm) output needs a DICOM series input, but the input is {fmt}",
            hint="write .seg.nrrd, .nii.gz or .nrrd instead, or read the input from a DICOM folder",
        )


def check_segmentation_output(
    path: str | os.PathLike, overwrite: bool = False, reference: Volume | None = None
) -> list[Path]:
    """Up-front check that a segmentation can be written to ``path`` (extension, folder, no clobber).

    Args:
        path: the output the user asked for.
        overwrite: whether existing files may be replaced.
        reference: the input volume, when known: a ``.dcm`` output needs a DICOM series input.

    Returns:
        the files that will be written.
    """
    path = Path(path)
    outputs = segmentation_outputs(path)
    if reference is not None and full_suffix(path).lower() == ".dcm":
        check_dicom_reference(reference)
    check_writable(path, overwrite)
    for extra in outputs[1:]:
        check_color_table(extra, path, overwrite)
    return outputs
