"""``volseg batch``: many cases with one model, loaded once.

A case is a volume file (single-input models), a DICOM series folder, or, for multi-input
models, a folder holding one file per input, each matched to its input by the card's name
hints. Results go to ``OUT_DIR/<case name><suffix>``. A case that fails is reported and the
others go on; an existing result is left alone (and reported) unless ``--overwrite``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path

from volseg.cards import ModelCard, match_inputs
from volseg.errors import Cancelled, InputError, VolSegError
from volseg.io import full_suffix
from volseg.io.readers import image_format
from volseg.pipeline import ModelCache, SegmentRequest, segment
from volseg.progress import Reporter


@dataclass
class Case:
    name: str
    inputs: list[Path]


def _case_name(path: Path) -> str:
    return path.name[: -len(full_suffix(path))] if full_suffix(path) else path.name


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
        files = sorted(p for p in path.iterdir() if p.is_file() and image_format(p) is not None)
        picks = match_inputs([i.name_hint for i in card.inputs], [p.name for p in files])
        missing = [card.inputs[n].name for n, pick in enumerate(picks) if pick is None]
        if missing:
            raise InputError(f"case folder {path}: no file matches input(s) {', '.join(missing)}",
                             hint="name the files so the card's name hints match them (see `volseg models`)")
        cases.append(Case(path.name, [files[i] for i in picks]))
    names = [c.name for c in cases]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise InputError(f"several cases would write the same result: {', '.join(clashes)}",
                         hint="give cases distinct names, or run them into different output folders")
    return cases


def run_batch(template: SegmentRequest, paths: list[Path], out_dir: Path, suffix: str, reporter: Reporter,
              cancel: threading.Event | None = None) -> dict:
    """Segment every case; return a summary {"done": [...], "skipped": [...], "failed": [...]}."""
    cases = find_cases(paths, template.card)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache, summary = ModelCache(), {"done": [], "skipped": [], "failed": []}
    for n, case in enumerate(cases, 1):
        out = out_dir / f"{case.name}{suffix}"
        reporter.log(f"case {n}/{len(cases)}: {case.name}")
        if out.exists() and not template.overwrite:
            reporter.log(f"{out} exists; skipped (pass --overwrite to replace it)", "warning")
            summary["skipped"].append(case.name)
            continue
        try:
            segment(replace(template, inputs=case.inputs, output=out), reporter, cancel, cache)
            summary["done"].append(case.name)
        except Cancelled:
            raise
        except VolSegError as err:
            reporter.error(f"{case.name}: {err.message}", err.hint, err.exit_code)
            summary["failed"].append(case.name)
    return summary
