"""The cases of a batch: what each path on the command line becomes (see :mod:`volseg.cohort.batch`).

Light on purpose (no torch, no SimpleITK): ``volseg batch`` finds its cases, and refuses an
empty folder or clashing names, before importing anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from volseg.cards import ModelCard, match_inputs
from volseg.errors import InputError
from volseg.io.atomic import full_suffix
from volseg.io.formats import image_format


@dataclass
class Case:
    name: str
    inputs: list[Path]


def _case_name(path: Path) -> str:
    """The file name without its image suffix; a folder's own name (``.`` -> the current folder's)."""
    if path.is_dir():
        return path.resolve().name or "root"
    return path.name[: -len(full_suffix(path))] if full_suffix(path) else path.name


def _volumes_in(folder: Path) -> list[Path]:
    """The volume files and DICOM series sub-folders of ``folder``, sorted by name."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if (p.is_file() and image_format(p) is not None) or (p.is_dir() and _is_dicom_folder(p)):
            found.append(p)
    return found


def _is_dicom_folder(folder: Path) -> bool:
    files = [p for p in folder.iterdir() if p.is_file()]
    return any(p.suffix.lower() == ".dcm" for p in files) or any(_has_dicom_preamble(p) for p in files[:3])


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def find_cases(paths: list[Path], card: ModelCard) -> list[Case]:
    """Turn the command line's paths into cases, refusing what cannot be one."""
    cases = []
    for path in paths:
        if not path.exists():
            raise InputError(f"{path} does not exist")
        if path.is_file() or _is_dicom_folder(path):
            if len(card.inputs) > 1:
                raise InputError(f"{path}: model {card.id!r} needs {len(card.inputs)} inputs per case",
                                 hint="give one folder per case holding one file per input ("
                                 + ", ".join(i.name for i in card.inputs) + ")")
            cases.append(Case(_case_name(path), [path]))
            continue
        if len(card.inputs) == 1:
            volumes = _volumes_in(path)
            if not volumes:
                raise InputError(f"folder {path} holds no volume file (.nii.gz, .nrrd, .mha, ...) and no DICOM series",
                                 hint="give volume files, a folder of them, or DICOM series folders")
            cases.extend(Case(_case_name(v), [v]) for v in volumes)
            continue
        files = sorted(p for p in path.iterdir() if p.is_file() and image_format(p) is not None)
        picks = match_inputs([i.name_hint for i in card.inputs], [p.name for p in files])
        missing = [card.inputs[n].name for n, pick in enumerate(picks) if pick is None]
        if missing:
            raise InputError(f"case folder {path}: no file matches input(s) {', '.join(missing)}",
                             hint="name the files so the card's name hints match them (see `volseg models`)")
        cases.append(Case(_case_name(path), [files[i] for i in picks]))
    by_key: dict[str, list[str]] = {}
    for c in cases:  # casefold: "Case1" and "case1" are the same file on macOS and Windows
        by_key.setdefault(c.name.casefold(), []).append(c.name)
    clashes = sorted("/".join(sorted(set(names))) for names in by_key.values() if len(names) > 1)
    if clashes:
        raise InputError(f"several cases would write the same result: {', '.join(clashes)}",
                         hint="give cases distinct names, or run them into different output folders")
    return cases
