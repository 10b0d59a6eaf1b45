"""What one segmentation run is asked to do, and the checks it must pass before any work.

:class:`SegmentRequest` is what ``volseg segment``, ``batch``, ``serve``, the demo and the
Slicer module hand to :func:`volseg.pipeline.segment`. :func:`check_request` refuses, in well
under a second, everything that can be refused without reading an image or importing PyTorch:
output names, existing results, outputs that are inputs, the number of inputs, missing input
files, input files whose content is not what their name says, an unknown device name or
``$VOLSEG_RUNTIME``, and a checkpoint that is missing or is not a checkpoint at all.
The CLI runs it before the heavy imports; :func:`~volseg.pipeline.segment` runs it again, so
every caller gets the same answers.

This module must not import torch, MONAI or SimpleITK (``Testing/python/test_startup.py``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from volseg.cards import ModelCard
from volseg.checkpoints.sniffing import checkpoint_kind
from volseg.errors import CheckpointError, InputError, OutputError
from volseg.io.atomic import check_not_an_input, check_writable, full_suffix
from volseg.io.formats import check_input_content
from volseg.io.outputs import (
    PROBABILITY_SUFFIXES,
    check_segmentation_output,
    segmentation_outputs,
)

_DEVICE_NAME = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
#: The values ``$VOLSEG_RUNTIME`` (and a card's ``inference.runtime``) may take.
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")


@dataclass
class Overrides:
    """Settings the user changed on the command line or in the Slicer panel (None: use the card's)."""

    roi_size: tuple[int, int, int] | None = None
    overlap: float | None = None
    sw_batch_size: int | None = None
    flips: bool | None = None
    amp: bool | None = None
    precision: str | None = None  # auto | fp32 | fp16 | bf16 (volseg.inference.precision)
    keep_largest: bool | None = None
    fill_holes: bool | None = None
    min_island_mm3: float | None = None


@dataclass
class SegmentRequest:
    """One run: the input file per model channel, the model card, and where the results go.

    Args:
        inputs: one volume file or DICOM folder per input channel of the card, in card order.
        card: the model card (``volseg.cards.load_card`` or ``card_from_arguments``).
        output: the segmentation file; its extension picks the format.
        checkpoint: the weights, overriding the card's own ``checkpoint.path``.
        probabilities: also write the class probabilities here (``.nii``, ``.nii.gz``, ``.nrrd``).
        overwrite: replace existing results (never an input).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        trust_pickle: allow a full unpickle of the checkpoint (it can run code).
        overrides: inference and postprocessing settings that replace the card's.
    """

    inputs: Sequence[Path]
    card: ModelCard
    output: Path
    checkpoint: Path | None = None
    probabilities: Path | None = None
    overwrite: bool = False
    device: str = "auto"
    trust_pickle: bool = False
    overrides: Overrides = field(default_factory=Overrides)


def checkpoint_for(card: ModelCard, given: Path | None) -> Path:
    """The checkpoint a run uses: ``given`` (``--checkpoint``), else the card's own file.

    Raises:
        CheckpointError: neither is there; the hint says where the card's weights are published.
    """
    path = given or card.checkpoint_path
    if path is None:
        where = card.raw.get("checkpoint", {}).get("published_at")
        notes = card.raw.get("checkpoint", {}).get("notes")
        published = ("" if not where else f" ({where})" if where.startswith("not published") else
                     f" (the weights are published at {where})")
        raise CheckpointError(
            f"model {card.id!r} needs a checkpoint and none was given",
            hint="pass --checkpoint PATH" + published + (f"; the card's notes: {notes}" if notes else ""),
        )
    return Path(path)


def check_probabilities_output(request: SegmentRequest) -> None:
    """Refuse, before any work, a probabilities path with the wrong format or that would clash
    with the segmentation's own files."""
    path = request.probabilities
    if full_suffix(path).lower() not in PROBABILITY_SUFFIXES:
        raise OutputError(f"cannot write probabilities as {path.name}",
                          hint="use one of " + ", ".join(PROBABILITY_SUFFIXES))
    clash = {p.resolve() for p in segmentation_outputs(request.output)}
    if path.resolve() in clash:
        raise OutputError(f"--probabilities {path} is a file of the segmentation itself",
                          hint="give the probabilities their own file name")
    check_writable(path, request.overwrite)


def check_device_name(spec: str | None) -> None:
    """Refuse a device name that can never work (``gpu``, ``cuda:x``); whether the device is
    there is checked later, with torch (:func:`volseg.inference.devices.resolve_device`)."""
    if not _DEVICE_NAME.match((spec or "auto").lower()):
        raise InputError(f"unknown device {spec!r}", hint="use auto, cpu, cuda, cuda:N or mps")


def check_runtime_name() -> None:
    """Refuse a ``$VOLSEG_RUNTIME`` that names no CPU runtime, before any work (unset or empty: the card's)."""
    value = os.environ.get("VOLSEG_RUNTIME")
    if value and value not in RUNTIMES:
        raise InputError(f"VOLSEG_RUNTIME={value!r} is not a CPU runtime volseg knows",
                         hint="set it to one of " + ", ".join(RUNTIMES) + ", or unset it to use the card's")


def check_request(request: SegmentRequest) -> Path:
    """Every check that needs neither an image read nor PyTorch, cheapest first.

    Returns:
        the checkpoint file the run will load.

    Raises:
        OutputError, InputError, CheckpointError: with the message the user sees.
    """
    card = request.card
    check_segmentation_output(request.output, request.overwrite)
    if request.probabilities is not None:
        check_probabilities_output(request)
    outputs = segmentation_outputs(request.output) + ([request.probabilities] if request.probabilities else [])
    check_not_an_input(outputs, list(request.inputs))  # --overwrite replaces results, never the data
    check_device_name(request.device)
    check_runtime_name()
    if len(request.inputs) != len(card.inputs):
        names = ", ".join(i.name for i in card.inputs)
        raise InputError(
            f"the model takes {len(card.inputs)} input channel(s): {names}; {len(request.inputs)} input file(s) were given",
            hint="pass one single-channel image per model channel, in that order",
        )
    for path in request.inputs:
        if not Path(path).exists():
            raise InputError(f"input {path} does not exist", hint="check the path")
        check_input_content(path)  # a NRRD named ct.jpg, a photo: said before torch is imported
    if full_suffix(request.output).lower() == ".dcm":
        not_dicom = next((Path(p) for p in request.inputs if not Path(p).is_dir()), None)
        if not_dicom is not None:  # a DICOM series is a folder; reading it later checks the rest
            raise OutputError(
                f"a DICOM SEG (.dcm) output needs a DICOM series input (a folder), but the input is {not_dicom.name}",
                hint="write .seg.nrrd, .nii.gz or .nrrd instead, or read the input from a DICOM folder",
            )
    ckpt_path = checkpoint_for(card, request.checkpoint)
    checkpoint_kind(ckpt_path)  # missing, empty, or not a checkpoint at all
    return ckpt_path
