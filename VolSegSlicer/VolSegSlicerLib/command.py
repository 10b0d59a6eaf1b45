"""Building ``volseg`` command lines and their environment (pure Python, no Slicer, no Qt)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence


@dataclass
class SegmentOptions:
    """Everything the panel decides about one ``volseg segment`` run.

    Attributes:
        model: card id or path of the card file (``--model``).
        inputs: input image files, in the card's input order.
        output: the output file; ``.nrrd`` asks for a labelmap plus colour table.
        checkpoint: a checkpoint file overriding the card's (empty: the card's own).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        use_model_settings: True: pass none of the advanced settings, the card decides.
        overlap: sliding-window overlap (0..1).
        roi_size: sliding-window size; all zeros means the card's size.
        sw_batch_size: windows per batch; 0 means the card's value.
        flips: test-time flips on/off.
        amp: mixed precision on/off.
        keep_largest: keep the largest connected component of each label.
        fill_holes: fill holes in each label.
        min_island_mm3: remove islands smaller than this (0: off).
        cards_dir: the user's own folder of cards (empty: none).
        overwrite: replace the output file if it exists (the module writes to a fresh temp dir).
        trusted_bundle_digest: ``model`` is a MONAI bundle whose own code the user trusted at this
            digest (:mod:`VolSegSlicerLib.bundle_trust`): run it with ``--bundle model
            --trust-bundle-code --bundle-sha256 DIGEST``; empty: ``--model`` (no bundle code runs).
    """

    model: str
    inputs: Sequence[str]
    output: str
    checkpoint: str = ""
    device: str = "auto"
    use_model_settings: bool = True
    overlap: float = 0.5
    roi_size: tuple[int, int, int] = (0, 0, 0)
    sw_batch_size: int = 0
    flips: bool = False
    amp: bool = True
    keep_largest: bool = False
    fill_holes: bool = False
    min_island_mm3: float = 0.0
    cards_dir: str = ""
    overwrite: bool = False
    trusted_bundle_digest: str = ""
    extra: list[str] = field(default_factory=list)


def segment_args(opts: SegmentOptions) -> list[str]:
    """The arguments after ``volseg`` for one segmentation, always with ``--progress json``."""
    if not opts.inputs:
        raise ValueError("at least one input image is needed")
    if opts.trusted_bundle_digest:  # the bundle's own code, trusted by the user at this digest
        model = ["--bundle", str(opts.model), "--trust-bundle-code", "--bundle-sha256", str(opts.trusted_bundle_digest)]
    else:
        model = ["--model", str(opts.model)]
    args = ["segment", *[str(p) for p in opts.inputs], *model, "-o", str(opts.output),
            "--progress", "json", "--device", opts.device or "auto"]
    if opts.checkpoint:
        args += ["--checkpoint", str(opts.checkpoint)]
    if opts.cards_dir:
        args += ["--cards-dir", str(opts.cards_dir)]
    if opts.overwrite:
        args.append("--overwrite")
    if not opts.use_model_settings:
        args += ["--overlap", _number(opts.overlap)]
        if all(int(v) > 0 for v in opts.roi_size):
            args += ["--roi-size", *[str(int(v)) for v in opts.roi_size]]
        if opts.sw_batch_size > 0:
            args += ["--sw-batch-size", str(int(opts.sw_batch_size))]
        args.append("--flips" if opts.flips else "--no-flips")
        args.append("--amp" if opts.amp else "--no-amp")
        args.append("--keep-largest" if opts.keep_largest else "--no-keep-largest")
        args.append("--fill-holes" if opts.fill_holes else "--no-fill-holes")
        if opts.min_island_mm3 > 0:
            args += ["--min-island-mm3", _number(opts.min_island_mm3)]
    return args + list(opts.extra)


def _number(value: float) -> str:
    return f"{float(value):g}"


def engine_command(python: str, args: Sequence[str]) -> list[str]:
    """``[python, "-m", "volseg", *args]``."""
    return [str(python), "-m", "volseg", *[str(a) for a in args]]


def engine_environment(module_dir: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the engine: ``module_dir`` (where ``volseg/`` lives) first on
    PYTHONPATH, unbuffered UTF-8 output so progress lines arrive as they are written.

    ``PYTHONSAFEPATH=1`` (Python 3.11+, what ``-P`` does): ``python -m volseg`` does not put its
    working folder first on ``sys.path``, so a ``volseg/`` package planted in a shared folder
    cannot run instead of the engine (the runner also starts it in a private folder, which covers
    older Pythons)."""
    env = dict(os.environ if base is None else base)
    parts = [str(module_dir)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(module_dir)]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONSAFEPATH"] = "1"
    return env


def serve_request_line(request_id: str, opts: SegmentOptions) -> str:
    """One stdin line for the warm worker (``volseg serve``): the segment arguments without the
    ``segment`` command and without ``--progress`` (the worker always answers in JSON)."""
    args = segment_args(opts)[1:]
    cleaned: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--progress":
            skip = True
            continue
        cleaned.append(arg)
    return json.dumps({"id": request_id, "args": cleaned})


def cancel_request_line(request_id: str) -> str:
    """The stdin line that asks the warm worker to stop request ``request_id``."""
    return json.dumps({"cancel": request_id})
