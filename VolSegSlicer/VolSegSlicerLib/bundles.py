"""Add model... from a MONAI bundle folder or zip: the bundle is copied into the user's cards
folder, where ``volseg models`` lists it beside the cards (and the panel then shows it).

The bundle is checked by the engine's reader first (:mod:`volseg.bundles.source`: regular files,
no links, bounded sizes, zip members that stay inside it) and must describe its inputs and
labels; the copy takes regular files only, is made in a hidden folder beside its destination
and renamed into place at the end, and never replaces a folder already there.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from volseg.bundles.metadata import read_format
from volseg.bundles.source import MAX_ZIP_BYTES, BundleError, open_bundle

__all__ = ["BundleError", "add_bundle", "BUNDLE_FILE_FILTER"]

#: The file dialog's filter for a zipped bundle (a folder is picked with the folder dialog).
BUNDLE_FILE_FILTER = "MONAI bundle (*.zip)"


def _copy_regular_files(source: Path, target: Path) -> None:
    """Copy ``source``'s tree into the new folder ``target``: folders and regular files only, no link followed."""
    total = 0
    for folder, dirs, files in os.walk(source, followlinks=False):
        here = Path(folder)
        dest = target / here.relative_to(source)
        dest.mkdir(exist_ok=True)
        for name in dirs + files:
            st = os.lstat(here / name)
            if stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                raise BundleError(f"{here / name} is not a regular file or folder (a link?)",
                                  hint="a bundle to add holds regular files only; copy the real files into it")
        for name in files:
            total += os.lstat(here / name).st_size
            if total > MAX_ZIP_BYTES:
                raise BundleError(f"{source} holds more than {MAX_ZIP_BYTES} bytes", hint="this is not a bundle as published")
            shutil.copyfile(here / name, dest / name, follow_symlinks=False)


def add_bundle(source: str | os.PathLike, cards_dir: str | os.PathLike) -> Path:
    """Copy the bundle at ``source`` (folder or .zip) into ``cards_dir``; return its new folder.

    Raises:
        BundleError: the bundle is not readable or not safe, or ``cards_dir`` already holds a
            folder of that name (nothing is replaced).
    """
    if not str(cards_dir) or not Path(cards_dir).is_dir():
        raise BundleError("choose a folder for your own models first (Advanced > Model cards folder)",
                          hint="bundles are copied into that folder, where the model list finds them")
    bundle = open_bundle(source)
    read_format(bundle)  # inputs and labels must be readable before anything is copied
    cards = Path(cards_dir)
    final = cards / bundle.name
    if final.exists() or final.is_symlink():
        raise BundleError(f"{cards} already holds {bundle.name}", hint="remove or rename it first; nothing was replaced")
    staging = Path(tempfile.mkdtemp(prefix=".volseg-adding-", dir=cards))
    try:
        _copy_regular_files(bundle.root, staging / "bundle")
        os.rename(staging / "bundle", final)  # atomic; fails rather than replace a folder that appeared
    except OSError as exc:
        raise BundleError(f"could not copy the bundle into {cards}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
