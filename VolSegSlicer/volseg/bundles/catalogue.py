"""Bundle folders in the cards folders: what ``volseg models`` lists beside the cards (no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from volseg.bundles.source import is_bundle_dir
from volseg.errors import VolSegError


def bundle_dirs(cards_dirs_: Sequence[str | Path] | None = None) -> list[Path]:
    """Bundle folders directly inside the cards folders (``--cards-dir``, ``$VOLSEG_CARDS_PATH``, built-in)."""
    from volseg.cards import cards_dirs

    found = []
    for folder in cards_dirs(cards_dirs_):
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        found += [p for p in entries if is_bundle_dir(p)]
    return found


def list_bundles(cards_dirs_: Sequence[str | Path] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """The summaries of the bundles found (:func:`volseg.bundles.metadata.bundle_summary`), and a
    message for each that cannot be read (shown, not fatal)."""
    from volseg.bundles.metadata import bundle_summary

    summaries, problems = [], []
    for path in bundle_dirs(cards_dirs_):
        try:
            summaries.append(bundle_summary(path))
        except VolSegError as exc:
            problems.append(f"{path}: {exc.message}")
    return summaries, problems


def print_bundle(s: dict[str, Any]) -> str:
    """The text ``volseg models`` prints for one bundle."""
    b = s["bundle"]
    inputs = ", ".join(i["name"] for i in s["inputs"])
    labels = ", ".join(lab["name"] for lab in s["labels"])
    lines = [s["id"], f"  {s['title']}", f"  MONAI bundle {b['path']}; inputs: {inputs}", f"  labels: {labels}"]
    if b["weights"] == "missing":
        where = b["download"] or "large_files.yml names no address"
        lines.append(f"  weights missing: download {where} into {Path(b['path']) / 'models' / 'model.pt'}")
    else:
        lines.append(f"  checkpoint: {s['checkpoint']['path']}")
    lines.append(f"  run: volseg segment IMAGE --bundle {b['path']} -o OUT.seg.nrrd")
    return "\n".join(lines)
