"""``volseg batch``: many cases with one model, loaded once.

What a path on the command line becomes:

* a volume file: one case (single-input models);
* a DICOM series folder: one case (single-input models);
* any other folder, for a **single-input** model: one case per volume file in it (NIfTI, NRRD,
  MHA/MHD, sorted by name; hidden files and other files are ignored) and per DICOM series
  sub-folder, so ``volseg batch cases/`` segments every volume in ``cases/``;
* any other folder, for a **multi-input** model: one case, the folder holding one file per
  input, each matched to its input by the card's name hints.

Results go to ``OUT_DIR/<case name><suffix>`` (two cases whose names differ only in case are
refused, as they would clash on macOS and Windows). A case that fails, for whatever reason, is
reported as an error event and the others go on; the exit code is then 1. An existing result is
left alone (and reported) unless ``--overwrite``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from volseg.cards import ModelCard, match_inputs
from volseg.errors import Cancelled, InputError, VolSegError, error_from_exception
from volseg.io import full_suffix, make_output_folder
from volseg.io.readers import image_format
from volseg.pipeline import ModelCache, SegmentRequest, segment
from volseg.progress import Reporter


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


def run_batch(template: SegmentRequest, paths: list[Path], out_dir: Path, suffix: str, reporter: Reporter,
              cancel: threading.Event | None = None) -> dict:
    """Segment every case; return a summary {"done": [...], "skipped": [...], "failed": [...]}."""
    cases = find_cases(paths, template.card)
    make_output_folder(out_dir)
    cache, summary = ModelCache(), {"done": [], "skipped": [], "failed": []}
    for n, case in enumerate(cases, 1):
        out = out_dir / f"{case.name}{suffix}"
        reporter.begin_run()  # each case's done event times that case alone
        reporter.log(f"case {n}/{len(cases)}: {case.name}")
        if out.exists() and not template.overwrite:
            reporter.log(f"{out} exists; skipped (pass --overwrite to replace it)", "warning")
            summary["skipped"].append(case.name)
            continue
        try:
            segment(replace(template, inputs=case.inputs, output=out), reporter, cancel, cache)
            summary["done"].append(case.name)
        except (Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:
            if os.environ.get("VOLSEG_DEBUG") and not isinstance(exc, VolSegError):
                raise
            err = error_from_exception(exc)
            reporter.error(f"{case.name}: {err.message}", err.hint, err.exit_code)
            summary["failed"].append(case.name)
    return summary
