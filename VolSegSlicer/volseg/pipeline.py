"""The path of a volume: read, preprocess, infer, postprocess, write.

:func:`segment` is what ``volseg segment`` and the Slicer module run. Every step reports a
stage to the :class:`~volseg.progress.Reporter`; a cancel request (SIGINT/SIGTERM in the CLI)
is honoured between windows and between stages, and since every write is atomic a cancelled
or failed run leaves no output behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volseg import __version__, models
from volseg.cards import ModelCard
from volseg.checkpoints import read_checkpoint
from volseg.devices import resolve_device
from volseg.errors import Cancelled, CheckpointError, OutputError, ResourceError
from volseg.inference import InferenceOptions, count_windows, predict_with_fallback
from volseg.io import (
    PROBABILITY_SUFFIXES,
    check_not_an_input,
    check_segmentation_output,
    check_writable,
    full_suffix,
    read_inputs,
    segmentation_outputs,
    write_probabilities,
    write_segmentation,
)
from volseg.postprocess import postprocess, to_labelmap
from volseg.preprocess import invert, preprocess
from volseg.progress import Reporter
from volseg.streamed_labels import all_finite, invert_to_labelmap


@dataclass
class Overrides:
    """Settings the user changed on the command line or in the Slicer panel (None: use the card's)."""

    roi_size: tuple[int, int, int] | None = None
    overlap: float | None = None
    sw_batch_size: int | None = None
    flips: bool | None = None
    amp: bool | None = None
    keep_largest: bool | None = None
    fill_holes: bool | None = None
    min_island_mm3: float | None = None


@dataclass
class SegmentRequest:
    inputs: Sequence[Path]
    card: ModelCard
    output: Path
    checkpoint: Path | None = None
    probabilities: Path | None = None
    overwrite: bool = False
    device: str = "auto"
    trust_pickle: bool = False
    overrides: Overrides = field(default_factory=Overrides)


class ModelCache:
    """Keeps loaded networks between requests (``volseg serve``); keyed by card, file and mtime."""

    def __init__(self) -> None:
        self._models: dict[tuple, torch.nn.Module] = {}

    def get(self, key: tuple) -> torch.nn.Module | None:
        return self._models.get(key)

    def put(self, key: tuple, model: torch.nn.Module) -> None:
        self._models = {key: model}  # one model at a time: GPU memory is the scarce resource


def checkpoint_for(card: ModelCard, given: Path | None) -> Path:
    path = given or card.checkpoint_path
    if path is None:
        where = card.raw.get("checkpoint", {}).get("published_at")
        raise CheckpointError(
            f"model {card.id!r} needs a checkpoint and none was given",
            hint="pass --checkpoint PATH" + (f" (the weights are published at {where})" if where else ""),
        )
    return Path(path)


def load_model(card: ModelCard, checkpoint: Path, trust_pickle: bool = False) -> torch.nn.Module:
    """Read the checkpoint and build the card's network around it (strict, eval mode)."""
    ckpt = read_checkpoint(checkpoint, trust_pickle=trust_pickle, sha256=card.checkpoint_sha256)
    if card.is_torchscript or ckpt.format == "torchscript":
        if ckpt.module is None:
            raise CheckpointError(f"the card {card.id!r} expects a TorchScript file but {checkpoint} holds a state_dict",
                                  hint=f"use a card with an architecture, or `volseg inspect {checkpoint}`")
        return ckpt.module.eval()
    return models.load(card.architecture, ckpt.state_dict, **card.config)


def inference_options(card: ModelCard, o: Overrides) -> InferenceOptions:
    """The card's inference settings with the user's overrides applied."""
    s = card.inference
    return replace(
        s,
        roi_size=tuple(o.roi_size or s.roi_size),
        overlap=s.overlap if o.overlap is None else o.overlap,
        sw_batch_size=o.sw_batch_size or s.sw_batch_size,
        flips=s.flips if o.flips in (None, True) else (),
        amp=s.amp if o.amp is None else o.amp,
    )


def choose_network(model: torch.nn.Module, card: ModelCard, options: InferenceOptions, device: torch.device,
                   windows: int, reporter: Reporter) -> torch.nn.Module:
    """The network the windows run through: ``model``, or on the CPU an ONNX Runtime / OpenVINO
    compilation of it checked against it (:func:`volseg.cpu_runtime.select_runtime`); says which and why.
    ``$VOLSEG_RUNTIME`` overrides the card's ``inference.runtime``."""
    runtime = os.environ.get("VOLSEG_RUNTIME") or options.runtime
    if runtime == "torch" or device.type != "cpu" or card.is_torchscript:
        return model
    from volseg.cpu_runtime import select_runtime

    shape = (options.sw_batch_size, len(card.inputs), *options.roi_size)
    network, reason = select_runtime(model, card.architecture, shape, device, windows, runtime,
                                     select=options.select_output)
    reporter.log(f"CPU runtime: {reason}")
    return network


def _available_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def estimate_memory(shape: Sequence[int], in_channels: int, out_channels: int, passes: int = 1,
                    roi_size: Sequence[int] | None = None, sw_batch_size: int = 1, streamed: bool = False) -> int:
    """Bytes the CPU needs for one run on a preprocessed grid of ``shape``: the input, the
    blended output and its weight map, the averaged probabilities and the label map (all on the
    grid padded up to the window), plus one batch of windows in and out. The network's own
    activations are not included: they depend on the architecture.

    ``streamed``: the estimate for the input grid when the label map is made piecewise
    (:func:`volseg.streamed_labels.invert_to_labelmap`): the input, the running maximum and
    winner, the label map and a margin for one class group's and one slab's temporaries (their
    absolute size is bounded, about 1 GiB)."""
    padded = [max(s, r) for s, r in zip(shape, roi_size or shape)]
    voxels = int(np.prod(padded))
    if streamed:
        return voxels * (4 * in_channels + 4 * 4 + 1 + 2)
    grid = voxels * 4 * (in_channels + 2 * out_channels + (out_channels if passes > 1 else 0) + 1) + voxels * 2
    if roi_size is None:
        return grid
    windows = count_windows(shape, roi_size, 0.0)
    batch = min(sw_batch_size, max(1, windows)) * int(np.prod(roi_size)) * 4 * (in_channels + out_channels)
    return grid + batch


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def check_memory(shape: Sequence[int], in_channels: int, out_channels: int, passes: int,
                 roi_size: Sequence[int] | None = None, sw_batch_size: int = 1, streamed: bool = False) -> None:
    need = estimate_memory(shape, in_channels, out_channels, passes, roi_size, sw_batch_size, streamed)
    free = _available_memory()
    if free is not None and need > 0.9 * free:
        raise ResourceError(
            f"this volume needs about {_size(need)} of memory after preprocessing "
            f"(grid {tuple(shape)}, {out_channels} output channels) but only {_size(free)} are available",
            hint="crop the volume to the region of interest, resample it coarser, or close other programs",
        )


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


def segment(request: SegmentRequest, reporter: Reporter, cancel: threading.Event | None = None,
            cache: ModelCache | None = None) -> dict[str, Any]:
    """Run one segmentation end to end; returns the ``done`` event's payload."""
    card, o = request.card, request.overrides
    cancel = cancel or threading.Event()

    def checkpoint_stage(name: str, message: str) -> None:
        if cancel.is_set():
            raise Cancelled()
        reporter.stage(name, message)

    check_segmentation_output(request.output, request.overwrite)
    if request.probabilities is not None:
        check_probabilities_output(request)
    outputs = segmentation_outputs(request.output) + ([request.probabilities] if request.probabilities else [])
    check_not_an_input(outputs, list(request.inputs))  # --overwrite replaces results, never the data
    ckpt_path = checkpoint_for(card, request.checkpoint)  # fail before any work is done
    if not ckpt_path.exists():
        raise CheckpointError(f"checkpoint {ckpt_path} does not exist",
                              hint="check the path given with --checkpoint or in the card")
    device, reason = resolve_device(request.device)
    reporter.log(f"device {device}: {reason}")
    if card.demonstration:
        reporter.log(f"model {card.id!r} is a demonstration model: not for clinical use", "warning")

    checkpoint_stage("read", f"reading {len(request.inputs)} input(s)")
    with warnings.catch_warnings(record=True) as caught:  # e.g. "several DICOM series; using ..."
        warnings.simplefilter("always")
        volume = read_inputs(list(request.inputs), expected_channels=len(card.inputs),
                             channel_names=[i.name for i in card.inputs])
    for w in caught:
        if issubclass(w.category, UserWarning):
            reporter.log(str(w.message), "warning")
    check_segmentation_output(request.output, request.overwrite, reference=volume)  # e.g. .dcm needs DICOM input
    if volume.source is not None and volume.source.dicom_files:
        check_not_an_input(outputs, [], volume.source.dicom_files)
    check_memory(volume.spatial_shape, len(card.inputs), card.out_channels, 1,
                 streamed=request.probabilities is None)  # the input grid; the network's grid is checked below

    checkpoint_stage("load_model", f"loading {card.id}")
    key = (card.id, str(card.path), card.architecture, json.dumps(card.config, sort_keys=True, default=str),
           str(ckpt_path.resolve()), ckpt_path.stat().st_mtime, request.trust_pickle)
    model = cache.get(key) if cache else None
    if model is None:
        model = load_model(card, ckpt_path, request.trust_pickle)
        if cache:
            cache.put(key, model)

    checkpoint_stage("preprocess", "preprocessing")
    pre = preprocess(volume.array, volume.ijk_to_ras, card.preprocessing)
    options = inference_options(card, o)

    if getattr(model, "batch_dependent", False) and options.sw_batch_size > 1:
        reporter.log("this checkpoint's outputs depend on the other windows in a batch (DeformUX-Net repository-"
                     "source offsets); running windows one at a time so each gets its batch-1 output", "warning")
        options = replace(options, sw_batch_size=1)
    check_memory(pre.image.shape[1:], len(card.inputs), card.out_channels, 1 + len(options.flips),
                 options.roi_size, options.sw_batch_size)
    windows = count_windows(pre.image.shape[1:], options.roi_size, options.overlap, options.mode) * (1 + len(options.flips))
    network = choose_network(model, card, options, device, windows, reporter)
    checkpoint_stage("infer", f"inference: {windows} windows of {list(options.roi_size)} on {device}")
    probs, where = predict_with_fallback(network, pre.image, options, device, reporter, cancel)
    if not all_finite(probs):
        raise CheckpointError(
            "the network produced NaN or infinite values, so no segmentation was written",
            hint="the checkpoint may be corrupt or not match the card; on a GPU, try --no-amp",
        )

    checkpoint_stage("postprocess", "postprocessing")
    if request.probabilities is None:  # only the label map is wanted: map it back piece by piece
        labelmap = invert_to_labelmap(probs, pre, card.labels, card.activation, card.threshold)
        probs = None
    else:
        probs = invert(probs, pre)
        labelmap = to_labelmap(probs, card.labels, card.activation, card.threshold)
    p = card.postprocessing
    labelmap = postprocess(
        labelmap, card.labels, volume.spacing,
        keep_largest=p.keep_largest_component if o.keep_largest is None else o.keep_largest,
        holes=p.fill_holes if o.fill_holes is None else o.fill_holes,
        min_island_mm3=p.min_island_mm3 if o.min_island_mm3 is None else o.min_island_mm3,
    )

    checkpoint_stage("write", f"writing {request.output}")
    provenance = {"model": card.id, "title": card.title, "architecture": card.architecture,
                  "checkpoint": ckpt_path.name, "software": f"volseg {__version__}", "device": where}
    outputs = write_outputs(request, labelmap, probs, volume, provenance)
    present = sorted(int(v) for v in np.unique(labelmap) if v)
    result = {"outputs": outputs, "device": str(device), "where": where, "labels_present": present}
    reporter.done(**result)
    return result


def write_outputs(request: SegmentRequest, labelmap: np.ndarray, probs: torch.Tensor | None, volume,
                  provenance: dict[str, Any]) -> dict[str, Any]:
    """Write the segmentation (and the probabilities) as one group: every file is first written
    into a hidden staging folder beside its destination and moved into place only when all of
    them were written, so a failure (a full disk, say) leaves none of them behind."""
    stages: list[Path] = []

    def staged(path: Path) -> Path:
        folder = Path(tempfile.mkdtemp(prefix=".volseg-stage-", dir=path.parent))
        stages.append(folder)
        return folder / path.name

    try:
        seg = write_segmentation(staged(request.output), labelmap, volume, request.card.labels,
                                 overwrite=False, provenance=provenance)
        moves = [(p, request.output.parent / p.name) for p in segmentation_outputs(seg)]
        outputs: dict[str, Any] = {"segmentation": str(request.output), "probabilities": None}
        if request.probabilities is not None:
            prob = write_probabilities(staged(request.probabilities), probs.numpy(), volume, overwrite=False)
            moves.append((prob, request.probabilities))
            outputs["probabilities"] = str(request.probabilities)
        for source, target in moves:
            if target.exists() and not request.overwrite:
                raise OutputError(f"{target} exists already", hint="pass --overwrite to replace it")
        for source, target in moves:
            os.replace(source, target)
        return outputs
    finally:
        for folder in stages:
            shutil.rmtree(folder, ignore_errors=True)
